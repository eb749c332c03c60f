"""Waiting for a store at most a bound (docs/audit.md#under-faults)."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.services.deadline import within


async def test_the_result_comes_back_within_the_bound() -> None:
    async def quick() -> int:
        await asyncio.sleep(0)
        return 7

    assert await within(quick(), 1.0) == 7
    assert await within(quick(), None) == 7


async def test_past_the_bound_the_caller_goes_on_and_the_work_finishes_behind_it() -> None:
    finished = asyncio.Event()

    async def clean_up_slowly() -> int:
        try:
            await asyncio.sleep(0.3)
        finally:
            await asyncio.shield(asyncio.sleep(0.2))  # as SQLAlchemy shields its clean-up
            finished.set()
        return 1

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(clean_up_slowly(), 0.05)
    assert time.monotonic() - started < 0.25  # not the clean-up's 0.5 s
    async with asyncio.timeout(5):
        await finished.wait()


async def test_a_failure_after_the_bound_is_not_left_unretrieved() -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))

    async def fails_late() -> None:
        await asyncio.sleep(0.1)
        raise OSError("the connection is gone")

    with pytest.raises(TimeoutError):
        await within(fails_late(), 0.01)
    await asyncio.sleep(0.2)
    import gc  # noqa: PLC0415 - an unretrieved exception is reported when the task is collected

    gc.collect()
    assert unhandled == []
