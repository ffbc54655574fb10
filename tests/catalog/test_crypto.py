"""SecretBox: encryption round trip and key rotation."""

from __future__ import annotations

import pytest

from app.core.crypto import SecretBox, UndecryptableSecret


def test_a_secret_round_trips_and_the_ciphertext_does_not_contain_it() -> None:
    box = SecretBox(["key-one"])
    token = box.encrypt("sk-live-abcdef")
    assert "sk-live-abcdef" not in token
    assert box.decrypt(token) == "sk-live-abcdef"


def test_the_same_secret_encrypts_differently_each_time() -> None:
    box = SecretBox(["key-one"])
    assert box.encrypt("same") != box.encrypt("same")


def test_any_configured_key_decrypts_and_the_first_encrypts() -> None:
    old_token = SecretBox(["old"]).encrypt("s3cret")
    rotated_box = SecretBox(["new", "old"])
    assert rotated_box.decrypt(old_token) == "s3cret"
    new_token = rotated_box.encrypt("s3cret")
    assert SecretBox(["new"]).decrypt(new_token) == "s3cret"
    with pytest.raises(UndecryptableSecret):
        SecretBox(["old"]).decrypt(new_token)


def test_rotate_re_encrypts_under_the_newest_key() -> None:
    old_token = SecretBox(["old"]).encrypt("s3cret")
    rotated = SecretBox(["new", "old"]).rotate(old_token)
    assert SecretBox(["new"]).decrypt(rotated) == "s3cret"


def test_an_unknown_key_or_garbage_is_refused() -> None:
    token = SecretBox(["one"]).encrypt("x")
    with pytest.raises(UndecryptableSecret):
        SecretBox(["two"]).decrypt(token)
    with pytest.raises(UndecryptableSecret):
        SecretBox(["one"]).decrypt("not-a-token")


def test_at_least_one_key_is_required() -> None:
    with pytest.raises(ValueError):
        SecretBox([])
