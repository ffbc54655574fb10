"""Response shapes shared by several domains."""

from __future__ import annotations

from pydantic import BaseModel


class Deleted(BaseModel):
    """OpenAI's answer to a delete: `{"id", "object", "deleted": true}`."""

    id: str
    object: str
    deleted: bool = True
