"""``run(coro, timeout_s)``: ``asyncio.run`` with a deadline for the tests' event loops.

A test whose coroutine awaits something that never comes (a future nobody resolves) leaves its
loop idle in ``select`` forever, and a thread dump then shows nothing but that. Here the deadline
fails the test instead, naming every task still pending and where each one waits, and the loop's
teardown is bounded too (tasks that ignore cancellation are reported, not awaited forever).
"""
from __future__ import annotations

import asyncio
import io
from typing import Any, Coroutine


def _pending_stacks(skip: asyncio.Task | None) -> str:
    out = io.StringIO()
    for t in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        if t is skip or t.done():
            continue
        out.write(f"--- {t.get_name()}: {t.get_coro()!r}\n")
        t.print_stack(limit=12, file=out)
    return out.getvalue()


async def _bounded(coro: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
    main = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({main}, timeout=timeout_s)
    if main in done:
        return main.result()
    stacks = _pending_stacks(asyncio.current_task())
    main.cancel()
    await asyncio.wait({main}, timeout=5.0)
    raise TimeoutError(f"the test's coroutine did not finish within {timeout_s:g} s; pending tasks:\n{stacks}")


def run(coro: Coroutine[Any, Any, Any], timeout_s: float = 120.0) -> Any:
    """Run ``coro`` on a new event loop; TimeoutError (with every pending task's stack) past ``timeout_s``."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_bounded(coro, timeout_s))
    finally:
        try:
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in left:
                t.cancel()
            if left:
                done, stuck = loop.run_until_complete(asyncio.wait(left, timeout=10.0))
                if stuck:
                    print(f"tests.aio: {len(stuck)} task(s) ignored cancellation: {[t.get_name() for t in stuck]}")
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), 10.0))
        except (asyncio.TimeoutError, TimeoutError):
            print("tests.aio: the default executor did not shut down within 10 s")
        finally:
            asyncio.set_event_loop(None)
            loop.close()
