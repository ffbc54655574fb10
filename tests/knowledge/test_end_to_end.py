"""Knowledge bases end to end, on both backends: upload, ingest as jobs, search, delete."""

from __future__ import annotations

from typing import Any

import pytest

from app.storage.protocol import Where
from app.usage.entities import UsageRecord, UsageType
from tests.knowledge.conftest import Gateway

GUIDE = """# Gateway guide

The gateway routes chat completions to many providers.

## Queues

Jobs are durable: a row is committed before its message is sent, and a sweeper re-sends
what a crashed worker left behind.
"""
NOTES = "Plain notes about penguins. Penguins live in the southern hemisphere and swim well."
PRICES = "item,price\nkeyboard,30\nmouse,12\nscreen,180\n"


async def _search(client: Any, base_id: str, **body: Any) -> dict[str, Any]:
    answer = await client.post(f"/v1/knowledge-bases/{base_id}/search", json=body)
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


async def test_uploaded_documents_are_ingested_and_searched_until_deleted(
    gateway: Gateway,
) -> None:
    await gateway.base()
    files = [
        ("files", ("guide.md", GUIDE.encode(), "text/markdown")),
        ("files", ("notes.txt", NOTES.encode(), "text/plain")),
        ("files", ("prices.csv", PRICES.encode(), "text/csv")),
    ]
    upload = await gateway.admin.post(
        "/admin/knowledge-bases/docs/documents/upload",
        files=files,
        data={"metadata": '{"team": "docs", "year": 2026}', "chunking": '{"strategy": "section"}'},
    )
    assert upload.status_code == 202, upload.text
    accepted = upload.json()["data"]
    assert [d["status"] for d in accepted] == ["pending"] * 3
    assert all(d["operation_id"].startswith("op-") for d in accepted)
    assert [d["parser"] for d in accepted] == ["markdown", "text", "csv"]

    assert await gateway.run_jobs() == 3

    documents = {}
    for document in accepted:
        answer = await gateway.admin.get(f"/admin/knowledge-bases/docs/documents/{document['id']}")
        assert answer.json()["status"] == "ready", answer.text
        documents[document["source_filename"]] = answer.json()
    operation = await gateway.admin.get(f"/v1/operations/{accepted[0]['operation_id']}")
    assert operation.json()["status"] == "completed"
    assert operation.json()["progress"] == {"chunks_embedded": 2, "chunks_total": 2}

    guide = documents["guide.md"]
    chunks = (
        await gateway.admin.get(f"/admin/knowledge-bases/docs/documents/{guide['id']}/chunks")
    ).json()["data"]
    assert [c["headings"] for c in chunks] == [["Gateway guide"], ["Gateway guide", "Queues"]]
    assert chunks[0]["metadata"] == {"team": "docs", "year": 2026}
    target = chunks[1]

    reader = await gateway.client(knowledge_bases=["docs"], models="none")
    async with reader:
        found = await _search(reader, "docs", query=target["content"])
        first = found["data"][0]
        assert first["chunk_id"] == target["id"]
        assert first["score"] == pytest.approx(1.0, abs=1e-5)
        assert first["headings"] == ["Gateway guide", "Queues"]
        assert found["model"] == "mock-embedding"

        # A filter leaves out what it excludes, whatever the score.
        excluded = await _search(
            reader,
            "docs",
            query=target["content"],
            top_k=20,
            filter={"field": "_filename", "op": "ne", "value": "guide.md"},
        )
        assert excluded["data"] and all(h["filename"] != "guide.md" for h in excluded["data"])
        rows = await _search(
            reader,
            "docs",
            query="price",
            top_k=20,
            filter={
                "and": [
                    {"field": "_row", "op": "gte", "value": 2},
                    {"field": "year", "op": "eq", "value": 2026},
                ]
            },
        )
        assert sorted(h["row"] for h in rows["data"]) == [2, 3]

        deleted = await gateway.admin.delete(f"/admin/knowledge-bases/docs/documents/{guide['id']}")
        assert deleted.status_code == 200
        after = await _search(reader, "docs", query=target["content"], top_k=20)
        assert after["data"] and all(h["document_id"] != guide["id"] for h in after["data"])

    for permissions in ({"knowledge_bases": ["other"]}, {"knowledge_bases": "none"}):
        outsider = await gateway.client(**permissions)
        async with outsider:
            refused = await outsider.post(
                "/v1/knowledge-bases/docs/search", json={"query": "penguins"}
            )
            unknown = await outsider.post(
                "/v1/knowledge-bases/nowhere/search", json={"query": "penguins"}
            )
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["param"] == "knowledge_base_id"
        assert unknown.status_code == 403  # the same answer: nothing learnt of other bases


async def test_ingestion_and_search_usage_go_to_their_keys(gateway: Gateway) -> None:
    await gateway.base()
    accepted = await gateway.document(content=NOTES, title="notes")
    await gateway.run_jobs()
    _, secret = await gateway.services.keys.create_key(name="reader", key_id="key-reader")
    found = await gateway.admin.post(
        "/v1/knowledge-bases/docs/search",
        json={"query": "penguins swim"},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert found.json()["data"][0]["title"] == "notes"

    async with gateway.storage.unit_of_work() as uow:
        records = (
            await uow.repo(UsageRecord).find(Where.eq("usage_type", UsageType.EMBEDDING))
        ).items
    by_key = {(r.api_key_id, r.operation_id) for r in records}
    # The ingestion's embeddings are the admin key's, in its job; the query's the reader's.
    assert by_key == {("admin", accepted["operation_id"]), ("key-reader", None)}


async def test_keyword_and_hybrid_searches_rank_by_words(gateway: Gateway) -> None:
    await gateway.base()
    await gateway.document(content=NOTES, title="penguins")
    await gateway.document(content=GUIDE, title="guide", parser="markdown")
    await gateway.run_jobs()

    keyword = await _search(gateway.admin, "docs", query="penguins hemisphere", mode="keyword")
    hybrid = await _search(gateway.admin, "docs", query="penguins hemisphere", mode="hybrid")
    nothing = await _search(gateway.admin, "docs", query="zebra", mode="keyword")

    assert keyword["model"] is None  # no embedding is needed for words
    assert [h["title"] for h in keyword["data"]] == ["penguins"]
    assert keyword["data"][0]["keyword_score"] > 0
    assert hybrid["data"][0]["title"] == "penguins"
    assert hybrid["data"][0]["vector_score"] is not None
    assert hybrid["data"][0]["keyword_score"] is not None
    assert nothing["data"] == []
