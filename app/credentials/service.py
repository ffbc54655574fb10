"""Provider credentials: stored encrypted (or named by an env var), revealed only to callers."""

from __future__ import annotations

import builtins
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from app.core.clock import utcnow
from app.core.crypto import SecretBox, UndecryptableSecret
from app.core.errors import (
    Conflict,
    DuplicateKey,
    InvalidInput,
    NotFound,
    StaleVersion,
    Transient,
    Unavailable,
)
from app.core.outbound import OutboundClient
from app.credentials.entities import Provider, StoredCredential
from app.credentials.schemas import (
    SECRET_MARK,
    CredentialCreate,
    CredentialUpdate,
    has_url_credentials,
)
from app.storage.protocol import Page, Storage, UnitOfWork, Where, given
from app.storage.reads import get_existing, read_existing, read_page

log = logging.getLogger(__name__)

DEFAULT_ENDPOINTS = {
    Provider.OPENAI: "https://api.openai.com/v1",
    Provider.ANTHROPIC: "https://api.anthropic.com",
}
ANTHROPIC_VERSION = "2023-06-01"
AZURE_API_VERSION = "2024-10-21"
# Changing one of these sends a model's requests somewhere else, so its answers may change.
ROUTING_FIELDS = ("endpoint", "api_version", "region")
_TESTABLE = (
    Provider.OPENAI,
    Provider.CUSTOM,  # an OpenAI-compatible server at its own endpoint
    Provider.ANTHROPIC,
    Provider.AZURE_OPENAI,
    Provider.MOCK,
)
_SHOWN_IN_CONFLICT = 5
_ERROR_BODY_CHARS = 300


@dataclass(frozen=True)
class RevealedCredential:
    """What a provider adapter needs to call upstream, with the secret in clear."""

    id: str
    provider: Provider
    # Kept out of repr so that logging the object by mistake does not log the secret.
    secret: str | None = field(repr=False)
    endpoint: str | None
    api_version: str | None
    region: str | None
    header_name: str | None
    header_value_template: str | None

    def auth_headers(self, default_name: str, default_template: str) -> dict[str, str]:
        """The header carrying the secret: the credential's own, or the provider's usual one."""
        if self.secret is None:
            return {}
        name = self.header_name or default_name
        template = self.header_value_template or default_template
        return {name: template.replace(SECRET_MARK, self.secret)}


@dataclass(frozen=True)
class ConnectionTest:
    """The outcome of calling the provider's model list with a credential."""

    ok: bool
    status_code: int | None
    latency_ms: float
    error: str | None


class CredentialUsers(Protocol):
    """The models that call through credentials, as a change of credential must see them.

    `app.models.service.ModelService` is the one; a protocol because `app.credentials` sits below
    `app.models` and never imports it. Both run in the caller's unit of work, so what they read and
    write commits, or not, with the credential's change.
    """

    async def calling_through(
        self, uow: UnitOfWork, credential_id: str, *, limit: int
    ) -> builtins.list[str]:
        """The ids of (at most `limit`) models calling with the credential, in id order."""
        ...

    async def credential_moved(self, uow: UnitOfWork, credential_id: str) -> None:
        """The credential now sends requests elsewhere, so its models' answers may change."""
        ...


class _NoUsers:
    """No model calls through any credential (a service built without `users`)."""

    async def calling_through(
        self, uow: UnitOfWork, credential_id: str, *, limit: int
    ) -> builtins.list[str]:
        return []

    async def credential_moved(self, uow: UnitOfWork, credential_id: str) -> None:
        return None


def _redact(text: str, secret: str | None) -> str:
    # Upstreams sometimes echo the key they were sent in their error message.
    return text.replace(secret, "***") if secret else text


