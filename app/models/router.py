"""`/v1/models` for clients, and `/admin/models` to manage the registry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.access.deps import AdminDep, PrincipalDep
from app.access.permissions import Resource
from app.core.provide import provide
from app.core.schemas import Deleted, PageAfter, PageLimit
from app.credentials.entities import Provider
from app.models.schemas import (
    ModelCreate,
    ModelList,
    ModelRead,
    ModelUpdate,
    OpenAIModel,
    OpenAIModelList,
)
from app.models.service import ModelService

router = APIRouter(tags=["models"])
admin_router = APIRouter(prefix="/admin/models", tags=["admin: models"])

ModelsDep = Annotated[ModelService, Depends(provide(ModelService))]


@router.get("/v1/models", response_model=OpenAIModelList)
async def list_models(principal: PrincipalDep, models: ModelsDep) -> OpenAIModelList:
    """The enabled models and chains this key may call."""
    callable_ = await models.list_callable()
    listed = [named for named in callable_ if principal.can_use(Resource.MODELS, named.id)]
    return OpenAIModelList(data=[OpenAIModel.of(named) for named in listed])


@router.get("/v1/models/{model_id}", response_model=OpenAIModel)
async def retrieve_model(model_id: str, principal: PrincipalDep, models: ModelsDep) -> OpenAIModel:
    """One enabled model or chain; an unknown or disabled one is a 404."""
    named = await models.get_callable(model_id)
    principal.ensure_can_use(Resource.MODELS, named.id, param="model")
    return OpenAIModel.of(named)


@admin_router.post("", response_model=ModelRead, status_code=201)
async def create_model(body: ModelCreate, admin: AdminDep, models: ModelsDep) -> ModelRead:
    """Register a model."""
    return ModelRead.of(await models.create(body))


@admin_router.get("", response_model=ModelList)
async def admin_list_models(
    admin: AdminDep,
    models: ModelsDep,
    provider: Provider | None = None,
    enabled: bool | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> ModelList:
    """Every model, enabled or not, ordered by id."""
    page = await models.list(provider=provider, enabled=enabled, limit=limit, after=after)
    return ModelList.of(page, ModelRead.of)


@admin_router.get("/{model_id}", response_model=ModelRead)
async def get_model(model_id: str, admin: AdminDep, models: ModelsDep) -> ModelRead:
    """One model with its configuration and prices."""
    return ModelRead.of(await models.get(model_id))


@admin_router.patch("/{model_id}", response_model=ModelRead)
async def update_model(
    model_id: str, body: ModelUpdate, admin: AdminDep, models: ModelsDep
) -> ModelRead:
    """Change a model; fields left out are kept."""
    return ModelRead.of(await models.update(model_id, body))


@admin_router.delete("/{model_id}", response_model=Deleted)
async def delete_model(model_id: str, admin: AdminDep, models: ModelsDep) -> Deleted:
    """Delete a model."""
    await models.delete(model_id)
    return Deleted(id=model_id, object="model")
