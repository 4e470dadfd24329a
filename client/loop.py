"""A trio event loop in a background thread, so the Python API stays synchronous."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self, name: str = "trustswarm-client") -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._setup: Callable[[trio.Nursery], Awaitable[None]] | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self, setup: Callable[[trio.Nursery], Awaitable[None]]) -> None:
        """Run `setup(nursery)` inside the loop; it returns once the loop is usable."""
        self._setup = setup
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        await self._setup(nursery)  # type: ignore[misc]
                    except BaseException as exc:
                        self._error = _single_cause(exc)
                        self._ready.set()
                        nursery.cancel_scope.cancel()
                        return
                    self._ready.set()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            finally:
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # surfaced to the caller of start()
            if self._error is None:
                self._error = _single_cause(exc)
            self._ready.set()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._token is None or not self._thread.is_alive():
            raise RuntimeError("the client's network loop is not running (closed?)")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._thread.is_alive() and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(timeout=10)


def _single_cause(exc: BaseException) -> BaseException:
    """Nurseries wrap errors in groups; a group of one error is just that error."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
