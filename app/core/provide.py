"""FastAPI dependencies that hand a route the service it uses, by type.

The composition root registers the services of its process on the app (`register`); a router
names what it needs, and nothing else:

    PromptsDep = Annotated[PromptService, Depends(provide(PromptService))]

So a router depends on its own domain's service (and on `access` for the caller), never on a
container of every service, and a test can register a fake of just that one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

from fastapi import FastAPI, Request

T = TypeVar("T")

# Where `register` puts the services on `app.state`.
_STATE = "provided"

# One dependency per type: FastAPI solves a dependency once per request, by identity, so the
# `ApiKeyService` that authenticates a caller and the one its route uses are fetched once.
_DEPENDENCIES: dict[type, Callable[[Request], Awaitable[Any]]] = {}


def register(app: FastAPI, services: Mapping[type, Any]) -> None:
    """Make `services` (each under the type routes ask for) available to `provide`."""
    setattr(app.state, _STATE, dict(services))


def provided(app: FastAPI, kind: type[T]) -> T:
    """The registered service of type `kind` (what `provide(kind)` hands a route)."""
    registry: dict[type, Any] | None = getattr(app.state, _STATE, None)
    if registry is None or kind not in registry:
        raise LookupError(f"no {kind.__name__} is registered on this app")
    return cast(T, registry[kind])


def provide(kind: type[T]) -> Callable[[Request], Awaitable[T]]:
    """A dependency that returns the registered service of type `kind`."""
    known = _DEPENDENCIES.get(kind)
    if known is not None:
        return cast(Callable[[Request], Awaitable[T]], known)

    # `async def` although it awaits nothing: FastAPI runs a plain `def` dependency in a thread
    # pool, which costs more than the rest of a small request.
    async def dependency(request: Request) -> T:
        return provided(request.app, kind)

    dependency.__name__ = f"provide_{kind.__name__}"
    _DEPENDENCIES[kind] = dependency
    return dependency
