"""The step executors, one module per step type: `EXECUTORS[step.type](step, env)`."""

from __future__ import annotations

from app.workflows.steps import chat, conditional, crag, http, parallel, search, transform
from app.workflows.steps import map as map_step
from app.workflows.steps.base import Executor

EXECUTORS: dict[str, Executor] = {
    "chat_completion": chat.execute,
    "knowledge_base_search": search.execute,
    "crag_scoring": crag.execute,
    "conditional": conditional.execute,
    "http_request": http.execute,
    "transform": transform.execute,
    "parallel": parallel.execute,
    "map": map_step.execute,
}
