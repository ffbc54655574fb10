"""Standard Webhooks signatures: `whsec_` secrets and `v1,<base64 HMAC-SHA256>` signatures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from app.core.errors import InvalidInput

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24


def new_secret() -> str:
    """A fresh random secret in the `whsec_<base64>` form receivers' libraries expect."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret: its base64 part, decoded."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidInput("a webhook secret must start with 'whsec_'", param="secret")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("a webhook secret must be 'whsec_' and base64", param="secret") from exc
    if not 24 <= len(key) <= 64:
        raise InvalidInput("a webhook secret must hold 24 to 64 bytes", param="secret")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<signature>` of `{id}.{timestamp}.{body}` under `secret`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_: list[str], message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one signature per active secret, space-separated."""
    return " ".join(sign(s, message_id, timestamp, body) for s in secrets_)
