"""Calls started at the same moment from threads of their own, for tests of concurrent requests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def at_once(calls: list[Callable[[], T]], *, timeout: float = 600) -> list[T]:
    """Each call's result, in order; the first exception any of them raised is raised here."""
    results: dict[int, T | BaseException] = {}
    barrier = threading.Barrier(len(calls))

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = calls[index]()
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the test's thread
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert len(results) == len(calls), (
        f"{len(calls) - len(results)} of {len(calls)} calls did not finish in {timeout} s"
    )
    for result in results.values():
        if isinstance(result, BaseException):
            raise result
    return [results[index] for index in range(len(calls))]  # type: ignore[misc]
