"""Small asyncio helpers that keep cancellation working.

``asyncio.wait_for`` before Python 3.12 loses a cancellation that arrives in the same loop
iteration as its inner awaitable completes: it returns the result instead of raising
CancelledError (CPython gh-86296). A loop that waits for a frequently set event with it (the
pipeline wakes on every 20 ms chunk) then survives ``task.cancel()``, keeps running, and whoever
awaits the cancelled task (closing a session) waits forever. These helpers wait with
``asyncio.wait``, which never swallows a cancellation, and close tasks by cancelling again until
they end.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Iterable


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed (None: no limit); True if it is set."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        if not waiter.done():
            waiter.cancel()
    return event.is_set()


async def wait_bounded(aw: Awaitable[Any], timeout_s: float) -> tuple[bool, Any]:
    """Await ``aw`` for at most ``timeout_s`` (cancelled past it): (finished, its result or None).
    Its exception, if it raised one in time, is raised here."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except BaseException:
        task.cancel()
        raise
    if task in done:
        return True, task.result()
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    return False, None


async def cancel_and_wait(tasks: Iterable[asyncio.Future], *, grace_s: float = 0.5, tries: int = 20,
                          log: logging.Logger | None = None, what: str = "tasks") -> bool:
    """Cancel ``tasks`` and wait until they end, cancelling again each ``grace_s`` a task lives on
    (a cancellation some library swallowed); True if all ended within ``tries`` rounds."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(tries):
        if not pending:
            return True
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=grace_s)
    if pending and log is not None:
        log.warning("%s: %d task(s) still running after %d cancellations: %s", what, len(pending), tries,
                    [t.get_name() if isinstance(t, asyncio.Task) else t for t in pending])
    return not pending
