"""Where Alembic's `migrations/env.py` finds the DATABASE_URL parser, which lives in
`app.core.database_url` (beside REDIS_URL's) so that `app.config` can check DATABASE_URL without
importing `app.storage`. Application code imports it from there."""

from app.core.database_url import parse_database_url

__all__ = ["parse_database_url"]
