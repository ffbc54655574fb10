"""Symmetric encryption of stored secrets, with key rotation (Fernet under the hood)."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class UndecryptableSecret(Exception):
    """A stored ciphertext that none of the configured keys can open."""


def _fernet_key(key: str) -> bytes:
    # Any string can be a setting; hashing turns it into the 32 bytes Fernet needs.
    return base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest())


class SecretBox:
    """Encrypts with the first key and decrypts with any, so keys can be rotated in place."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("SecretBox needs at least one key")
        self._fernet = MultiFernet([Fernet(_fernet_key(k)) for k in keys])

    def encrypt(self, plaintext: str) -> str:
        """The ciphertext of `plaintext` under the newest key."""
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        """The plaintext of `token`, whichever configured key encrypted it."""
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise UndecryptableSecret("no configured SECRET_KEY can decrypt this secret") from exc

    def rotate(self, token: str) -> str:
        """`token` re-encrypted under the newest key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken as exc:
            raise UndecryptableSecret("no configured SECRET_KEY can decrypt this secret") from exc
