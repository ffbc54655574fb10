"""The app_configurations table: runtime settings an administrator can change without a restart."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from app.storage.entity import Entity, choice, json_value, pk, text


class ConfigValueType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    BOOLEAN = "boolean"
    STRING_LIST = "string_list"
    JSON = "json"


class ConfigCategory(StrEnum):
    GENERAL = "general"
    PERSISTENCE = "persistence"
    LOGGING = "logging"
    SECURITY = "security"
    CACHE = "cache"
    RATE_LIMIT = "rate_limit"
    RETENTION = "retention"


class AppConfiguration(Entity, table=True):
    """One setting, keyed by a dotted name; an update must keep its value type."""

    __tablename__ = "app_configurations"

    key: str = pk(max_length=100)
    value: Any = json_value()
    value_type: ConfigValueType = choice(ConfigValueType)
    category: ConfigCategory = choice(ConfigCategory, ConfigCategory.GENERAL, index=True)
    description: str | None = text(None)
