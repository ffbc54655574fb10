"""Every runtime setting in one place: its type, category, default and accepted range."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from app.config import Settings
from app.settings.entities import ConfigCategory, ConfigValueType

# Names other parts read with `ConfigService.get`.
LOG_BODIES = "logging.log_request_bodies"
LOG_MAX_BODY_BYTES = "logging.max_body_bytes"
RETENTION_LOGS_DAYS = "retention.logs_days"
RETENTION_USAGE_DAYS = "retention.usage_days"
DEFAULT_REQUESTS_PER_MINUTE = "rate_limit.requests_per_minute"
DEFAULT_TOKENS_PER_MINUTE = "rate_limit.tokens_per_minute"
DEFAULT_REQUESTS_PER_DAY = "rate_limit.requests_per_day"
DEFAULT_TOKENS_PER_DAY = "rate_limit.tokens_per_day"
CACHE_ENABLED = "cache.enabled"
CACHE_TTL_SECONDS = "cache.ttl_seconds"


@dataclass(frozen=True, slots=True)
class ConfigItem:
    """The definition of one setting; `minimum`/`maximum` bound numbers, `choices` strings."""

    key: str
    value_type: ConfigValueType
    category: ConfigCategory
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None


_DAY_LIMIT = 36_500

REGISTRY: dict[str, ConfigItem] = {
    item.key: item
    for item in (
        ConfigItem(
            LOG_BODIES,
            ConfigValueType.BOOLEAN,
            ConfigCategory.LOGGING,
            False,
            "Record request and response bodies in execution logs (off: metadata only).",
        ),
        ConfigItem(
            LOG_MAX_BODY_BYTES,
            ConfigValueType.INTEGER,
            ConfigCategory.LOGGING,
            65_536,
            "Longest body kept in an execution log, in bytes; longer ones are truncated.",
            minimum=0,
            maximum=10 * 1024 * 1024,
        ),
        ConfigItem(
            RETENTION_LOGS_DAYS,
            ConfigValueType.INTEGER,
            ConfigCategory.RETENTION,
            30,
            "Days execution logs are kept before the retention job deletes them.",
            minimum=1,
            maximum=_DAY_LIMIT,
        ),
        ConfigItem(
            RETENTION_USAGE_DAYS,
            ConfigValueType.INTEGER,
            ConfigCategory.RETENTION,
            30,
            "Days raw usage records are kept (their daily roll-ups stay).",
            minimum=3,
            maximum=_DAY_LIMIT,
        ),
        ConfigItem(
            DEFAULT_REQUESTS_PER_MINUTE,
            ConfigValueType.INTEGER,
            ConfigCategory.RATE_LIMIT,
            0,
            "Requests per minute of a key without its own limit (0: unlimited).",
            minimum=0,
            maximum=10_000_000,
        ),
        ConfigItem(
            DEFAULT_TOKENS_PER_MINUTE,
            ConfigValueType.INTEGER,
            ConfigCategory.RATE_LIMIT,
            0,
            "Tokens per minute of a key without its own limit (0: unlimited).",
            minimum=0,
            maximum=1_000_000_000,
        ),
        ConfigItem(
            DEFAULT_REQUESTS_PER_DAY,
            ConfigValueType.INTEGER,
            ConfigCategory.RATE_LIMIT,
            0,
            "Requests per day of a key without its own limit (0: unlimited).",
            minimum=0,
            maximum=1_000_000_000,
        ),
        ConfigItem(
            DEFAULT_TOKENS_PER_DAY,
            ConfigValueType.INTEGER,
            ConfigCategory.RATE_LIMIT,
            0,
            "Tokens per day of a key without its own limit (0: unlimited).",
            minimum=0,
            maximum=100_000_000_000,
        ),
        ConfigItem(
            CACHE_ENABLED,
            ConfigValueType.BOOLEAN,
            ConfigCategory.CACHE,
            True,
            "Serve repeated identical chat requests from the response cache.",
        ),
        ConfigItem(
            CACHE_TTL_SECONDS,
            ConfigValueType.INTEGER,
            ConfigCategory.CACHE,
            3600,
            "Seconds a cached response stays valid.",
            minimum=0,
            maximum=30 * 24 * 3600,
        ),
    )
}


# Environment settings that give a setting its default, so an operator's choice made at deploy
# time holds until an administrator changes it at run time.
_FROM_ENVIRONMENT = {
    LOG_BODIES: "LOG_REQUEST_BODIES",
    RETENTION_LOGS_DAYS: "LOG_RETENTION_DAYS",
    RETENTION_USAGE_DAYS: "USAGE_RETENTION_DAYS",
    DEFAULT_REQUESTS_PER_MINUTE: "RATE_LIMIT_REQUESTS_PER_MINUTE",
    DEFAULT_TOKENS_PER_MINUTE: "RATE_LIMIT_TOKENS_PER_MINUTE",
    DEFAULT_REQUESTS_PER_DAY: "RATE_LIMIT_REQUESTS_PER_DAY",
    DEFAULT_TOKENS_PER_DAY: "RATE_LIMIT_TOKENS_PER_DAY",
}


def registry_for(settings: Settings) -> dict[str, ConfigItem]:
    """The registry with defaults taken from the environment settings that exist and are set."""
    registry = dict(REGISTRY)
    for key, name in _FROM_ENVIRONMENT.items():
        value = getattr(settings, name, None)
        if value is not None:
            registry[key] = replace(registry[key], default=value)
    return registry
