"""Datasets: items added, imported (JSONL, CSV), listed, removed and exported, a revision per
change so a batch can tell the items it started with are still the ones there."""

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
from app.datasets.entities import Dataset, DatasetItem
from app.datasets.schemas import (
    MAX_ITEMS,
    DatasetCreate,
    DatasetUpdate,
    ExportFormat,
    ItemCreate,
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


class DatasetService:
    """Create, change and read datasets and their items."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def create(self, data: DatasetCreate) -> Dataset:
        """A new dataset with the items given (revision 1)."""
        dataset = Dataset(id=data.id, name=data.name, description=data.description)
        try:
            async with self._storage.unit_of_work() as uow:
                await uow.repo(Dataset).add(dataset)
                if data.items:
                    dataset = await self._append(uow, dataset, data.items, bump=False)
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
        """Remove a dataset and its items; records of batches run on it stay."""
        async with self._storage.unit_of_work() as uow:
            await delete_existing(uow.repo(Dataset), dataset_id, "dataset")
            await uow.commit()

    # ---- items ---------------------------------------------------------------------------

    async def add_items(self, dataset_id: str, items: Sequence[ItemCreate]) -> Dataset:
        """Append items (after the last position); the revision moves on."""
        async with self._storage.unit_of_work() as uow:
            dataset = await get_existing(uow.repo(Dataset), dataset_id, "dataset")
            dataset = await self._append(uow, dataset, items, bump=True)
            await uow.commit()
        return dataset

    async def import_items(self, dataset_id: str, text: str, form: ExportFormat) -> Dataset:
        """Append the items of a JSONL or CSV file."""
        items = parse_jsonl(text) if form is ExportFormat.JSONL else parse_csv(text)
        if not items:
            raise InvalidInput("the file holds no item", param="file")
        return await self.add_items(dataset_id, items)

    async def list_items(
        self, dataset_id: str, *, limit: int = 20, after: str | None = None
    ) -> Page[DatasetItem]:
        """A dataset's items in order."""
        await self.get(dataset_id)
        return await read_page(
            self._storage,
            DatasetItem,
            Where.eq("dataset_id", dataset_id),
            order_by=["position"],
            limit=limit,
            after=after,
        )

    async def items(self, dataset_id: str) -> builtins.list[DatasetItem]:
        """Every item of a dataset, in order."""
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(DatasetItem).find(
                Where.eq("dataset_id", dataset_id), order_by=["position"]
            )
        return page.items

    async def delete_item(self, dataset_id: str, item_id: str) -> Dataset:
        """Remove one item; the revision moves on."""
        check_prefixed("dataset item", ITEM_ID_PREFIX, item_id, param="item_id")
        async with self._storage.unit_of_work() as uow:
            dataset = await get_existing(uow.repo(Dataset), dataset_id, "dataset")
            item = await uow.repo(DatasetItem).get(item_id)
            if item is None or item.dataset_id != dataset_id:
                raise NotFound("dataset item", item_id, param="item_id")
            await uow.repo(DatasetItem).delete(item_id)
            dataset.item_count -= 1
            dataset.revision += 1
            dataset = await uow.repo(Dataset).update(dataset)
            await uow.commit()
        return dataset

    async def export(self, dataset_id: str, form: ExportFormat) -> str:
        await self.get(dataset_id)
        return export(await self.items(dataset_id), form)

    async def _append(
        self, uow: UnitOfWork, dataset: Dataset, items: Sequence[ItemCreate], *, bump: bool
    ) -> Dataset:
        if dataset.item_count + len(items) > MAX_ITEMS:
            raise InvalidInput(
                f"a dataset holds at most {MAX_ITEMS} items; '{dataset.id}' has "
                f"{dataset.item_count} and {len(items)} more were given",
                param="items",
            )
        last = await uow.repo(DatasetItem).find(
            Where.eq("dataset_id", dataset.id), order_by=["-position"], limit=1
        )
        start = last.items[0].position + 1 if last.items else 1
        await uow.repo(DatasetItem).add_many(
            [
                DatasetItem(
                    id=new_id(ITEM_ID_PREFIX),
                    dataset_id=dataset.id,
                    position=start + i,
                    input=item.input.stored(),
                    expected=item.expected,
                    meta=item.metadata,
                )
                for i, item in enumerate(items)
            ]
        )
        dataset.item_count += len(items)
        if bump:
            dataset.revision += 1
        # The dataset's version serialises concurrent appends (a stale one is retried by
        # the caller), so two never take the same positions.
        return await uow.repo(Dataset).update(dataset)
