"""engine/aio.py: waiting never swallows a cancellation, closing outlasts a task that does, and
tests/aio.py turns a test whose loop waits forever into a failure that names what it waits for."""
from __future__ import annotations

import asyncio

import pytest

from engine.aio import cancel_and_wait, wait_bounded, wait_event
from tests import aio


def test_wait_event_keeps_a_cancellation_that_comes_with_the_event():
    """The race behind a hung session close: the pipeline's loop waits for its wake-up event, the
    event is set and the task cancelled in the same loop iteration. asyncio.wait_for before Python
    3.12 returns normally there (CPython gh-86296); wait_event raises CancelledError."""

    async def main():
        ev = asyncio.Event()
        rounds = 0

        async def worker():
            nonlocal rounds
            while True:
                await wait_event(ev, 1.0)
                ev.clear()
                rounds += 1

        for _ in range(20):
            t = asyncio.create_task(worker())
            await asyncio.sleep(0)  # the worker waits
            await asyncio.sleep(0)
            ev.set()
            t.cancel()
            done, _ = await asyncio.wait({t}, timeout=1.0)
            assert t in done and t.cancelled()
        assert await wait_event(ev, None) is True  # set, and left set by the cancelled worker
        assert await wait_event(asyncio.Event(), 0.01) is False

    aio.run(main(), 10)


def test_cancel_and_wait_outlasts_a_swallowed_cancellation_and_wait_bounded_gives_up():
    async def main():
        async def stubborn():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # swallowed once (as a library bug would)
            await asyncio.sleep(10)

        t = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        assert await cancel_and_wait([t], grace_s=0.05)
        assert t.cancelled()

        async def forever():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await asyncio.sleep(10)  # ...and again

        t = asyncio.create_task(forever())
        await asyncio.sleep(0)
        assert not await cancel_and_wait([t], grace_s=0.01, tries=1)  # it never ends: reported, not awaited forever
        t.cancel()

        async def answer():
            await asyncio.sleep(0.01)
            return 42

        assert await wait_bounded(answer(), 1.0) == (True, 42)
        assert await wait_bounded(asyncio.sleep(10), 0.05) == (False, None)

        async def fails():
            raise ValueError("no")

        with pytest.raises(ValueError):
            await wait_bounded(fails(), 1.0)

    aio.run(main(), 10)


def test_a_test_loop_that_waits_forever_fails_with_what_it_waits_for():
    async def stuck():
        await asyncio.get_running_loop().create_future()  # nobody resolves it

    with pytest.raises(TimeoutError, match=r"(?s)within 0.2 s.*stuck"):
        aio.run(stuck(), 0.2)
