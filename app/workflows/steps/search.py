"""`knowledge_base_search`: the chunks of a knowledge base nearest to a query, through the
`KnowledgeSearch` the process was built with."""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

from app.workflows.definition import KnowledgeBaseSearchStep
from app.workflows.references import as_text
from app.workflows.steps.base import StepEnv, StepResult, knowledge_of


def documents_xml(documents: list[dict[str, Any]]) -> str:
    """The documents as the original's `documents_xml`, for prompts that want them inline."""
    parts = ["<documents>"]
    for doc in documents:
        parts.append(
            f"<document><id>{escape(as_text(doc.get('id')))}</id>"
            f"<content>{escape(as_text(doc.get('content')))}</content></document>"
        )
    parts.append("</documents>")
    return "".join(parts)


async def execute(step: KnowledgeBaseSearchStep, env: StepEnv) -> StepResult:
    knowledge = knowledge_of(env)
    query = as_text(env.resolve(step.query))
    found = await knowledge.search(
        env.caller,
        step.knowledge_base_id,
        query,
        step.top_k,
        step.similarity_threshold,
        env.resolve(step.filter),
        context=env.context,
    )
    documents = found.documents
    output = {
        "documents": documents,
        "documents_xml": documents_xml(documents),
        "total": len(documents),
        "knowledge_base_id": step.knowledge_base_id,
        "query": query,
    }
    return StepResult(
        output=output,
        input={"query": query, "top_k": step.top_k},
        spent=found.spent,
    )
