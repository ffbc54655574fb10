"""The HTTP status and OpenAI error type of each domain error: by class for the API's answers,
and by the code a failed job stored for a batch's output lines, so the two always agree."""

from __future__ import annotations

from app.core.errors import (
    BudgetExceeded,
    Cancelled,
    CircuitOpen,
    Conflict,
    DomainError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    TooLarge,
    Transient,
    Unauthenticated,
    Unavailable,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)

# Looked up along the error's MRO, so a subclass (DuplicateKey, InvalidId…) inherits its family's.
DOMAIN_STATUS: dict[type[DomainError], tuple[int, str]] = {
    InvalidInput: (400, "invalid_request_error"),
    TooLarge: (413, "invalid_request_error"),
    Unauthenticated: (401, "authentication_error"),
    BudgetExceeded: (402, "insufficient_quota"),
    PermissionDenied: (403, "permission_error"),
    NotFound: (404, "not_found_error"),
    Conflict: (409, "invalid_request_error"),
    Cancelled: (409, "invalid_request_error"),
    RateLimited: (429, "rate_limit_error"),
    Transient: (502, "api_error"),
    Unavailable: (503, "service_unavailable_error"),
    UpstreamRateLimited: (429, "rate_limit_error"),
    UpstreamTimeout: (504, "api_error"),
    CircuitOpen: (503, "service_unavailable_error"),
}

# Codes a job stores for failures that are not domain errors (`app/operations/runner.describe`).
_OTHER_CODES: dict[str, tuple[int, str]] = {
    "timeout": (504, "api_error"),
    "connection_error": (502, "api_error"),
}


def error_type(status: int) -> str:
    """The OpenAI error type that clients expect for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable_error"
    if status >= 500:
        return "api_error"
    return "invalid_request_error"


def _class_status(cls: type[DomainError]) -> tuple[int, str]:
    for ancestor in cls.__mro__:
        if ancestor in DOMAIN_STATUS:
            return DOMAIN_STATUS[ancestor]
    return 500, "api_error"


def domain_status(exc: DomainError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of a domain error (also sent in a stream)."""
    if isinstance(exc, UpstreamRejected):
        return exc.status, error_type(exc.status)
    return _class_status(type(exc))


def _descendants(cls: type[DomainError]) -> list[type[DomainError]]:
    found: list[type[DomainError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_descendants(sub)]
    return found


def code_status(code: str) -> tuple[int, str]:
    """The status and type of the error whose `code` a failed job stored: what the API would
    have answered for it (an upstream's own refusal, whose status is not stored, is a 502)."""
    if code == UpstreamRejected.code:
        return 502, "api_error"
    if code in _OTHER_CODES:
        return _OTHER_CODES[code]
    # Walked at each call (a failed line's worth of work), so every error class is found
    # whichever module defines it.
    classes: list[type[DomainError]] = [DomainError, *_descendants(DomainError)]
    for cls in classes:
        if cls.code == code:
            return _class_status(cls)
    return 500, "api_error"
