"""App configuration: typed runtime settings, validated on update, cached in every process."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.core.errors import InvalidInput, NotFound
from app.core.invalidation import ALL, InvalidatedCache, InvalidationBus
from app.settings.entities import AppConfiguration, ConfigCategory, ConfigValueType
from app.settings.registry import REGISTRY, ConfigItem
from app.storage.protocol import Storage, UnitOfWork, Where

CONFIG_TOPIC = "app_config"
CONFIG_CACHE_SECONDS = 30.0
_MAX_STRING = 10_000


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    """A setting's definition with its current value (`updated_at` None: the default)."""

    item: ConfigItem
    value: Any
    updated_at: datetime | None


class ConfigService:
    """Reads (cached) and validated writes of the settings defined in the registry."""

    def __init__(
        self,
        storage: Storage,
        bus: InvalidationBus,
        *,
        registry: Mapping[str, ConfigItem] = REGISTRY,
        cache_seconds: float = CONFIG_CACHE_SECONDS,
    ) -> None:
        self._storage = storage
        self._bus = bus
        self._registry = registry
        self._cache: InvalidatedCache[dict[str, Any]] = InvalidatedCache(
            bus, CONFIG_TOPIC, ttl=cache_seconds
        )

    async def get(self, key: str) -> Any:
        """The current value of `key` (its default until an administrator changes it)."""
        self.definition(key)
        return (await self.values())[key]

    async def values(self) -> dict[str, Any]:
        """Every setting's current value, from the cache when it is fresh."""
        cached = self._cache.get(ALL)
        if cached is not None:
            return cached
        generation = self._cache.generation
        async with self._storage.unit_of_work() as uow:
            rows = await self._rows(uow)
        values = {key: item.default for key, item in self._registry.items()}
        values.update({key: row.value for key, row in rows.items()})
        self._cache.fill(ALL, values, generation)
        return values

    async def entries(self, *, category: ConfigCategory | None = None) -> list[ConfigEntry]:
        """Every setting with its definition and current value, read from the database."""
        async with self._storage.unit_of_work() as uow:
            rows = await self._rows(uow)
        return [
            _entry(item, rows.get(key))
            for key, item in sorted(self._registry.items())
            if category is None or item.category is category
        ]

    async def entry(self, key: str) -> ConfigEntry:
        item = self.definition(key)
        async with self._storage.unit_of_work() as uow:
            row = await uow.repo(AppConfiguration).get(key)
        return _entry(item, row)

    async def update(self, values: Mapping[str, Any]) -> list[ConfigEntry]:
        """Set several settings at once: all are validated before any is written."""
        if not values:
            raise InvalidInput("give at least one setting to change", param="values")
        unknown = [key for key in values if key not in self._registry]
        if unknown:
            raise InvalidInput(f"there is no setting named '{unknown[0]}'", param=unknown[0])
        checked = {key: validate(self._registry[key], value) for key, value in values.items()}
        entries = []
        async with self._storage.unit_of_work() as uow:
            repo = uow.repo(AppConfiguration)
            for key, value in checked.items():
                item = self._registry[key]
                row = await repo.get(key)
                if row is None:
                    row = await repo.add(
                        AppConfiguration(
                            key=key,
                            value=value,
                            value_type=item.value_type,
                            category=item.category,
                            description=item.description,
                        )
                    )
                else:
                    row.value = value
                    row.value_type = item.value_type
                    row = await repo.update(row)
                entries.append(_entry(item, row))
            await uow.commit()
        await self._bus.publish(CONFIG_TOPIC)
        return entries

    async def reset(self, key: str) -> ConfigEntry:
        """Back to the default value."""
        item = self.definition(key)
        async with self._storage.unit_of_work() as uow:
            await uow.repo(AppConfiguration).delete(key)
            await uow.commit()
        await self._bus.publish(CONFIG_TOPIC)
        return _entry(item, None)

    def definition(self, key: str) -> ConfigItem:
        """The registry entry of `key`; `NotFound` for a name that is not a setting."""
        item = self._registry.get(key)
        if item is None:
            raise NotFound("setting", key, param="key")
        return item

    async def _rows(self, uow: UnitOfWork) -> dict[str, AppConfiguration]:
        page = await uow.repo(AppConfiguration).find(Where.in_("key", list(self._registry)))
        return {row.key: row for row in page.items}


def _entry(item: ConfigItem, row: AppConfiguration | None) -> ConfigEntry:
    if row is None:
        return ConfigEntry(item, item.default, None)
    return ConfigEntry(item, row.value, row.updated_at)


_TYPE_NAMES = {
    ConfigValueType.STRING: "a string",
    ConfigValueType.INTEGER: "an integer",
    ConfigValueType.FLOAT: "a number",
    ConfigValueType.BOOLEAN: "true or false",
    ConfigValueType.STRING_LIST: "a list of strings",
    ConfigValueType.JSON: "any JSON value",
}


def validate(item: ConfigItem, value: Any) -> Any:
    """`value` if it has the setting's type and lies in its range; `InvalidInput` naming it."""
    kind = item.value_type
    ok = {
        ConfigValueType.BOOLEAN: isinstance(value, bool),
        ConfigValueType.INTEGER: isinstance(value, int) and not isinstance(value, bool),
        ConfigValueType.FLOAT: isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value),
        ConfigValueType.STRING: isinstance(value, str) and len(value) <= _MAX_STRING,
        ConfigValueType.STRING_LIST: isinstance(value, list)
        and all(isinstance(v, str) for v in value),
        ConfigValueType.JSON: True,
    }[kind]
    if not ok:
        raise InvalidInput(
            f"'{item.key}' must be {_TYPE_NAMES[kind]}, not {_describe(value)}", param=item.key
        )
    if kind in (ConfigValueType.INTEGER, ConfigValueType.FLOAT):
        low = item.minimum if item.minimum is not None else -math.inf
        high = item.maximum if item.maximum is not None else math.inf
        if not low <= value <= high:
            raise InvalidInput(
                f"'{item.key}' must be between {_number(low)} and {_number(high)}, not {value}",
                param=item.key,
            )
        return float(value) if kind is ConfigValueType.FLOAT else value
    if kind is ConfigValueType.STRING and item.choices and value not in item.choices:
        raise InvalidInput(
            f"'{item.key}' must be one of {', '.join(item.choices)}, not '{value}'",
            param=item.key,
        )
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "an object"
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
