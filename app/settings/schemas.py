"""Shapes of the app configuration admin API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.settings.entities import ConfigCategory, ConfigValueType
from app.settings.service import ConfigEntry


class ConfigValueUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: Any = Field(description="The new value, of the setting's type.")


class ConfigBulkUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: dict[str, Any] = Field(description="Setting names and their new values.")


class ConfigRead(BaseModel):
    key: str
    object: Literal["config"] = "config"
    value: Any
    default: Any
    is_default: bool
    value_type: ConfigValueType
    category: ConfigCategory
    description: str
    minimum: float | None
    maximum: float | None
    choices: list[str] | None
    updated_at: datetime | None

    @classmethod
    def of(cls, entry: ConfigEntry) -> ConfigRead:
        item = entry.item
        return cls(
            key=item.key,
            value=entry.value,
            default=item.default,
            is_default=entry.updated_at is None,
            value_type=item.value_type,
            category=item.category,
            description=item.description,
            minimum=item.minimum,
            maximum=item.maximum,
            choices=list(item.choices) if item.choices else None,
            updated_at=entry.updated_at,
        )


class ConfigList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ConfigRead]
