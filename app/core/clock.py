"""Time in one place: aware UTC everywhere."""

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current instant as an aware UTC datetime."""
    return datetime.now(UTC)
