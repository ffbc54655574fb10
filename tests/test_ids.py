"""Generated identifiers: `<prefix>-<uuid4>`, valid by the rule the API checks ids with."""

from __future__ import annotations

import uuid

from app.core.ids import check_prefixed, new_id


def test_a_new_id_is_the_prefix_and_a_version_4_uuid_the_api_accepts() -> None:
    for _ in range(200):
        value = new_id("op")
        prefix, _, text = value.partition("-")
        parsed = uuid.UUID(text)
        assert prefix == "op"
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert check_prefixed("operation", "op", value) == value


def test_new_ids_do_not_repeat() -> None:
    assert len({new_id("log") for _ in range(10_000)}) == 10_000