class CredentialService:
    """Create, change, delete, reveal and test provider credentials."""

    def __init__(
        self,
        storage: Storage,
        box: SecretBox,
        *,
        environ: Mapping[str, str] | None = None,
        outbound: OutboundClient | None = None,
        test_timeout: float = 5.0,
        on_change: Callable[[str | None], None] | None = None,
        users: CredentialUsers | None = None,
    ) -> None:
        """`users`: the models calling through credentials (none are known without it)."""
        self._storage = storage
        self._users: CredentialUsers = users or _NoUsers()
        self._box = box
        self._environ = os.environ if environ is None else environ
        self._outbound = outbound or OutboundClient()
        self._test_timeout = test_timeout
        # Told when routes cached in memory may hold this credential's old values (None: all).
        self._on_change = on_change or (lambda model_id: None)

    async def create(self, data: CredentialCreate) -> StoredCredential:
        """Store a new credential, encrypting its secret."""
        if data.endpoint is not None:
            self._outbound.policy.check_url(data.endpoint, param="endpoint")
        credential = StoredCredential(
            id=data.id,
            name=data.name or data.id,
            provider=data.provider,
            secret_encrypted=self._encrypt(data.secret.get_secret_value() if data.secret else None),
            env_var=data.env_var,
            endpoint=data.endpoint,
            api_version=data.api_version,
            region=data.region,
            header_name=data.header_name,
            header_value_template=data.header_value_template,
            enabled=data.enabled,
        )
        try:
            async with self._storage.unit_of_work() as uow:
                await uow.repo(StoredCredential).add(credential)
                await uow.commit()
        except DuplicateKey as exc:
            raise Conflict(f"credential '{data.id}' already exists", param="id") from exc
        log.info("credential %s created (provider %s)", credential.id, credential.provider.value)
        return credential

    async def list(
        self, *, provider: Provider | None = None, limit: int = 20, after: str | None = None
    ) -> Page[StoredCredential]:
        """Credentials ordered by id, a page at a time."""
        where = given(Where.eq("provider", provider))
        return await read_page(
            self._storage, StoredCredential, *where, order_by=["id"], limit=limit, after=after
        )

    async def get(self, credential_id: str) -> StoredCredential:
        """The credential `credential_id`, or `NotFound`."""
        return await read_existing(self._storage, StoredCredential, credential_id, "credential")

    async def update(self, credential_id: str, changes: CredentialUpdate) -> StoredCredential:
        """Apply the fields given; a new secret replaces an env var reference and vice versa.

        A change of where requests go (`ROUTING_FIELDS`) is told to the `users` of the credential.
        """
        values = changes.model_dump(exclude_unset=True, exclude={"secret"})
        if changes.endpoint is not None:
            self._outbound.policy.check_url(changes.endpoint, param="endpoint")
        async with self._storage.unit_of_work() as uow:
            repo = uow.repo(StoredCredential)
            credential = await get_existing(repo, credential_id, "credential")
            if "secret" in changes.model_fields_set:
                secret = changes.secret.get_secret_value() if changes.secret else None
                credential.secret_encrypted = self._encrypt(secret)
                if secret is not None:
                    credential.env_var = None
            if values.get("env_var") is not None:
                credential.secret_encrypted = None
            moved = any(getattr(credential, n) != values[n] for n in ROUTING_FIELDS if n in values)
            for name, value in values.items():
                setattr(credential, name, value)
            credential.updated_at = utcnow()
            credential = await repo.update(credential)
            if moved:
                await self._users.credential_moved(uow, credential_id)
            uow.on_commit(lambda: self._on_change(None))
            await uow.commit()
        log.info(
            "credential %s updated (%s)", credential_id, ", ".join(sorted(changes.model_fields_set))
        )
        return credential

    async def delete(self, credential_id: str) -> None:
        """Delete a credential none of its `users` calls with; one in use is a `Conflict` naming
        the models."""
        async with self._storage.unit_of_work() as uow:
            await get_existing(uow.repo(StoredCredential), credential_id, "credential")
            using = await self._users.calling_through(uow, credential_id, limit=_SHOWN_IN_CONFLICT)
            if using:
                raise self._in_use(credential_id, using)
            await uow.repo(StoredCredential).delete(credential_id)
            # A model created meanwhile makes the commit fail with the RESTRICT foreign key.
            await uow.commit()
        log.info("credential %s deleted", credential_id)

    async def reveal(self, credential_id: str) -> RevealedCredential:
        """The credential with its secret decrypted (or read from its env var) for an upstream call.

        Unknown → `NotFound`; disabled, or stored under a key no longer configured →
        `Unavailable`. An env var that is not set gives `secret=None`.
        """
        credential = await self.get(credential_id)
        if not credential.enabled:
            raise Unavailable(f"credential '{credential_id}' is disabled")
        secret: str | None = None
        if credential.secret_encrypted is not None:
            try:
                secret = self._box.decrypt(credential.secret_encrypted)
            except UndecryptableSecret as exc:
                raise Unavailable(
                    f"credential '{credential_id}' was encrypted with a key that is not in "
                    "SECRET_KEY any more"
                ) from exc
        elif credential.env_var is not None:
            secret = self._environ.get(credential.env_var)
            if secret is None:
                log.warning(
                    "credential %s names env var %s, which is not set",
                    credential_id,
                    credential.env_var,
                )
        return RevealedCredential(
            id=credential.id,
            provider=credential.provider,
            secret=secret,
            endpoint=credential.endpoint,
            api_version=credential.api_version,
            region=credential.region,
            header_name=credential.header_name,
            header_value_template=credential.header_value_template,
        )

    async def test(self, credential_id: str) -> ConnectionTest:
        """Ask the provider for its model list with this credential (a cheap, read-only call)."""
        stored = await self.get(credential_id)
        if stored.provider not in _TESTABLE:
            raise InvalidInput(
                f"credentials for provider '{stored.provider.value}' cannot be tested here",
                param="provider",
            )
        if stored.provider is Provider.MOCK:
            return ConnectionTest(ok=True, status_code=None, latency_ms=0.0, error=None)
        credential = await self.reveal(credential_id)
        url, headers = self._probe(credential)
        started = time.perf_counter()
        try:
            response = await self._outbound.request(
                "GET", url, headers=headers, timeout=self._test_timeout, truncate=True
            )
        except (InvalidInput, Transient) as exc:
            # Refused destinations and network failures are the answer, not an API error.
            return self._failed(started, None, _redact(exc.message, credential.secret))
        latency = round(response.elapsed_ms, 1)
        if 200 <= response.status_code < 300:
            return ConnectionTest(
                ok=True, status_code=response.status_code, latency_ms=latency, error=None
            )
        body = _redact(response.text()[:_ERROR_BODY_CHARS], credential.secret)
        error = f"upstream answered {response.status_code}: {body}"
        return ConnectionTest(
            ok=False, status_code=response.status_code, latency_ms=latency, error=error
        )

    async def rotate_secrets(self) -> int:
        """Re-encrypt every stored secret with the newest key; returns how many were rewritten.

        Each credential is rewritten in its own unit of work, so an interrupted run keeps what
        it did and running it again is harmless.
        """
        rotated = 0
        after: str | None = None
        while True:
            async with self._storage.unit_of_work() as uow:
                page = await uow.repo(StoredCredential).find(
                    Where.is_null("secret_encrypted", False),
                    order_by=["id"],
                    limit=100,
                    after=after,
                )
            for credential in page.items:
                rotated += await self._rotate_one(credential)
            if page.next_cursor is None:
                return rotated
            after = page.next_cursor

    async def _rotate_one(self, credential: StoredCredential | None) -> int:
        while credential is not None and credential.secret_encrypted is not None:
            try:
                async with self._storage.unit_of_work() as uow:
                    credential.secret_encrypted = self._box.rotate(credential.secret_encrypted)
                    await uow.repo(StoredCredential).update(credential)
                    await uow.commit()
                return 1
            except StaleVersion:
                # Changed meanwhile: rotate what it holds now.
                async with self._storage.unit_of_work() as uow:
                    credential = await uow.repo(StoredCredential).get(credential.id)
            except NotFound:
                return 0
        return 0

    def _encrypt(self, secret: str | None) -> str | None:
        return None if secret is None else self._box.encrypt(secret)

    @staticmethod
    def _in_use(credential_id: str, model_ids: builtins.list[str]) -> Conflict:
        shown = ", ".join(f"'{m}'" for m in model_ids)
        return Conflict(
            f"credential '{credential_id}' is used by model(s) {shown}: point them at another "
            "credential or delete them first",
            param="id",
        )

    @staticmethod
    def _failed(started: float, status: int | None, error: str) -> ConnectionTest:
        latency = round((time.perf_counter() - started) * 1000, 1)
        return ConnectionTest(ok=False, status_code=status, latency_ms=latency, error=error)

    @staticmethod
    def _probe(credential: RevealedCredential) -> tuple[str, dict[str, str]]:
        """The URL listing the provider's models, and the headers authenticating the call."""
        default = DEFAULT_ENDPOINTS.get(credential.provider)
        if credential.endpoint is None and default is None:
            raise InvalidInput(
                f"a '{credential.provider.value}' credential needs its endpoint to be tested",
                param="endpoint",
            )
        if credential.endpoint is not None and has_url_credentials(credential.endpoint):
            # Only rows stored before the API refused them.
            raise InvalidInput(
                f"the endpoint of credential '{credential.id}' carries a user name or password "
                "(user:pass@); put credentials in the credential's secret, not in the endpoint "
                "URL",
                param="endpoint",
            )
        base = (credential.endpoint or default or "").rstrip("/")
        if credential.provider is Provider.AZURE_OPENAI:
            version = credential.api_version or AZURE_API_VERSION
            url = f"{base}/openai/models?api-version={version}"
            return url, credential.auth_headers("api-key", SECRET_MARK)
        if credential.provider is Provider.ANTHROPIC:
            headers = credential.auth_headers("x-api-key", SECRET_MARK)
            headers["anthropic-version"] = credential.api_version or ANTHROPIC_VERSION
            return f"{base}/v1/models", headers
        return f"{base}/models", credential.auth_headers("Authorization", f"Bearer {SECRET_MARK}")
