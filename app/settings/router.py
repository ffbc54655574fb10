"""`/admin/config`: read and change the runtime settings."""

from __future__ import annotations

from fastapi import APIRouter

from app.access.deps import AdminDep, ServicesDep
from app.settings.entities import ConfigCategory
from app.settings.schemas import ConfigBulkUpdate, ConfigList, ConfigRead, ConfigValueUpdate

router = APIRouter(prefix="/admin/config", tags=["admin: configuration"])


@router.get("", response_model=ConfigList)
async def list_config(
    admin: AdminDep, services: ServicesDep, category: ConfigCategory | None = None
) -> ConfigList:
    """Every setting with its value, default, type and accepted range."""
    entries = await services.config.entries(category=category)
    return ConfigList(data=[ConfigRead.of(e) for e in entries])


@router.patch("", response_model=ConfigList)
async def update_config(
    body: ConfigBulkUpdate, admin: AdminDep, services: ServicesDep
) -> ConfigList:
    """Change several settings at once; nothing is written unless every value is valid."""
    entries = await services.config.update(body.values)
    return ConfigList(data=[ConfigRead.of(e) for e in entries])


@router.get("/{key}", response_model=ConfigRead)
async def get_config(key: str, admin: AdminDep, services: ServicesDep) -> ConfigRead:
    """One setting."""
    return ConfigRead.of(await services.config.entry(key))


@router.put("/{key}", response_model=ConfigRead)
async def set_config(
    key: str, body: ConfigValueUpdate, admin: AdminDep, services: ServicesDep
) -> ConfigRead:
    """Change one setting; the value must have the setting's type and lie in its range."""
    services.config.definition(key)  # an unknown name is 404 here, as on GET
    (entry,) = await services.config.update({key: body.value})
    return ConfigRead.of(entry)


@router.delete("/{key}", response_model=ConfigRead)
async def reset_config(key: str, admin: AdminDep, services: ServicesDep) -> ConfigRead:
    """Put a setting back to its default."""
    return ConfigRead.of(await services.config.reset(key))
