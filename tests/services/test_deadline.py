"""Waiting for a store at most a bound (docs/audit.md#under-faults)."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.errors import AuditStoreUnavailableError
from broker.services.audit_writer import bounded_wait
from broker.services.deadline import within
from broker.services.group_commit import AuditHealth


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


async def test_a_lookup_answering_just_after_the_process_stalled_is_not_refused() -> None:
    # The process stalls past the bound (a paused VM, a stopped process; here the loop held
    # by a blocking sleep) and the work answers 10 ms after it resumes. Before, its timer had
    # already expired and a healthy lookup was refused 503 token_store_unavailable.
    async def answers_after_the_stall() -> int:
        await asyncio.sleep(0)
        time.sleep(0.5)  # noqa: ASYNC251 - the stall under test
        await asyncio.sleep(0.01)
        return 7

    assert await within(answers_after_the_stall(), 0.2) == 7


async def test_a_store_silent_after_a_stall_is_refused_within_one_more_bound() -> None:
    async def stalls_then_hangs() -> None:
        await asyncio.sleep(0)
        time.sleep(0.5)  # noqa: ASYNC251 - the stall under test
        await asyncio.sleep(30)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(stalls_then_hangs(), 0.2)
    assert 0.65 < time.monotonic() - started < 1.5  # the stall, one more bound, no more


async def test_a_pending_event_committed_just_after_a_stall_is_not_refused() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()

    def stall_then_commit() -> None:
        time.sleep(0.5)  # the process stalls past the bound
        loop.call_later(0.02, future.set_result, 42)  # then the commit lands at once

    loop.call_soon(stall_then_commit)
    health = AuditHealth()
    assert await bounded_wait(future, 0.2, health) == 42
    assert health.failure is None


async def test_a_pending_event_not_committed_within_the_bound_is_refused_and_cancelled() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    health = AuditHealth()
    started = time.monotonic()
    with pytest.raises(AuditStoreUnavailableError):
        await bounded_wait(future, 0.1, health)
    assert time.monotonic() - started < 0.5
    assert future.cancelled()  # a commit landing later records the call as abandoned
    assert health.failure is not None


async def test_a_caller_cancelled_as_the_bound_passes_is_cancelled_not_refused() -> None:
    # The caller is cancelled (a client gone, a shutdown) in the very turn its bound passes,
    # just after the bound cancelled the future: the cancellation must reach the caller, not
    # turn into a refusal it would go on to answer.
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.create_task(bounded_wait(future, 0.05, AuditHealth()))
    await asyncio.sleep(0)  # the wait has begun: its bound is due in 0.05 s
    loop.call_later(0.051, waiting.cancel)  # due in the same turn, just after the bound
    loop.call_later(0.01, time.sleep, 0.08)  # both come due while the loop is held
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert future.cancelled()
