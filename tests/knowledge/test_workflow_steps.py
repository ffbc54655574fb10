"""Knowledge bases in workflows: a `knowledge_base_search` step finds what was ingested, and a
`crag_scoring` step keeps what the judge grades relevant."""

from __future__ import annotations

from typing import Any

from app.credentials.entities import Provider
from app.models.entities import Model
from app.models.schemas import ModelParameters
from tests.knowledge.conftest import Gateway

PENGUINS = "Penguins live in the cold waters of the southern hemisphere."


async def _judge(gateway: Gateway) -> None:
    # The mock answers by what the prompt contains: a high score for the penguin text only (any
    # other answer holds no score, which grades 0).
    replies = {"southern hemisphere": '{"score": 0.95}'}
    async with gateway.services.storage.unit_of_work() as uow:
        await uow.repo(Model).add(
            Model(
                id="judge",
                name="judge",
                provider=Provider.MOCK,
                provider_model="mock",
                parameters=ModelParameters(mock_replies=replies).as_dict(),
            )
        )
        await uow.commit()


async def _run(gateway: Gateway, steps: list[dict[str, Any]], run_input: Any) -> dict[str, Any]:
    created = await gateway.admin.post(
        "/admin/workflows", json={"id": "rag", "name": "rag", "steps": steps}
    )
    assert created.status_code == 201, created.text
    answer = await gateway.admin.post("/v1/workflows/rag/execute", json={"input": run_input})
    assert answer.status_code == 200, answer.text
    run: dict[str, Any] = answer.json()
    return run


async def test_a_workflow_searches_a_knowledge_base_and_grades_what_it_found(
    gateway: Gateway,
) -> None:
    await gateway.base()
    await gateway.document(content=PENGUINS, title="penguins")
    await gateway.document(content="Camels cross hot deserts for days.", title="camels")
    assert await gateway.run_jobs() == 2
    await _judge(gateway)
    steps = [
        {
            "name": "find",
            "type": "knowledge_base_search",
            "knowledge_base_id": "docs",
            "query": "${request:question}",
            "top_k": 2,
        },
        {
            "name": "grade",
            "type": "crag_scoring",
            "query": "${request:question}",
            "documents_source": "${step:find:documents}",
            "model_id": "judge",
            "threshold": 0.8,
        },
    ]
    run = await _run(gateway, steps, {"question": "Which animals live in the cold?"})

    assert run["success"] is True, run
    found = run["steps"][0]
    assert found["name"] == "find" and found["status"] == "completed"
    graded = run["output"]
    # The search found both documents (both were graded); only the penguins pass the judge.
    assert [d["content"] for d in graded["relevant_documents"]] == [PENGUINS]
    assert graded["relevant_count"] == 1 and graded["verdict"] == "correct"
    assert sorted(graded["scores"].values()) == [0.0, 0.95]
