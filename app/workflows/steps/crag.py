"""`crag_scoring`: documents graded for relevance to a query by a judge model (the CRAG grading
of the `KnowledgeSearch` the process was built with)."""

from __future__ import annotations

from app.core.errors import InvalidInput
from app.workflows.definition import CragScoringStep
from app.workflows.references import as_text
from app.workflows.steps.base import StepEnv, StepResult, knowledge_of


async def execute(step: CragScoringStep, env: StepEnv) -> StepResult:
    knowledge = knowledge_of(env)
    query = as_text(env.resolve(step.query))
    documents = env.resolve(step.documents_source)
    if documents is None:
        documents = []
    if not isinstance(documents, list):
        raise InvalidInput("documents_source must name a list of documents")
    if not documents:
        empty = {"documents": [], "relevant_documents": [], "scores": {}, "relevant_count": 0}
        return StepResult(output={**empty, "threshold": step.threshold})
    thresholds = {"threshold": step.threshold, **(step.thresholds or {})}
    graded = await knowledge.grade(
        env.caller, query, documents, step.model_id, thresholds, context=env.context
    )
    return StepResult(
        output=graded.output,
        input={"query": query, "documents": len(documents)},
        spent=graded.spent,
    )
