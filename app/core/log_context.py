"""The context every log line reports: the request, the job and the API key it belongs to.

Set where each becomes known (the request-id middleware and the fast path, the job runner,
`ApiKeyService.authenticate`) and read by `app.core.log_format`, so no log call passes them.
"""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
operation_id_var: ContextVar[str | None] = ContextVar("operation_id", default=None)
key_id_var: ContextVar[str | None] = ContextVar("key_id", default=None)
