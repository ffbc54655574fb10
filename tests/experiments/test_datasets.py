"""`/admin/datasets`: items added, changed, imported and exported as JSONL and CSV, checked
line by line, each change a version that stays readable (both backends)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from tests.experiments.conftest import ADMIN, Gateway

MESSAGES = {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}


async def test_a_dataset_keeps_its_items_in_order_and_moves_its_version(
    gateway: Gateway,
) -> None:
    created = await gateway.post(
        "/admin/datasets",
        {
            "id": "maths",
            "name": "Maths",
            "items": [{"input": MESSAGES, "expected": "4", "metadata": {"topic": "sums"}}],
        },
        201,
    )
    assert (created["version"], created["item_count"]) == (1, 1)

    added = await gateway.post(
        "/admin/datasets/maths/items",
        {"items": [{"input": {"variables": {"name": "Ada", "n": 3}}}]},
    )
    assert (added["version"], added["item_count"]) == (2, 2)
    items = await gateway.get("/admin/datasets/maths/items")
    assert [i["position"] for i in items["data"]] == [1, 2]
    first, second = items["data"]
    assert first["input"] == MESSAGES and first["expected"] == "4"
    assert first["metadata"] == {"topic": "sums"}
    assert second["input"] == {"variables": {"name": "Ada", "n": 3}}
    page = await gateway.get("/admin/datasets/maths/items?limit=1")
    assert page["has_more"] is True and len(page["data"]) == 1

    removed = await gateway.delete(f"/admin/datasets/maths/items/{first['id']}")
    assert (removed["version"], removed["item_count"]) == (3, 1)
    await gateway.delete(f"/admin/datasets/maths/items/{first['id']}", 404)
    renamed = await gateway.patch("/admin/datasets/maths", {"name": "Sums"})
    assert renamed["name"] == "Sums" and renamed["version"] == 3
    assert [d["id"] for d in (await gateway.get("/admin/datasets"))["data"]] == ["maths"]
    await gateway.post("/admin/datasets", {"id": "maths", "name": "again"}, 409)
    assert (await gateway.delete("/admin/datasets/maths"))["deleted"] is True
    await gateway.get("/admin/datasets/maths/items", 404)


async def test_every_version_of_a_dataset_stays_readable(gateway: Gateway) -> None:
    one = {"input": {"variables": {"n": 1}}, "expected": "one"}
    two = {"input": {"variables": {"n": 2}}}
    await gateway.post("/admin/datasets", {"id": "d", "name": "D", "items": [one]}, 201)
    await gateway.post("/admin/datasets/d/items", {"items": [two]})  # version 2
    first, second = (await gateway.get("/admin/datasets/d/items"))["data"]
    changed = await gateway.patch(
        f"/admin/datasets/d/items/{first['id']}", {"expected": None, "metadata": {"k": "v"}}
    )  # version 3
    await gateway.delete(f"/admin/datasets/d/items/{second['id']}")  # version 4
    three = orjson.dumps({"input": {"variables": {"n": 3}}}).decode() + "\n"
    assert (await upload(gateway, "d", three, "jsonl")).status_code == 200  # version 5

    assert changed["id"] == first["id"] and changed["version"] == 3
    assert (changed["expected"], changed["metadata"]) == (None, {"k": "v"})
    assert changed["input"] == first["input"] and changed["position"] == 1
    versions = (await gateway.get("/admin/datasets/d/versions"))["data"]
    assert [(v["version"], v["change"], v["items_changed"], v["item_count"]) for v in versions] == [
        (5, "imported", 1, 2),
        (4, "item_deleted", 1, 1),
        (3, "item_updated", 1, 2),
        (2, "items_added", 1, 2),
        (1, "created", 1, 1),
    ]
    page = await gateway.get("/admin/datasets/d/versions?limit=2")
    assert page["has_more"] is True and [v["version"] for v in page["data"]] == [5, 4]

    async def at(version: int) -> list[tuple[str, Any]]:
        listed = await gateway.get(f"/admin/datasets/d/items?version={version}")
        return [(i["input"]["variables"]["n"], i["expected"]) for i in listed["data"]]

    assert await at(1) == [(1, "one")]
    assert await at(2) == [(1, "one"), (2, None)]
    assert await at(3) == [(1, None), (2, None)]
    assert await at(4) == [(1, None)]
    assert await at(5) == [(1, None), (3, None)]
    current = await gateway.get("/admin/datasets/d/items")
    assert [i["input"]["variables"]["n"] for i in current["data"]] == [1, 3]
    assert [i["position"] for i in current["data"]] == [1, 3]  # a removed item's is not reused
    old = await gateway.http.get("/admin/datasets/d/export?version=2", headers=ADMIN)
    assert [orjson.loads(line)["expected"] for line in old.text.splitlines()] == ["one", None]
    missing = await gateway.get("/admin/datasets/d/items?version=9", 404)
    assert missing["error"]["param"] == "version"
    refused = await gateway.get("/admin/datasets/d/items?version=0", 400)
    assert refused["error"]["param"] == "version"
    gone = await gateway.patch(f"/admin/datasets/d/items/{second['id']}", {"expected": "x"}, 404)
    assert gone["error"]["param"] == "item_id"
    bad = await gateway.patch(f"/admin/datasets/d/items/{first['id']}", {"input": None}, 400)
    assert bad["error"]["param"] == "input"
    assert (await gateway.get("/admin/datasets/d"))["version"] == 5


async def test_items_are_checked_and_the_error_names_the_field(gateway: Gateway) -> None:
    await gateway.post("/admin/datasets", {"id": "d", "name": "D"}, 201)

    for item, param in (
        ({"input": {}}, "items.0.input"),
        ({"input": {**MESSAGES, "variables": {"a": "b"}}}, "items.0.input"),
        ({"input": {"messages": []}}, "items.0.input.messages"),
        ({"input": {"messages": [{"role": "robot", "content": "x"}]}}, None),
        ({"input": {"variables": {"a": [1]}}}, None),
        ({"input": MESSAGES, "other": 1}, "items.0.other"),
    ):
        refused = await gateway.post("/admin/datasets/d/items", {"items": [item]}, 400)
        if param is not None:
            assert refused["error"]["param"] == param, item
        else:
            assert refused["error"]["param"].startswith("items.0.input"), item


async def test_jsonl_and_csv_import_and_export_round_trip(gateway: Gateway) -> None:
    await gateway.post("/admin/datasets", {"id": "d", "name": "D"}, 201)
    jsonl = (
        orjson.dumps({"input": MESSAGES, "expected": {"answer": 4}}).decode()
        + "\n\n"
        + orjson.dumps({"input": {"variables": {"city": "Oslo"}}}).decode()
        + "\n"
    )

    imported = await upload(gateway, "d", jsonl, "jsonl")
    assert imported.status_code == 200, imported.text
    assert imported.json()["item_count"] == 2
    exported = await gateway.http.get("/admin/datasets/d/export", headers=ADMIN)
    assert exported.headers["content-type"].startswith("application/jsonl")
    lines = [orjson.loads(line) for line in exported.text.splitlines()]
    assert [line["input"] for line in lines] == [MESSAGES, {"variables": {"city": "Oslo"}}]
    assert lines[0]["expected"] == {"answer": 4}
    csv_refused = await gateway.http.get("/admin/datasets/d/export?format=csv", headers=ADMIN)
    assert csv_refused.status_code == 400 and csv_refused.json()["error"]["param"] == "format"

    await gateway.post("/admin/datasets", {"id": "cities", "name": "Cities"}, 201)
    csv_text = 'city,country,expected\nOslo,Norway,cold\n"Paris, TX",USA,\n'
    assert (await upload(gateway, "cities", csv_text, "csv")).status_code == 200
    items = (await gateway.get("/admin/datasets/cities/items"))["data"]
    assert [i["input"]["variables"] for i in items] == [
        {"city": "Oslo", "country": "Norway"},
        {"city": "Paris, TX", "country": "USA"},
    ]
    assert [i["expected"] for i in items] == ["cold", None]
    back = await gateway.http.get("/admin/datasets/cities/export?format=csv", headers=ADMIN)
    assert back.text == csv_text


async def test_a_bad_file_is_refused_naming_its_line(gateway: Gateway) -> None:
    await gateway.post("/admin/datasets", {"id": "d", "name": "D"}, 201)
    good = orjson.dumps({"input": MESSAGES}).decode()

    for text, form, message in (
        (f"{good}\nnot json\n", "jsonl", "line 2: not JSON"),
        (f'{good}\n{{"input": {{}}}}\n', "jsonl", "line 2: input"),
        ("", "jsonl", "no item"),
        ("a,b\n1,2,3\n", "csv", "line 2: more values than columns"),
    ):
        refused = await upload(gateway, "d", text, form)
        assert refused.status_code == 400, text
        error = refused.json()["error"]
        assert error["param"] == "file" and message in error["message"], error
    assert (await gateway.get("/admin/datasets/d"))["item_count"] == 0


async def upload(gateway: Gateway, dataset_id: str, text: str, form: str) -> httpx.Response:
    return await gateway.http.post(
        f"/admin/datasets/{dataset_id}/import?format={form}",
        files={"file": (f"items.{form}", text.encode(), "text/plain")},
        headers=ADMIN,
    )
