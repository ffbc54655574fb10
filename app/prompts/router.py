"""`/admin/prompts`: prompts, their versions and labels, and a render preview."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from app.access.deps import AdminDep
from app.core.provide import provide
from app.core.schemas import Deleted, PageAfter, PageLimit
from app.prompts.schemas import (
    LABEL_PATTERN,
    LabelMove,
    PromptCreate,
    PromptList,
    PromptRead,
    PromptUpdate,
    PromptVersionList,
    PromptVersionRead,
    RenderRead,
    RenderRequest,
)
from app.prompts.service import PromptService

admin_router = APIRouter(prefix="/admin/prompts", tags=["admin: prompts"])

PromptsDep = Annotated[PromptService, Depends(provide(PromptService))]

LabelPath = Annotated[str, Path(pattern=LABEL_PATTERN)]
VersionPath = Annotated[int, Path(ge=1)]


@admin_router.post("", response_model=PromptRead, status_code=201)
async def create_prompt(body: PromptCreate, admin: AdminDep, prompts: PromptsDep) -> PromptRead:
    """Create a prompt; its content becomes version 1."""
    return PromptRead.of(await prompts.create(body))


@admin_router.get("", response_model=PromptList)
async def list_prompts(
    admin: AdminDep,
    prompts: PromptsDep,
    enabled: bool | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> PromptList:
    """Prompts ordered by id."""
    page = await prompts.list(enabled=enabled, limit=limit, after=after)
    return PromptList.of(page, PromptRead.of)


@admin_router.get("/{prompt_id}", response_model=PromptRead)
async def get_prompt(prompt_id: str, admin: AdminDep, prompts: PromptsDep) -> PromptRead:
    """A prompt at its current version."""
    return PromptRead.of(await prompts.get(prompt_id))


@admin_router.patch("/{prompt_id}", response_model=PromptRead)
async def update_prompt(
    prompt_id: str, body: PromptUpdate, admin: AdminDep, prompts: PromptsDep
) -> PromptRead:
    """Change a prompt; new content is saved as a new version."""
    return PromptRead.of(await prompts.update(prompt_id, body))


@admin_router.delete("/{prompt_id}", response_model=Deleted)
async def delete_prompt(prompt_id: str, admin: AdminDep, prompts: PromptsDep) -> Deleted:
    """Delete a prompt and every version of it."""
    await prompts.delete(prompt_id)
    return Deleted(id=prompt_id, object="prompt")


@admin_router.get("/{prompt_id}/versions", response_model=PromptVersionList)
async def list_prompt_versions(
    prompt_id: str,
    admin: AdminDep,
    prompts: PromptsDep,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> PromptVersionList:
    """The versions kept, newest first."""
    page, labels = await prompts.list_versions(prompt_id, limit=limit, after=after)
    return PromptVersionList.of(page, lambda v: PromptVersionRead.of(v, labels))


@admin_router.get("/{prompt_id}/versions/{version}", response_model=PromptVersionRead)
async def get_prompt_version(
    prompt_id: str, version: VersionPath, admin: AdminDep, prompts: PromptsDep
) -> PromptVersionRead:
    """One version of a prompt."""
    stored, labels = await prompts.get_version(prompt_id, version)
    return PromptVersionRead.of(stored, labels)


@admin_router.post("/{prompt_id}/versions/{version}/restore", response_model=PromptRead)
async def restore_prompt_version(
    prompt_id: str, version: VersionPath, admin: AdminDep, prompts: PromptsDep
) -> PromptRead:
    """Save an older version's content as a new version."""
    return PromptRead.of(await prompts.restore(prompt_id, version))


@admin_router.put("/{prompt_id}/labels/{label}", response_model=PromptRead)
async def set_prompt_label(
    prompt_id: str, label: LabelPath, body: LabelMove, admin: AdminDep, prompts: PromptsDep
) -> PromptRead:
    """Point a label (e.g. `production`) at a version."""
    return PromptRead.of(await prompts.set_label(prompt_id, label, body.version))


@admin_router.delete("/{prompt_id}/labels/{label}", response_model=PromptRead)
async def remove_prompt_label(
    prompt_id: str, label: LabelPath, admin: AdminDep, prompts: PromptsDep
) -> PromptRead:
    """Remove a label."""
    return PromptRead.of(await prompts.remove_label(prompt_id, label))


@admin_router.post("/{prompt_id}/render", response_model=RenderRead)
async def render_prompt(
    prompt_id: str, body: RenderRequest, admin: AdminDep, prompts: PromptsDep
) -> RenderRead:
    """Render a version (`production` unless a label or version is given) with variables."""
    rendered = await prompts.render(
        prompt_id, body.variables, label=body.label, version=body.version
    )
    return RenderRead(
        prompt_id=rendered.prompt_id, version=rendered.version, rendered=rendered.text
    )
