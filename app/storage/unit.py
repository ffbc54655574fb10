"""What every backend's unit of work does the same way: its life cycle and after-commit callbacks.

A backend subclasses `UnitOfWorkBase`, adds `repo`, `commit` and `rollback`, and calls
`_usable()` before each read or write and `_run_callbacks()` once its commit has succeeded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self


class UnitOfWorkBase:
    """The state both backends keep: autocommit, failed after a constraint, done once closed."""

    def __init__(self, *, autocommit: bool = False) -> None:
        self._autocommit = autocommit
        self._callbacks: list[Callable[[], Any]] = []
        self._failed = False
        self._done = False

    def on_commit(self, callback: Callable[[], Any]) -> None:
        self._callbacks.append(callback)

    async def rollback(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            await self.rollback()

    def _usable(self) -> None:
        if self._failed:
            raise RuntimeError("this unit of work failed on a constraint; roll it back")
        if self._done:
            raise RuntimeError("this unit of work is finished; open a new one")

    async def _run_callbacks(self) -> None:
        """Run the after-commit callbacks once, in order, awaiting those that return awaitables."""
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            result = callback()
            if inspect.isawaitable(result):
                await result
