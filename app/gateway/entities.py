"""`ModelChain` as app/gateway/router.py and app/gateway/chat.py still import it: the table lives
in `app.models.entities`, beside the models a chain steps through. Other code imports it there."""

from __future__ import annotations

from app.models.entities import ModelChain

__all__ = ["ModelChain"]
