"""Datasets: items added, imported (JSONL, CSV), changed, listed, removed and exported, each
change a new version, and every version readable, so a batch runs on the version it was
submitted on whatever changes meanwhile."""

from __future__ import annotations

import builtins
import csv
import io
import logging
from collections.abc import Sequence

import orjson
from pydantic import ValidationError

from app.core.errors import Conflict, DuplicateKey, InvalidInput, NotFound
from app.core.ids import check_prefixed, new_id
from app.datasets.entities import CURRENT, Dataset, DatasetChange, DatasetItem, DatasetVersion
from app.datasets.schemas import (
    MAX_ITEMS,
    DatasetCreate,
    DatasetUpdate,
    ExportFormat,
    ItemCreate,
    ItemUpdate,
)
from app.storage.protocol import Page, Storage, UnitOfWork, Where
from app.storage.reads import delete_existing, get_existing, read_existing, read_page

log = logging.getLogger(__name__)

ITEM_ID_PREFIX = "item"
EXPECTED_COLUMN = "expected"


def _refused(where: str, exc: ValidationError) -> InvalidInput:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ()))
    return InvalidInput(f"{where}: {field or 'item'}: {first.get('msg')}", param="file")


def parse_jsonl(text: str) -> list[ItemCreate]:
    """Items of a JSONL file, one `{"input", "expected"?, "metadata"?}` object per line."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(ItemCreate.model_validate(orjson.loads(line)))
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"line {number}: not JSON ({exc})", param="file") from exc
        except ValidationError as exc:
            raise _refused(f"line {number}", exc) from exc
    return items


def parse_csv(text: str) -> list[ItemCreate]:
    """Items of a CSV file with a header: every column a prompt variable, but `expected`."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise InvalidInput("the CSV file has no header row", param="file")
    items = []
    for number, row in enumerate(reader, start=2):
        if None in row:
            raise InvalidInput(f"line {number}: more values than columns", param="file")
        expected = row.pop(EXPECTED_COLUMN, None)
        try:
            items.append(
                ItemCreate.model_validate(
                    {"input": {"variables": row}, "expected": expected or None}
                )
            )
        except ValidationError as exc:
            raise _refused(f"line {number}", exc) from exc
    return items


def export(items: Sequence[DatasetItem], form: ExportFormat) -> str:
    """The items as JSONL (what import reads back) or CSV (prompt variables and `expected`)."""
    if form is ExportFormat.JSONL:
        return "".join(
            orjson.dumps({"input": i.input, "expected": i.expected, "metadata": i.meta}).decode()
            + "\n"
            for i in items
        )
    columns: dict[str, None] = {}
    for item in items:
        if "variables" not in item.input:
            raise InvalidInput(
                f"item {item.id} holds messages, which CSV cannot; export as jsonl",
                param="format",
            )
        columns.update(dict.fromkeys(item.input["variables"]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, EXPECTED_COLUMN])
    for item in items:
        values = item.input["variables"]
        expected = item.expected
        if expected is not None and not isinstance(expected, str):
            expected = orjson.dumps(expected).decode()
        writer.writerow([_cell(values.get(c)) for c in columns] + [expected or ""])
    return out.getvalue()


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _at(dataset_id: str, version: int | None) -> list[Where]:
    """The conditions of the item rows of a dataset as it was at `version` (None: now)."""
    mine = Where.eq("dataset_id", dataset_id)
    if version is None:
        return [mine, Where.eq("valid_to", CURRENT)]
    return [mine, Where.le("valid_from", version), Where.gt("valid_to", version)]


def version_id(dataset_id: str, number: int) -> str:
    return f"{dataset_id}@{number}"


