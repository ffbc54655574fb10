"""Queue messages are JSON written and read by orjson, with the standard encoder's range."""

from __future__ import annotations

import json

import dramatiq

from app.config import Settings
from app.queue.broker import build_broker
from app.queue.encoding import FastJSONEncoder


def test_a_message_reads_back_as_it_was_sent_and_is_plain_json() -> None:
    data = {"queue_name": "usage", "args": [{"usage": [{"id": "u-1", "cost": 5}], "n": None}]}
    encoded = FastJSONEncoder().encode(data)
    assert json.loads(encoded) == data
    assert FastJSONEncoder().decode(encoded) == data


def test_an_integer_beyond_64_bits_is_still_encoded() -> None:
    data = {"args": [2**70]}
    encoded = FastJSONEncoder().encode(data)
    assert FastJSONEncoder().decode(encoded) == data


def test_a_message_written_by_the_standard_encoder_with_nan_is_read() -> None:
    encoded = json.dumps({"args": [float("inf")]}).encode()
    assert FastJSONEncoder().decode(encoded) == {"args": [float("inf")]}


def test_building_the_broker_installs_the_encoder() -> None:
    build_broker(Settings(BROKER="stub"))
    assert isinstance(dramatiq.get_encoder(), FastJSONEncoder)
