"""The prompt tables: a template's current state, and every version it has had."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from app.storage.entity import Entity, json_list, json_object, json_value, pk, reference, text


class Prompt(Entity, table=True):
    """A prompt template with `${var:name}` placeholders, at its current version."""

    __tablename__ = "prompts"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    content: str = text()
    current_version: int = 1
    # Named pointers to versions, e.g. {"production": 3}, so callers can pin one.
    labels: dict[str, int] = json_object()
    # The placeholders found in `content`: name, whether required, and default.
    variables: list[dict[str, Any]] = json_list()
    tags: list[str] = json_list()
    output_schema: Any = json_value()
    # How many versions to keep; 0 keeps them all.
    max_history: int = 10
    enabled: bool = True


class PromptVersion(Entity, table=True):
    """The content of one version of a prompt, kept so it can be shown, compared or restored."""

    __tablename__ = "prompt_versions"
    __table_args__ = (
        sa.UniqueConstraint(
            "prompt_id", "prompt_version", name="uq_prompt_versions_prompt_id_prompt_version"
        ),
    )

    id: str = pk()
    # The unique key leads with prompt_id, so it serves lookups by prompt as well.
    prompt_id: str = reference("prompts.id", index=False)
    # Not `version`: that column is the row's own optimistic-concurrency counter.
    prompt_version: int
    content: str = text()
    message: str | None = text(None)
