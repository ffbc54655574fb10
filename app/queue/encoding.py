"""Queue messages in JSON through orjson.

Dramatiq's default encoder is the standard library's `json`, several times slower on the
accounting batches the API sends every second (about 40 KB each under load). This one writes
the same JSON; what orjson refuses (an integer beyond 64 bits) or cannot read (a NaN written
by the standard encoder) goes through the standard encoder instead.
"""

from __future__ import annotations

import dramatiq
import orjson
from dramatiq.encoder import JSONEncoder, MessageData

_STANDARD = JSONEncoder()


class FastJSONEncoder(dramatiq.Encoder):
    def encode(self, data: MessageData) -> bytes:
        try:
            return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # orjson.JSONEncodeError
            return _STANDARD.encode(data)

    def decode(self, data: bytes) -> MessageData:
        try:
            decoded: MessageData = orjson.loads(data)
        except orjson.JSONDecodeError:
            return _STANDARD.decode(data)
        return decoded
