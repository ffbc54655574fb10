"""Cost of a call in micro-dollars from a model's prices per million tokens."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from decimal import Decimal

from app.models.entities import Model


def cost_micros(
    input_price_per_million: Decimal,
    output_price_per_million: Decimal,
    input_tokens: int,
    output_tokens: int,
) -> int:
    """The cost in whole micro-dollars, rounded up so sub-micro costs are never free.

    A price per million tokens is a price in micro-dollars per token, so the cost is
    `input_tokens * input_price + output_tokens * output_price`, computed exactly in integers
    from the prices' fractions.
    """
    a, b, c, d = _fractions(input_price_per_million, output_price_per_million)
    # ceil((in * a/b + out * c/d)) = ceil((in*a*d + out*c*b) / (b*d)), by floor division.
    return -(-(input_tokens * a * d + output_tokens * c * b) // (b * d))


@functools.lru_cache(maxsize=1024)
def _fractions(input_price: Decimal, output_price: Decimal) -> tuple[int, int, int, int]:
    a, b = Decimal(input_price).as_integer_ratio()
    c, d = Decimal(output_price).as_integer_ratio()
    return a, b, c, d


def model_cost_micros(model: Model, input_tokens: int, output_tokens: int) -> int:
    """`cost_micros` with `model`'s prices."""
    return cost_micros(
        model.input_price_per_million, model.output_price_per_million, input_tokens, output_tokens
    )


def estimate_tokens(text: str) -> int:
    """A cheap upper-leaning estimate of the tokens of `text` (about four characters each)."""
    return max(1, math.ceil(len(text) / 4))


def estimate_message_tokens(texts: Iterable[str]) -> int:
    """An estimate of a chat request's input tokens from its messages' texts."""
    return sum(estimate_tokens(text) + 4 for text in texts)  # 4: role and separators
