"""Session tokens (JWT): HS256 with a key derived from SECRET_KEY, or RS256 with a private key.

Both keys come from settings, so tokens stay valid across restarts and API processes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from app.config import JwtAlgorithm, Settings
from app.core.clock import utcnow
from app.core.errors import Unauthenticated

ISSUER = "llm-gateway"
AUDIENCE = "llm-gateway-admin"
_HS256_CONTEXT = b"llm-gateway session tokens"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says: whose session it is and until when."""

    user_id: str
    token_id: str
    expires_at: datetime


def looks_like_token(credential: str) -> bool:
    """A JWT (three base64url parts, a JSON header) rather than an API key."""
    return credential.startswith("eyJ") and credential.count(".") == 2


def _kid(public_key: RSAPublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:12]).decode().rstrip("=")


class TokenCodec:
    """Issues and verifies session tokens with the keys the settings describe."""

    def __init__(self, settings: Settings) -> None:
        self.lifetime = timedelta(seconds=settings.JWT_TTL_SECONDS)
        self._algorithm = settings.JWT_ALGORITHM.value
        self._signing_key: Any
        self._kid: str | None = None
        self._verify_keys: dict[str | None, list[Any]] = {}
        if settings.JWT_ALGORITHM is JwtAlgorithm.HS256:
            # Every SECRET_KEY in the rotation list verifies; the first signs.
            derived = [
                hmac.new(k.encode(), _HS256_CONTEXT, hashlib.sha256).digest()
                for k in settings.secret_keys()
            ]
            self._signing_key = derived[0]
            self._verify_keys[None] = derived
            return
        assert settings.JWT_PRIVATE_KEY is not None  # the settings refuse RS256 without it
        private = serialization.load_pem_private_key(
            settings.JWT_PRIVATE_KEY.get_secret_value().encode(), password=None
        )
        if not isinstance(private, RSAPrivateKey):
            raise ValueError("JWT_PRIVATE_KEY must be an RSA private key")
        self._signing_key = private
        self._kid = _kid(private.public_key())
        self._verify_keys[self._kid] = [private.public_key()]
        if settings.JWT_JWKS:
            for jwk in jwt.PyJWKSet.from_json(settings.JWT_JWKS).keys:
                self._verify_keys.setdefault(jwk.key_id, []).append(jwk.key)

    def issue(self, user_id: str) -> tuple[str, TokenClaims]:
        now = utcnow().replace(microsecond=0)
        claims = TokenClaims(user_id, uuid.uuid4().hex, now + self.lifetime)
        payload = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": user_id,
            "jti": claims.token_id,
            "iat": int(now.timestamp()),
            "exp": int(claims.expires_at.timestamp()),
        }
        headers = {"kid": self._kid} if self._kid else None
        token = jwt.encode(payload, self._signing_key, algorithm=self._algorithm, headers=headers)
        return token, claims

    def verify(self, token: str) -> TokenClaims:
        """The claims of a token this gateway issued and that has not expired."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("Invalid session token") from None
        if header.get("alg") != self._algorithm:
            raise Unauthenticated("Invalid session token")
        keys = self._verify_keys.get(header.get("kid") if self._kid else None, [])
        for key in keys:
            try:
                payload = jwt.decode(
                    token,
                    key,
                    algorithms=[self._algorithm],
                    issuer=ISSUER,
                    audience=AUDIENCE,
                    options={"require": ["exp", "iat", "sub", "jti"]},
                )
            except jwt.ExpiredSignatureError:
                raise Unauthenticated("Session token has expired") from None
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError:
                break
            expires_at = datetime.fromtimestamp(int(payload["exp"]), UTC)
            return TokenClaims(str(payload["sub"]), str(payload["jti"]), expires_at)
        raise Unauthenticated("Invalid session token")
