"""`/admin/datasets`: datasets, their items and versions, and JSONL or CSV import and export."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile
from fastapi.responses import Response

from app.access.deps import AdminDep
from app.core.errors import InvalidInput
from app.core.provide import provide
from app.core.schemas import Deleted, PageAfter, PageLimit
from app.datasets.schemas import (
    DatasetCreate,
    DatasetList,
    DatasetRead,
    DatasetUpdate,
    DatasetVersionList,
    DatasetVersionRead,
    ExportFormat,
    ItemList,
    ItemRead,
    ItemsAdd,
    ItemUpdate,
)
from app.datasets.service import DatasetService

admin_router = APIRouter(prefix="/admin/datasets", tags=["admin: datasets"])

DatasetsDep = Annotated[DatasetService, Depends(provide(DatasetService))]

_MEDIA = {ExportFormat.JSONL: "application/jsonl", ExportFormat.CSV: "text/csv"}

AtVersion = Annotated[
    int | None,
    Query(ge=1, description="Read the dataset as it was at this version (default: the current)"),
]


@admin_router.post("", response_model=DatasetRead, status_code=201)
async def create_dataset(
    body: DatasetCreate, admin: AdminDep, datasets: DatasetsDep
) -> DatasetRead:
    """Create a dataset, with its first items if given."""
    return DatasetRead.of(await datasets.create(body))


@admin_router.get("", response_model=DatasetList)
async def list_datasets(
    admin: AdminDep, datasets: DatasetsDep, limit: PageLimit = 20, after: PageAfter = None
) -> DatasetList:
    """Datasets ordered by id."""
    return DatasetList.of(await datasets.list(limit=limit, after=after), DatasetRead.of)


@admin_router.get("/{dataset_id}", response_model=DatasetRead)
async def get_dataset(dataset_id: str, admin: AdminDep, datasets: DatasetsDep) -> DatasetRead:
    """One dataset."""
    return DatasetRead.of(await datasets.get(dataset_id))


@admin_router.patch("/{dataset_id}", response_model=DatasetRead)
async def update_dataset(
    dataset_id: str, body: DatasetUpdate, admin: AdminDep, datasets: DatasetsDep
) -> DatasetRead:
    """Rename or describe a dataset."""
    return DatasetRead.of(await datasets.update(dataset_id, body))


@admin_router.delete("/{dataset_id}", response_model=Deleted)
async def delete_dataset(dataset_id: str, admin: AdminDep, datasets: DatasetsDep) -> Deleted:
    """Delete a dataset and its items."""
    await datasets.delete(dataset_id)
    return Deleted(id=dataset_id, object="dataset")


@admin_router.get("/{dataset_id}/versions", response_model=DatasetVersionList)
async def list_versions(
    dataset_id: str,
    admin: AdminDep,
    datasets: DatasetsDep,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> DatasetVersionList:
    """A dataset's versions, the newest first: each change of its items made one."""
    page = await datasets.versions(dataset_id, limit=limit, after=after)
    return DatasetVersionList.of(page, DatasetVersionRead.of)


@admin_router.get("/{dataset_id}/items", response_model=ItemList)
async def list_items(
    dataset_id: str,
    admin: AdminDep,
    datasets: DatasetsDep,
    version: AtVersion = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> ItemList:
    """A dataset's items in order, now or at an earlier version."""
    page = await datasets.list_items(dataset_id, version=version, limit=limit, after=after)
    return ItemList.of(page, ItemRead.of)


@admin_router.patch("/{dataset_id}/items/{item_id}", response_model=ItemRead)
async def update_item(
    dataset_id: str, item_id: str, body: ItemUpdate, admin: AdminDep, datasets: DatasetsDep
) -> ItemRead:
    """Change one item (a new version of the dataset)."""
    return ItemRead.of(await datasets.update_item(dataset_id, item_id, body))


@admin_router.post("/{dataset_id}/items", response_model=DatasetRead)
async def add_items(
    dataset_id: str, body: ItemsAdd, admin: AdminDep, datasets: DatasetsDep
) -> DatasetRead:
    """Append items to a dataset."""
    return DatasetRead.of(await datasets.add_items(dataset_id, body.items))


@admin_router.delete("/{dataset_id}/items/{item_id}", response_model=DatasetRead)
async def delete_item(
    dataset_id: str, item_id: str, admin: AdminDep, datasets: DatasetsDep
) -> DatasetRead:
    """Remove one item."""
    return DatasetRead.of(await datasets.delete_item(dataset_id, item_id))


@admin_router.post("/{dataset_id}/import", response_model=DatasetRead)
async def import_items(
    dataset_id: str,
    admin: AdminDep,
    datasets: DatasetsDep,
    file: Annotated[
        UploadFile, File(description="JSONL: one item per line; CSV: a header, then variables")
    ],
    format: Annotated[ExportFormat, Query(description="How the file is written")] = (
        ExportFormat.JSONL
    ),
) -> DatasetRead:
    """Append the items of a JSONL or CSV file."""
    try:
        text = (await file.read()).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput("the file must be UTF-8", param="file") from exc
    return DatasetRead.of(await datasets.import_items(dataset_id, text, format))


@admin_router.get("/{dataset_id}/export")
async def export_items(
    dataset_id: str,
    admin: AdminDep,
    datasets: DatasetsDep,
    format: ExportFormat = ExportFormat.JSONL,
    version: AtVersion = None,
) -> Response:
    """The items as JSONL (what import reads) or CSV (prompt variables and `expected`), now or
    at an earlier version."""
    body = await datasets.export(dataset_id, format, version=version)
    return Response(body.encode(), media_type=_MEDIA[format])
