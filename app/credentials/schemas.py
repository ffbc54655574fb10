"""Credentials as the admin API accepts and shows them: the secret goes in, never out."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from app.core.schemas import ListPage, PartialUpdate
from app.credentials.entities import Provider, StoredCredential

CREDENTIAL_ID = r"^[A-Za-z0-9_-]{1,50}$"
ENV_VAR_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$"
SECRET_MARK = "{secret}"
MAX_SECRET_LENGTH = 16_384


URL_CREDENTIALS_REFUSED = (
    "must not carry a user name or password (user:pass@): put credentials in the credential's "
    "secret, not in the endpoint URL"
)


def has_url_credentials(url: str) -> bool:
    """Whether `url` carries `user[:password]@` before its host."""
    return "@" in urlsplit(url).netloc


def check_endpoint(value: str | None) -> str | None:
    """An http(s) URL with a host and no credentials in it, or None."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    # Stored in clear and refused by the streaming client beside an Authorization header.
    if has_url_credentials(value):
        raise ValueError(URL_CREDENTIALS_REFUSED)
    return value


def _check_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not 1 <= len(value.get_secret_value()) <= MAX_SECRET_LENGTH:
        raise ValueError(f"must be 1 to {MAX_SECRET_LENGTH} characters")
    return value


def _check_template(value: str | None) -> str | None:
    if value is not None and SECRET_MARK not in value:
        raise ValueError(f"must contain {SECRET_MARK}, where the secret goes")
    return value


def masked_endpoint(endpoint: str | None) -> str | None:
    """The endpoint with any user name and password in its URL replaced, so it can be shown.

    New endpoints cannot carry them; rows stored before that was refused may.
    """
    if endpoint is None or not has_url_credentials(endpoint):
        return endpoint
    parts = urlsplit(endpoint)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


class _CredentialFields(BaseModel):
    """What creating and changing a credential share: its name, the secret or where to read it,
    where the provider lives and how the secret is sent."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    secret: SecretStr | None = Field(default=None, description="Stored encrypted; never shown.")
    env_var: str | None = Field(
        default=None,
        pattern=ENV_VAR_NAME,
        description="Read the secret from this environment variable instead of storing it.",
    )
    endpoint: str | None = Field(default=None, max_length=2000)
    api_version: str | None = Field(default=None, min_length=1, max_length=32)
    region: str | None = Field(default=None, min_length=1, max_length=64)
    header_name: str | None = Field(default=None, pattern=HEADER_NAME)
    header_value_template: str | None = Field(default=None, max_length=200)

    _endpoint = field_validator("endpoint")(check_endpoint)
    _secret = field_validator("secret")(_check_secret)
    _template = field_validator("header_value_template")(_check_template)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if self.secret is not None and self.env_var is not None:
            raise ValueError("give either secret or env_var, not both")
        return self


class CredentialCreate(_CredentialFields):
    """A new credential: a secret to encrypt, or the name of an env var holding it."""

    id: str = Field(pattern=CREDENTIAL_ID, description="1-50 letters, digits, _ or -")
    provider: Provider
    enabled: bool = True


class CredentialUpdate(_CredentialFields, PartialUpdate):
    """Changes to a credential; a field left out is kept, one sent as null clears it (but a
    credential keeps its name and enabled flag)."""

    clearable = frozenset(_CredentialFields.model_fields) - {"name"}

    enabled: bool | None = None


class CredentialRead(BaseModel):
    """A credential as shown: whether it has a secret and where it lives, never the secret."""

    id: str
    object: Literal["credential"] = "credential"
    name: str
    provider: Provider
    has_secret: bool
    secret_source: Literal["encrypted", "env_var"] | None
    env_var: str | None
    endpoint: str | None
    api_version: str | None
    region: str | None
    header_name: str | None
    header_value_template: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, credential: StoredCredential) -> CredentialRead:
        source: Literal["encrypted", "env_var"] | None = None
        if credential.secret_encrypted is not None:
            source = "encrypted"
        elif credential.env_var is not None:
            source = "env_var"
        return cls(
            id=credential.id,
            name=credential.name,
            provider=credential.provider,
            has_secret=source is not None,
            secret_source=source,
            env_var=credential.env_var,
            endpoint=masked_endpoint(credential.endpoint),
            api_version=credential.api_version,
            region=credential.region,
            header_name=credential.header_name,
            header_value_template=credential.header_value_template,
            enabled=credential.enabled,
            created_at=credential.created_at,
            updated_at=credential.updated_at,
        )


class CredentialList(ListPage[CredentialRead]):
    pass


class ConnectionTestRead(BaseModel):
    """The outcome of one test request to the provider with the credential."""

    ok: bool
    status_code: int | None
    latency_ms: float
    error: str | None
