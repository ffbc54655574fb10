"""The workflow tables: multi-step workflows, and the external HTTP APIs their steps call."""

from __future__ import annotations

from typing import Any

from app.storage.entity import Entity, json_list, json_object, json_value, pk, reference, text


class Workflow(Entity, table=True):
    """A named sequence of steps (chat calls, searches, conditions, HTTP requests)."""

    __tablename__ = "workflows"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    input_schema: Any = json_value()
    steps: list[dict[str, Any]] = json_list()
    # Incremented whenever the steps change, so a run records which definition it followed.
    workflow_version: int = 1
    enabled: bool = True


class ExternalApi(Entity, table=True):
    """An HTTP API workflow steps may call: its base URL, fixed headers and credential."""

    __tablename__ = "external_apis"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    base_url: str = text()
    # Non-secret headers only; a secret header comes from the credential.
    base_headers: dict[str, str] = json_object()
    credential_id: str | None = reference("credentials.id", on_delete="RESTRICT", nullable=True)
    enabled: bool = True
