"""The process fixtures of the job engine's tests, for the evaluations' process test."""

from __future__ import annotations

from tests.operations.test_processes import clean, processes  # noqa: F401
