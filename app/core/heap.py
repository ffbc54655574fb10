"""Keeps Python's cycle collector off the hot path of a long-running process.

A process serving requests allocates many short-lived containers, so the collector runs often,
and every full collection walks every object alive, most of them built at start-up (FastAPI,
pydantic, SQLAlchemy and the app's own). On the gateway's benchmark that cost a fifth of the
API's CPU and pauses of a quarter of a second at the 99th percentile. Once start-up is done,
`settle` collects what start-up left behind and freezes the rest (the collector no longer walks
it), and makes collections rarer. Reference counting still frees almost everything at once;
only objects in reference cycles wait for a collection.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

# Allocations (net of frees) between young collections, then young collections per middle one
# and middle ones per full one. Python's defaults are 700, 10 and 10.
THRESHOLDS = (10_000, 50, 100)


def settle() -> None:
    """Freeze what start-up built and collect less often; call once start-up has finished."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    log.debug("%d start-up objects frozen", gc.get_freeze_count())
