"""Domain errors: one tree, raised by services, storage and workers, rendered by the API."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""

    code: str = "error"

    def __init__(self, message: str, *, param: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details


class InvalidInput(DomainError):
    """Something a caller sent is not acceptable."""

    code = "invalid_request"


class InvalidId(InvalidInput):
    """An identifier does not have the expected format."""

    code = "invalid_id"

    def __init__(self, kind: str, value: str, *, param: str = "id") -> None:
        super().__init__(f"'{value}' is not a valid {kind} id", param=param)


class TooLarge(InvalidInput):
    """Something a caller sent is larger than this gateway accepts (a 413)."""

    code = "too_large"


class NotFound(DomainError):
    """A referenced entity does not exist (or is not visible to the caller)."""

    code = "not_found"

    def __init__(self, kind: str, entity_id: object, *, param: str | None = None) -> None:
        super().__init__(f"{kind} '{entity_id}' not found", param=param)
        self.kind = kind
        self.entity_id = entity_id


class Conflict(DomainError):
    """A write collides with the current state."""

    code = "conflict"


class DuplicateKey(Conflict):
    """A unique key (primary or secondary) is already taken."""

    code = "duplicate_key"


class StaleVersion(Conflict):
    """An update was based on a version that is no longer current."""

    code = "stale_version"

    def __init__(self, kind: str, entity_id: object, expected: int) -> None:
        super().__init__(
            f"{kind} '{entity_id}' was changed by someone else (expected version {expected})"
        )


class ReferenceViolation(Conflict):
    """A write would leave a reference dangling, or delete something still referenced."""

    code = "reference_violation"


class IllegalTransition(Conflict):
    """A status change that the transition table does not allow."""

    code = "illegal_transition"


class Unauthenticated(DomainError):
    """No valid credential was presented."""

    code = "unauthenticated"


class PermissionDenied(DomainError):
    """The caller is known but may not do this."""

    code = "permission_denied"


class RateLimited(DomainError):
    """Too many requests or tokens in the current window."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after


class LoginThrottled(RateLimited):
    """Too many failed sign-ins for an account or from an address: refused until the lock ends."""

    code = "login_throttled"


class BudgetExceeded(DomainError):
    """A hard budget limit would be crossed."""

    code = "budget_exceeded"


class Unavailable(DomainError):
    """A dependency (database, broker, upstream) cannot be reached right now."""

    code = "unavailable"


class Transient(DomainError):
    """A failure worth retrying: a timeout, a dropped connection, a 429 or a 5xx upstream."""

    code = "transient_failure"


class Cancelled(DomainError):
    """The job was cancelled (or its lease lost) while it ran; stop without writing a result."""

    code = "cancelled"


class UpstreamRejected(DomainError):
    """An upstream provider refused the request for good (a 4xx other than 429)."""

    code = "upstream_rejected"

    def __init__(self, message: str, *, status: int, **details: Any) -> None:
        super().__init__(message, **details)
        self.status = status


class UpstreamRateLimited(Transient):
    """An upstream provider answered 429."""

    code = "upstream_rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after


class UpstreamUnavailable(Transient):
    """An upstream provider failed (5xx) or could not be reached."""

    code = "upstream_error"


class UpstreamTimeout(Transient):
    """An upstream provider did not answer in time."""

    code = "upstream_timeout"


class CircuitOpen(Transient):
    """Every upstream that could answer is shut off by its circuit breaker for now."""

    code = "circuit_open"


class RetryLater(Transient):
    """A failure whose next attempt is due after a delay the job chose (a delivery schedule)."""

    code = "retry_later"

    def __init__(self, message: str, *, retry_after: float, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after
