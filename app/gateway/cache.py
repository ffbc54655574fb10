"""The response cache: exact-match and semantic, never shared across tenants, models or configs.

The chat path asks `ResponseCache.lookup` before calling a provider and `store`s the answer
after. The exact key hashes every request parameter that can change the answer, the model
(or chain) name, its `config_version` and the caller's tenant. The semantic cache embeds the
conversation and compares it, by brute-force cosine similarity, with the bounded set of
entries cached under the same tenant, model, config version and other parameters.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import orjson

from app.config import CacheBackendKind, Settings
from app.core.errors import InvalidInput

log = logging.getLogger(__name__)

CACHE_HEADER = "x-gateway-cache"
SIMILARITY_HEADER = "x-gateway-cache-similarity"

# Parameters that never change the answer: who asks, how it is delivered, what is logged.
IGNORED_PARAMETERS = frozenset(
    {"user", "stream", "stream_options", "metadata", "store", "service_tier"}
)

Embedder = Callable[[list[str]], Awaitable[list[list[float]]]]
CacheStatus = Literal["hit", "miss", "bypass"]


def tenant_of(team_id: str | None, key_id: str | None) -> str:
    """Whose answers an entry belongs to: the key's team, or the key itself without a team."""
    if team_id:
        return f"team:{team_id}"
    return f"key:{key_id or '-'}"


@dataclass(frozen=True)
class CacheControl:
    """A request's `Cache-Control`: `no-cache` (don't read), `no-store` (neither), `max-age`."""

    no_cache: bool = False
    no_store: bool = False
    max_age: float | None = None

    @classmethod
    def parse(cls, header: str | None) -> CacheControl:
        """Read the header; unknown directives are ignored, a bad `max-age` is a 400."""
        if not header:
            return cls()
        no_cache = no_store = False
        max_age: float | None = None
        for raw in header.split(","):
            name, _, value = raw.strip().partition("=")
            name = name.strip().lower()
            if name == "no-cache":
                no_cache = True
            elif name == "no-store":
                no_store = True
            elif name == "max-age":
                value = value.strip().strip('"')
                if not value.isdigit():
                    raise InvalidInput(
                        "Cache-Control max-age must be a whole number of seconds",
                        param="Cache-Control",
                    )
                max_age = float(value)
        return cls(no_cache=no_cache, no_store=no_store, max_age=max_age)


@dataclass
class CacheLookup:
    """What `lookup` found, and what `store` needs to keep the answer under the same key."""

    status: CacheStatus
    response: dict[str, Any] | None = None
    similarity: float | None = None
    store_allowed: bool = False
    ttl: float = 0.0
    key: str | None = None
    scope: str | None = None
    vector: list[float] | None = field(default=None, repr=False)

    @property
    def hit(self) -> bool:
        return self.response is not None

    def headers(self) -> dict[str, str]:
        """The response headers reporting the outcome (and the similarity of a semantic hit)."""
        headers: dict[str, str] = {CACHE_HEADER: self.status}
        if self.similarity is not None:
            headers[SIMILARITY_HEADER] = f"{self.similarity:.4f}"
        return headers


