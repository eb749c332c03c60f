"""GroupCommit: the one batching policy of every audit writer (docs/audit.md#group-commit)."""

from __future__ import annotations

import asyncio

from broker.services.group_commit import GroupCommit

DELAY = 0.05


class Flushes:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, batch: list[str]) -> None:
        self.batches.append(batch)


async def test_items_someone_waits_for_go_together_at_the_end_of_the_turn() -> None:
    flushed = Flushes()
    queue: GroupCommit[str] = GroupCommit(flushed, completion_delay=DELAY, max_batch=100)
    queue.put("a", waited=True)
    queue.put("b", waited=True)
    assert flushed.batches == []  # not before the turn ends
    assert queue.waited == 2
    await asyncio.sleep(0)
    assert flushed.batches == [["a", "b"]]
    assert (len(queue), queue.waited) == (0, 0)


async def test_completions_ride_along_with_the_next_waited_item() -> None:
    flushed = Flushes()
    queue: GroupCommit[str] = GroupCommit(flushed, completion_delay=DELAY, max_batch=100)
    queue.put("done-1", waited=False)
    queue.put("done-2", waited=False)
    await asyncio.sleep(0)
    assert flushed.batches == []
    queue.put("pending", waited=True)
    await asyncio.sleep(0)
    assert flushed.batches == [["done-1", "done-2", "pending"]]
    await asyncio.sleep(DELAY * 2)
    assert flushed.batches == [["done-1", "done-2", "pending"]]  # the timer was cancelled


async def test_completions_alone_go_after_the_delay() -> None:
    flushed = Flushes()
    done = asyncio.Event()

    def flush(batch: list[str]) -> None:
        flushed(batch)
        done.set()

    queue: GroupCommit[str] = GroupCommit(flush, completion_delay=DELAY, max_batch=100)
    queue.put("done", waited=False)
    await asyncio.sleep(DELAY / 5)
    assert flushed.batches == []
    async with asyncio.timeout(2):
        await done.wait()
    assert flushed.batches == [["done"]]


async def test_batches_hold_at_most_max_batch_items_in_order() -> None:
    flushed = Flushes()
    queue: GroupCommit[str] = GroupCommit(flushed, completion_delay=DELAY, max_batch=2)
    for name in "abcde":
        queue.put(name, waited=True)
    await asyncio.sleep(0)
    assert flushed.batches == [["a", "b"], ["c", "d"], ["e"]]


async def test_take_empties_the_queue_and_put_back_returns_items_first_in_line() -> None:
    flushed = Flushes()
    queue: GroupCommit[str] = GroupCommit(flushed, completion_delay=DELAY, max_batch=100)
    queue.put("done", waited=False)
    queue.put("x", waited=True)
    assert queue.take() == ["done", "x"]
    assert (len(queue), queue.waited) == (0, 0)
    await asyncio.sleep(0)
    assert flushed.batches == []  # the scheduled flush went with the items
    queue.put_back(["done"])
    queue.put("y", waited=True)
    await asyncio.sleep(0)
    assert flushed.batches == [["done", "y"]]
