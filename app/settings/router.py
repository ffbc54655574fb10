"""`/admin/config`: read and change the runtime settings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.access.deps import AdminDep
from app.core.provide import provide
from app.settings.entities import ConfigCategory
from app.settings.schemas import ConfigBulkUpdate, ConfigList, ConfigRead, ConfigValueUpdate
from app.settings.service import ConfigService

router = APIRouter(prefix="/admin/config", tags=["admin: configuration"])

ConfigDep = Annotated[ConfigService, Depends(provide(ConfigService))]


@router.get("", response_model=ConfigList)
async def list_config(
    admin: AdminDep, config: ConfigDep, category: ConfigCategory | None = None
) -> ConfigList:
    """Every setting with its value, default, type and accepted range."""
    entries = await config.entries(category=category)
    return ConfigList(data=[ConfigRead.of(e) for e in entries])


@router.patch("", response_model=ConfigList)
async def update_config(body: ConfigBulkUpdate, admin: AdminDep, config: ConfigDep) -> ConfigList:
    """Change several settings at once; nothing is written unless every value is valid."""
    entries = await config.update(body.values)
    return ConfigList(data=[ConfigRead.of(e) for e in entries])


@router.get("/{key}", response_model=ConfigRead)
async def get_config(key: str, admin: AdminDep, config: ConfigDep) -> ConfigRead:
    """One setting."""
    return ConfigRead.of(await config.entry(key))


@router.put("/{key}", response_model=ConfigRead)
async def set_config(
    key: str, body: ConfigValueUpdate, admin: AdminDep, config: ConfigDep
) -> ConfigRead:
    """Change one setting; the value must have the setting's type and lie in its range."""
    config.definition(key)  # an unknown name is 404 here, as on GET
    (entry,) = await config.update({key: body.value})
    return ConfigRead.of(entry)


@router.delete("/{key}", response_model=ConfigRead)
async def reset_config(key: str, admin: AdminDep, config: ConfigDep) -> ConfigRead:
    """Put a setting back to its default."""
    return ConfigRead.of(await config.reset(key))