class DatasetService:
    """Create, change and read datasets and their items, at any version."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def create(self, data: DatasetCreate) -> Dataset:
        """A new dataset with the items given (version 1)."""
        dataset = Dataset(id=data.id, name=data.name, description=data.description)
        try:
            async with self._storage.unit_of_work() as uow:
                await uow.repo(Dataset).add(dataset)
                if data.items:
                    await self._add_rows(uow, dataset, data.items, version=1)
                    dataset.item_count = len(data.items)
                    dataset = await uow.repo(Dataset).update(dataset)
                await self._record(uow, dataset, DatasetChange.CREATED, len(data.items))
                await uow.commit()
        except DuplicateKey as exc:
            raise Conflict(f"dataset '{data.id}' already exists", param="id") from exc
        return dataset

    async def get(self, dataset_id: str, *, param: str | None = None) -> Dataset:
        return await read_existing(self._storage, Dataset, dataset_id, "dataset", param=param)

    async def list(self, *, limit: int = 20, after: str | None = None) -> Page[Dataset]:
        """Datasets by id, a page at a time."""
        return await read_page(self._storage, Dataset, order_by=["id"], limit=limit, after=after)

    async def update(self, dataset_id: str, changes: DatasetUpdate) -> Dataset:
        """Rename or describe a dataset (its items are changed by the item calls)."""
        async with self._storage.unit_of_work() as uow:
            dataset = await get_existing(uow.repo(Dataset), dataset_id, "dataset")
            for name in changes.model_fields_set:
                setattr(dataset, name, getattr(changes, name))
            dataset = await uow.repo(Dataset).update(dataset)
            await uow.commit()
        return dataset

    async def delete(self, dataset_id: str) -> None:
        """Remove a dataset with every version of its items; records of batches run on it
        stay."""
        async with self._storage.unit_of_work() as uow:
            await delete_existing(uow.repo(Dataset), dataset_id, "dataset")
            await uow.commit()

    # ---- versions ------------------------------------------------------------------------

    async def versions(
        self, dataset_id: str, *, limit: int = 20, after: str | None = None
    ) -> Page[DatasetVersion]:
        """A dataset's versions, the newest first."""
        await self.get(dataset_id)
        return await read_page(
            self._storage,
            DatasetVersion,
            Where.eq("dataset_id", dataset_id),
            order_by=["-number"],
            limit=limit,
            after=after,
        )

    async def get_version(
        self, dataset_id: str, version: int | None = None, *, param: str = "version"
    ) -> DatasetVersion:
        """One version of a dataset (None: the current one)."""
        dataset = await self.get(dataset_id)
        number = dataset.current_version if version is None else version
        async with self._storage.unit_of_work() as uow:
            found = await uow.repo(DatasetVersion).get(version_id(dataset_id, number))
        if found is None:
            raise NotFound("dataset version", f"{dataset_id}@{number}", param=param)
        return found

    async def check_version(self, dataset_id: str, version: int | None) -> int:
        """The version asked (None: the current one), which must be one of the dataset's."""
        return (await self.get_version(dataset_id, version)).number

    # ---- items ---------------------------------------------------------------------------

    async def add_items(
        self,
        dataset_id: str,
        items: Sequence[ItemCreate],
        *,
        change: DatasetChange = DatasetChange.ITEMS_ADDED,
    ) -> Dataset:
        """Append items (after the last position) as a new version."""
        async with self._storage.unit_of_work() as uow:
            dataset = await get_existing(uow.repo(Dataset), dataset_id, "dataset")
            if dataset.item_count + len(items) > MAX_ITEMS:
                raise InvalidInput(
                    f"a dataset holds at most {MAX_ITEMS} items; '{dataset.id}' has "
                    f"{dataset.item_count} and {len(items)} more were given",
                    param="items",
                )
            dataset = await self._next(uow, dataset, len(items))
            await self._add_rows(uow, dataset, items, version=dataset.current_version)
            await self._record(uow, dataset, change, len(items))
            await uow.commit()
        return dataset

    async def import_items(self, dataset_id: str, text: str, form: ExportFormat) -> Dataset:
        """Append the items of a JSONL or CSV file, as a new version."""
        items = parse_jsonl(text) if form is ExportFormat.JSONL else parse_csv(text)
        if not items:
            raise InvalidInput("the file holds no item", param="file")
        return await self.add_items(dataset_id, items, change=DatasetChange.IMPORTED)

    async def list_items(
        self,
        dataset_id: str,
        *,
        version: int | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[DatasetItem]:
        """A dataset's items in order, as they are now or were at `version`."""
        version = await self.check_version(dataset_id, version)
        return await read_page(
            self._storage,
            DatasetItem,
            *_at(dataset_id, version),
            order_by=["position"],
            limit=limit,
            after=after,
        )

    async def items(
        self, dataset_id: str, *, version: int | None = None
    ) -> builtins.list[DatasetItem]:
        """Every item of a dataset in order, as it is now or was at `version`."""
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(DatasetItem).find(
                *_at(dataset_id, version), order_by=["position"]
            )
        return page.items

    async def update_item(self, dataset_id: str, item_id: str, changes: ItemUpdate) -> DatasetItem:
        """Change one item, as a new version (the item as it was stays in the earlier ones)."""
        async with self._storage.unit_of_work() as uow:
            dataset, row = await self._current_item(uow, dataset_id, item_id)
            dataset = await self._next(uow, dataset, 0)
            version = dataset.current_version
            await uow.repo(DatasetItem).update_where(row.id, {"valid_to": version})
            new = DatasetItem(
                id=f"{row.item_id}.{version}",
                item_id=row.item_id,
                dataset_id=dataset_id,
                position=row.position,
                valid_from=version,
                input=changes.input.stored() if changes.input is not None else row.input,
                expected=changes.expected
                if "expected" in changes.model_fields_set
                else row.expected,
                meta=changes.metadata if changes.metadata is not None else row.meta,
            )
            written = await uow.repo(DatasetItem).add(new)
            await self._record(uow, dataset, DatasetChange.ITEM_UPDATED, 1)
            await uow.commit()
        return written

    async def delete_item(self, dataset_id: str, item_id: str) -> Dataset:
        """Remove one item from the dataset, as a new version (earlier ones keep it)."""
        async with self._storage.unit_of_work() as uow:
            dataset, row = await self._current_item(uow, dataset_id, item_id)
            dataset = await self._next(uow, dataset, -1)
            await uow.repo(DatasetItem).update_where(row.id, {"valid_to": dataset.current_version})
            await self._record(uow, dataset, DatasetChange.ITEM_DELETED, 1)
            await uow.commit()
        return dataset

    async def export(
        self, dataset_id: str, form: ExportFormat, *, version: int | None = None
    ) -> str:
        version = await self.check_version(dataset_id, version)
        return export(await self.items(dataset_id, version=version), form)

    async def _current_item(
        self, uow: UnitOfWork, dataset_id: str, item_id: str
    ) -> tuple[Dataset, DatasetItem]:
        check_prefixed("dataset item", ITEM_ID_PREFIX, item_id, param="item_id")
        dataset = await get_existing(uow.repo(Dataset), dataset_id, "dataset")
        found = await uow.repo(DatasetItem).find(
            *_at(dataset_id, None), Where.eq("item_id", item_id), limit=1
        )
        if not found.items:
            raise NotFound("dataset item", item_id, param="item_id")
        return dataset, found.items[0]

    async def _next(self, uow: UnitOfWork, dataset: Dataset, added: int) -> Dataset:
        """The dataset at its next version, `added` items more. Its row's optimistic version
        serialises concurrent changes (a stale one is retried by the caller), so two never
        make the same version or take the same positions."""
        dataset.current_version += 1
        dataset.item_count += added
        return await uow.repo(Dataset).update(dataset)

    async def _record(
        self, uow: UnitOfWork, dataset: Dataset, change: DatasetChange, changed: int
    ) -> None:
        await uow.repo(DatasetVersion).add(
            DatasetVersion(
                id=version_id(dataset.id, dataset.current_version),
                dataset_id=dataset.id,
                number=dataset.current_version,
                change=change,
                items_changed=changed,
                item_count=dataset.item_count,
            )
        )

    async def _add_rows(
        self, uow: UnitOfWork, dataset: Dataset, items: Sequence[ItemCreate], *, version: int
    ) -> None:
        # Positions are never reused, not even those of removed items: earlier versions keep them.
        last = await uow.repo(DatasetItem).find(
            Where.eq("dataset_id", dataset.id), order_by=["-position"], limit=1
        )
        start = last.items[0].position + 1 if last.items else 1
        rows = []
        for i, item in enumerate(items):
            item_id = new_id(ITEM_ID_PREFIX)
            rows.append(
                DatasetItem(
                    id=f"{item_id}.{version}",
                    item_id=item_id,
                    dataset_id=dataset.id,
                    position=start + i,
                    valid_from=version,
                    input=item.input.stored(),
                    expected=item.expected,
                    meta=item.metadata,
                )
            )
        await uow.repo(DatasetItem).add_many(rows)