class CacheBackend(Protocol):
    """Where entries live: exact entries by key, semantic entries as vectors per scope."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def add_vector(
        self, scope: str, vector: Sequence[float], value: bytes, ttl: float, max_entries: int
    ) -> None: ...

    async def vectors(self, scope: str) -> list[tuple[np.ndarray[Any, Any], bytes]]: ...


def _pack(vector: Sequence[float], value: bytes) -> bytes:
    array = np.asarray(vector, dtype="<f4")
    return len(array).to_bytes(4, "little") + array.tobytes() + value


def _unpack(blob: bytes) -> tuple[np.ndarray[Any, Any], bytes]:
    size = int.from_bytes(blob[:4], "little")
    end = 4 + 4 * size
    return np.frombuffer(blob[4:end], dtype="<f4"), blob[end:]


class MemoryCacheBackend:
    """Entries in this process, least recently used evicted first (one event loop only)."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_scopes: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._max_scopes = max_scopes
        self._clock = clock
        self._exact: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._scopes: OrderedDict[str, OrderedDict[str, tuple[float, bytes]]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        entry = self._exact.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._exact[key]
            return None
        self._exact.move_to_end(key)
        return entry[1]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._exact[key] = (self._clock() + ttl, value)
        self._exact.move_to_end(key)
        while len(self._exact) > self._max_entries:
            self._exact.popitem(last=False)

    async def add_vector(
        self, scope: str, vector: Sequence[float], value: bytes, ttl: float, max_entries: int
    ) -> None:
        entries = self._scopes.setdefault(scope, OrderedDict())
        self._scopes.move_to_end(scope)
        entries[uuid.uuid4().hex] = (self._clock() + ttl, _pack(vector, value))
        while len(entries) > max_entries:
            entries.popitem(last=False)
        while len(self._scopes) > self._max_scopes:
            self._scopes.popitem(last=False)

    async def vectors(self, scope: str) -> list[tuple[np.ndarray[Any, Any], bytes]]:
        entries = self._scopes.get(scope)
        if not entries:
            return []
        now = self._clock()
        for entry_id in [i for i, (expires, _) in entries.items() if expires <= now]:
            del entries[entry_id]
        return [_unpack(blob) for _, blob in entries.values()]


class RedisCacheBackend:
    """Entries shared by every process: exact ones as keys with a TTL, vectors per scope.

    A scope is a sorted set of entry ids scored by expiry, trimmed to its newest entries;
    each entry is its own key with the same TTL, so Redis drops what nobody reads.
    """

    def __init__(self, client: Any, *, prefix: str = "gw:cache:v1") -> None:
        self._client = client  # a redis.asyncio.Redis
        self._prefix = prefix

    async def get(self, key: str) -> bytes | None:
        value = await self._client.get(f"{self._prefix}:x:{key}")
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._client.set(f"{self._prefix}:x:{key}", value, px=max(1, int(ttl * 1000)))

    async def add_vector(
        self, scope: str, vector: Sequence[float], value: bytes, ttl: float, max_entries: int
    ) -> None:
        index = f"{self._prefix}:s:{scope}"
        entry_id = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        ttl_ms = max(1, int(ttl * 1000))
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(f"{index}:{entry_id}", _pack(vector, value), px=ttl_ms)
            pipe.zadd(index, {entry_id: now_ms + ttl_ms})
            pipe.zremrangebyscore(index, "-inf", now_ms)
            pipe.zremrangebyrank(index, 0, -(max_entries + 1))
            pipe.pttl(index)
            results = await pipe.execute()
        if results[-1] < ttl_ms:
            await self._client.pexpire(index, ttl_ms)

    async def vectors(self, scope: str) -> list[tuple[np.ndarray[Any, Any], bytes]]:
        index = f"{self._prefix}:s:{scope}"
        ids = await self._client.zrangebyscore(index, int(time.time() * 1000), "+inf")
        if not ids:
            return []
        keys = [f"{index}:{i.decode() if isinstance(i, bytes) else i}" for i in ids]
        blobs = await self._client.mget(keys)
        return [_unpack(bytes(b)) for b in blobs if b is not None]


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(_canonical(parts)).hexdigest()


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    text = f"{message.get('role', '')}: {content or ''}"
    # Tool calls and names change what the model sees; they go in as JSON.
    return text + (" " + _canonical(extra).decode() if extra else "")


def conversation_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text a semantic cache embeds: every message as `role: content`, one per line."""
    return "\n".join(_message_text(m) for m in messages)


class ResponseCache:
    """Exact and (with an embedder) semantic caching of chat completions."""

    def __init__(
        self,
        backend: CacheBackend,
        *,
        ttl: float = 3600.0,
        timeout: float = 0.5,
        embed: Embedder | None = None,
        semantic_threshold: float = 0.95,
        semantic_max_entries: int = 500,
    ) -> None:
        self._backend = backend
        self._ttl = ttl
        self._timeout = timeout
        self._embed = embed
        self._threshold = semantic_threshold
        self._max_vectors = semantic_max_entries

    @property
    def semantic(self) -> bool:
        return self._embed is not None

    async def lookup(
        self,
        params: Mapping[str, Any],
        *,
        model: str,
        config_version: int | str,
        tenant: str,
        control: CacheControl | None = None,
    ) -> CacheLookup:
        """A cached answer for `params` (the request body as the provider gets it, prompt
        references already rendered), or a miss that `store` can fill.

        `model` is the name the client asked for (a model or a chain) and `config_version` its
        version (for a chain, anything that changes when one of its models does).
        """
        control = control or CacheControl()
        ttl = self._ttl if control.max_age is None else control.max_age
        if control.no_store:
            return CacheLookup("bypass")
        relevant = {k: v for k, v in params.items() if k not in IGNORED_PARAMETERS}
        key = _digest("exact", tenant, model, str(config_version), relevant)
        lookup = CacheLookup("miss", store_allowed=ttl > 0, ttl=ttl, key=key)
        if self._embed is not None:
            others = {k: v for k, v in relevant.items() if k != "messages"}
            lookup.scope = _digest("semantic", tenant, model, str(config_version), others)
        if control.no_cache:
            lookup.status = "bypass"
            return lookup
        cached = await self._guarded(self._backend.get(key), "read")
        if cached is not None:
            lookup.status, lookup.response = "hit", orjson.loads(cached)
            return lookup
        if self._embed is not None and lookup.scope is not None:
            await self._semantic_lookup(lookup, relevant.get("messages") or [])
        return lookup

    async def _semantic_lookup(self, lookup: CacheLookup, messages: Sequence[Any]) -> None:
        assert self._embed is not None and lookup.scope is not None
        try:
            (vector,) = await asyncio.wait_for(
                self._embed([conversation_text(messages)]), timeout=max(self._timeout, 5.0)
            )
        except Exception as exc:  # the answer can still come from the model
            log.warning("semantic cache skipped: embedding failed (%s)", type(exc).__name__)
            return
        lookup.vector = vector
        query = _unit(np.asarray(vector, dtype=np.float32))
        if query is None:
            return
        found = await self._guarded(self._backend.vectors(lookup.scope), "read")
        # Vectors of another size come from another embedding model: never comparable.
        entries = [e for e in found or () if e[0].shape == query.shape]
        if not entries:
            return
        scores = np.stack([e[0] for e in entries]) @ query
        best = int(np.argmax(scores))
        similarity = float(scores[best])
        if similarity >= self._threshold:
            lookup.status, lookup.similarity = "hit", similarity
            lookup.response = orjson.loads(entries[best][1])

    async def store(self, lookup: CacheLookup, response: Mapping[str, Any]) -> bool:
        """Keep `response` under the lookup's key (and vector) unless the request forbade it."""
        if lookup.hit or not lookup.store_allowed or lookup.key is None:
            return False
        value = orjson.dumps(response)
        stored = await self._guarded(self._backend.set(lookup.key, value, lookup.ttl), "write")
        if lookup.vector is not None and lookup.scope is not None:
            unit = _unit(np.asarray(lookup.vector, dtype=np.float32))
            if unit is not None:
                await self._guarded(
                    self._backend.add_vector(
                        lookup.scope, unit.tolist(), value, lookup.ttl, self._max_vectors
                    ),
                    "write",
                )
        return stored is not _FAILED

    async def _guarded(self, call: Awaitable[Any], what: str) -> Any:
        """The backend's answer, or None/_FAILED when it is slow or down: never fail a request."""
        try:
            return await asyncio.wait_for(call, timeout=self._timeout)
        except Exception as exc:
            log.warning("response cache %s skipped: %s", what, type(exc).__name__)
            return None if what == "read" else _FAILED


_FAILED = object()


def _unit(vector: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm):
        return None
    unit: np.ndarray[Any, Any] = vector / norm
    return unit


def completion_chunks(
    completion: Mapping[str, Any], *, include_usage: bool = False
) -> Iterator[dict[str, Any]]:
    """A cached `chat.completion` as the `chat.completion.chunk`s a stream would have sent:
    a role chunk, content word by word, tool calls, a finish chunk, then usage if asked."""
    base = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", int(time.time())),
        "model": completion.get("model", ""),
    }
    if completion.get("system_fingerprint"):
        base["system_fingerprint"] = completion["system_fingerprint"]

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        return {**base, "choices": [choice]}

    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        yield chunk(
            {"index": index, "delta": {"role": message.get("role", "assistant"), "content": ""}}
        )
        content = message.get("content")
        if content:
            words = content.split(" ")
            for position, word in enumerate(words):
                piece = word if position == len(words) - 1 else word + " "
                yield chunk({"index": index, "delta": {"content": piece}})
        for position, call in enumerate(message.get("tool_calls") or []):
            yield chunk({"index": index, "delta": {"tool_calls": [{"index": position, **call}]}})
        yield chunk(
            {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason", "stop")}
        )
    if include_usage and completion.get("usage"):
        yield {**base, "choices": [], "usage": completion["usage"]}


def build_response_cache(
    settings: Settings, *, redis: Any, embed: Embedder | None = None
) -> ResponseCache | None:
    """The cache the settings ask for (`CACHE_*`), or None when caching is off.

    `embed` is used only when `CACHE_SEMANTIC_MODEL` is set (it should call that model).
    """
    if settings.CACHE_BACKEND is CacheBackendKind.NONE:
        return None
    backend: CacheBackend
    if settings.CACHE_BACKEND is CacheBackendKind.REDIS:
        backend = RedisCacheBackend(redis)
    else:
        backend = MemoryCacheBackend(max_entries=settings.CACHE_MAX_ENTRIES)
    return ResponseCache(
        backend,
        ttl=settings.CACHE_TTL_SECONDS,
        timeout=settings.CACHE_TIMEOUT_SECONDS,
        embed=embed if settings.CACHE_SEMANTIC_MODEL else None,
        semantic_threshold=settings.CACHE_SEMANTIC_THRESHOLD,
        semantic_max_entries=settings.CACHE_SEMANTIC_MAX_ENTRIES,
    )
