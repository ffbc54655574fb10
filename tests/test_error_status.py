"""A failed job's stored error code answers the status and type the API answers for that error."""

from __future__ import annotations

import pytest

import app.services  # noqa: F401  (imports every module that defines an error class)
from app.core import errors
from app.core.error_status import code_status, domain_status


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("invalid_request", (400, "invalid_request_error")),
        ("invalid_id", (400, "invalid_request_error")),
        ("forbidden_destination", (400, "invalid_request_error")),
        ("unauthenticated", (401, "authentication_error")),
        ("budget_exceeded", (402, "insufficient_quota")),
        ("permission_denied", (403, "permission_error")),
        ("not_found", (404, "not_found_error")),
        ("model_not_found", (404, "not_found_error")),
        ("conflict", (409, "invalid_request_error")),
        ("duplicate_key", (409, "invalid_request_error")),
        ("illegal_transition", (409, "invalid_request_error")),
        ("rate_limit_exceeded", (429, "rate_limit_error")),
        ("upstream_rate_limited", (429, "rate_limit_error")),
        ("transient_failure", (502, "api_error")),
        ("upstream_error", (502, "api_error")),
        ("upstream_rejected", (502, "api_error")),
        ("unavailable", (503, "service_unavailable_error")),
        ("circuit_open", (503, "service_unavailable_error")),
        ("upstream_timeout", (504, "api_error")),
        ("timeout", (504, "api_error")),
        ("connection_error", (502, "api_error")),
        ("internal_error", (500, "api_error")),
        ("no-such-code", (500, "api_error")),
    ],
)
def test_a_stored_error_code_gives_the_status_the_api_gives(
    code: str, expected: tuple[int, str]
) -> None:
    assert code_status(code) == expected


@pytest.mark.parametrize(
    "error",
    [
        errors.UpstreamTimeout("the model took too long"),
        errors.UpstreamRateLimited("slow down", retry_after=1.0),
        errors.CircuitOpen("open"),
        errors.DuplicateKey("taken"),
        errors.InvalidId("batch", "x"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_the_code_of_an_error_maps_like_the_error_itself(error: errors.DomainError) -> None:
    assert code_status(error.code) == domain_status(error)
