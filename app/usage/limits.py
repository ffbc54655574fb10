"""Rate limits: parsed from a key's or team's `rate_limits` JSON, with process-wide defaults."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

# Accepted spellings in the JSON, so LiteLLM-style `rpm`/`tpm` objects work as they are.
_ALIASES = {
    "requests_per_minute": ("requests_per_minute", "rpm"),
    "tokens_per_minute": ("tokens_per_minute", "tpm"),
    "requests_per_day": ("requests_per_day", "rpd"),
    "tokens_per_day": ("tokens_per_day", "tpd"),
}

MINUTE = 60
DAY = 86_400


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Requests and tokens per minute and per day; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    requests_per_day: int | None = None
    tokens_per_day: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RateLimits:
        """The limits in `data`, ignoring entries that are not whole numbers of 0 or more."""
        values: dict[str, int] = {}
        for name, spellings in _ALIASES.items():
            for spelling in spellings:
                value = (data or {}).get(spelling)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    values[name] = value
                    break
        return cls(**values)

    def over(self, defaults: RateLimits) -> RateLimits:
        """These limits, with `defaults` filling what is not set."""
        missing = {
            f.name: getattr(defaults, f.name) for f in fields(self) if getattr(self, f.name) is None
        }
        return replace(self, **missing)

    def windows(self) -> list[tuple[str, int, int]]:
        """`(dimension, window seconds, limit)` of every set limit."""
        pairs = (
            ("requests", MINUTE, self.requests_per_minute),
            ("tokens", MINUTE, self.tokens_per_minute),
            ("requests", DAY, self.requests_per_day),
            ("tokens", DAY, self.tokens_per_day),
        )
        return [(dim, window, limit) for dim, window, limit in pairs if limit is not None]

    def to_json(self) -> dict[str, int]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }
