"""The credentials table: how to reach a provider, with its secret encrypted at rest."""

from __future__ import annotations

from enum import StrEnum

from app.storage.entity import Entity, choice, pk, text


class Provider(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    AZURE_OPENAI = "azure_openai"
    AWS_BEDROCK = "aws_bedrock"
    PGVECTOR = "pgvector"
    HTTP_API_KEY = "http_api_key"
    CUSTOM = "custom"
    MOCK = "mock"  # the built-in offline provider, so development needs no upstream account


class StoredCredential(Entity, table=True):
    """A provider credential; the secret is stored only as ciphertext or named by an env var."""

    __tablename__ = "credentials"

    id: str = pk()
    name: str = text(max_length=200)
    provider: Provider = choice(Provider, index=True)
    # Ciphertext of the secret (an API key, a connection URL, or a JSON object for AWS keys).
    secret_encrypted: str | None = text(None)
    # Or the name of an environment variable holding the secret, so it never reaches the database.
    env_var: str | None = text(None, max_length=128)
    endpoint: str | None = text(None)
    region: str | None = text(None, max_length=64)
    header_name: str | None = text(None, max_length=100)
    # How the secret is sent, e.g. "Bearer {secret}"; a template, never the secret itself.
    header_value_template: str | None = text(None, max_length=200)
    api_version: str | None = text(None, max_length=32)
    enabled: bool = True
