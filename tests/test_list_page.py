"""The shared list envelope of our own paged endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings
from app.core.schemas import ListPage
from app.main import create_app
from app.prompts.entities import Prompt
from app.prompts.schemas import PromptList, PromptRead
from app.storage.memory import MemoryStorage
from app.storage.protocol import Page
from tests.factories import build


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_a_page_with_a_cursor_has_more_and_maps_every_item() -> None:
    prompts = [build(Prompt, variables=[]), build(Prompt, variables=[])]

    body = PromptList.of(Page(items=prompts, next_cursor="c1"), PromptRead.of).model_dump()

    assert body["object"] == "list"
    assert [p["id"] for p in body["data"]] == [p.id for p in prompts]
    assert body["has_more"] is True
    assert body["next_cursor"] == "c1"
    assert set(body) == {"object", "data", "has_more", "next_cursor"}


def test_the_last_page_has_no_more_and_no_cursor() -> None:
    page = PromptList.of(Page(items=[build(Prompt, variables=[])], next_cursor=None), PromptRead.of)

    assert page.has_more is False
    assert page.next_cursor is None


def test_openapi_names_each_list_after_its_domain_not_the_generic() -> None:
    app = create_app(Settings(), storage=MemoryStorage())

    components = app.openapi()["components"]["schemas"]

    assert "PromptList" in components
    assert components["PromptList"]["properties"]["data"]["items"] == {
        "$ref": "#/components/schemas/PromptRead"
    }
    assert not [name for name in components if name.startswith(ListPage.__name__)]
