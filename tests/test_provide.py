"""Routes are handed one service by type: the one the composition root registered."""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from app.core.provide import provide, register


class Greeter:
    def __init__(self, word: str) -> None:
        self.word = word


class Unregistered:
    pass


GreeterDep = Annotated[Greeter, Depends(provide(Greeter))]


def greeting_app() -> FastAPI:
    app = FastAPI()

    @app.get("/greet")
    async def greet(greeter: GreeterDep) -> dict[str, str]:
        return {"word": greeter.word}

    return app


def test_a_route_gets_the_registered_service_and_a_test_can_swap_in_another() -> None:
    app = greeting_app()
    register(app, {Greeter: Greeter("hello")})
    with TestClient(app) as client:
        assert client.get("/greet").json() == {"word": "hello"}
        register(app, {Greeter: Greeter("fake")})
        assert client.get("/greet").json() == {"word": "fake"}


def test_one_type_is_one_dependency_so_a_request_fetches_it_once() -> None:
    # FastAPI caches a dependency per request by identity: authentication and the route that
    # both ask for `ApiKeyService` share one answer only if they ask with the same callable.
    assert provide(Greeter) is provide(Greeter)
    assert provide(Greeter) is not provide(Unregistered)


def test_asking_for_an_unregistered_type_names_it() -> None:
    app = FastAPI()

    @app.get("/nothing")
    async def nothing(_: Annotated[Unregistered, Depends(provide(Unregistered))]) -> None:
        return None

    register(app, {Greeter: Greeter("hello")})
    with TestClient(app) as client, pytest.raises(LookupError, match="Unregistered"):
        client.get("/nothing")
