"""Cost of a call in micro-dollars from a model's prices per million tokens."""

from __future__ import annotations

import math
from collections.abc import Iterable
from decimal import ROUND_CEILING, Decimal

from app.models.entities import Model

_MICROS_PER_DOLLAR = Decimal(1_000_000)
_TOKENS_PER_PRICE_UNIT = Decimal(1_000_000)


def cost_micros(
    input_price_per_million: Decimal,
    output_price_per_million: Decimal,
    input_tokens: int,
    output_tokens: int,
) -> int:
    """The cost in whole micro-dollars, rounded up so sub-micro costs are never free."""
    dollars = (
        Decimal(input_tokens) * input_price_per_million
        + Decimal(output_tokens) * output_price_per_million
    ) / _TOKENS_PER_PRICE_UNIT
    return int((dollars * _MICROS_PER_DOLLAR).to_integral_value(rounding=ROUND_CEILING))


def model_cost_micros(model: Model, input_tokens: int, output_tokens: int) -> int:
    """`cost_micros` with `model`'s prices."""
    return cost_micros(
        Decimal(model.input_price_per_million),
        Decimal(model.output_price_per_million),
        input_tokens,
        output_tokens,
    )


def estimate_tokens(text: str) -> int:
    """A cheap upper-leaning estimate of the tokens of `text` (about four characters each)."""
    return max(1, math.ceil(len(text) / 4))


def estimate_message_tokens(texts: Iterable[str]) -> int:
    """An estimate of a chat request's input tokens from its messages' texts."""
    return sum(estimate_tokens(text) + 4 for text in texts)  # 4: role and separators
