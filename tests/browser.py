"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), for end-to-end tests of the web
client: ``async with Browser.launch(url, fake_audio=wav) as b: await b.evaluate("...")``.

Chromium comes from the system (Debian's ``chromium``; ``AVATAR_CHROMIUM`` names another binary);
``chromium_path()`` is None where there is none. The flags are those measured to work here
(``../shared/FACTS.md``, "Headless Chromium"): fake media devices, the microphone fed from a wav
file, loopback peer connections allowed, local addresses not hidden behind mDNS names. The
DevTools endpoint listens on 127.0.0.1 at a free port, read from ``DevToolsActivePort``.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    env = os.environ.get("AVATAR_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    return next((p for p in map(shutil.which, _CANDIDATES) if p), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page; ``evaluate`` runs JavaScript in it."""

    def __init__(self, proc: subprocess.Popen, profile: tempfile.TemporaryDirectory, http: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse):
        self.proc, self._profile, self._http, self._ws = proc, profile, http, ws
        self._ids = itertools.count(1)
        self.console: list[str] = []  # the page's console messages and uncaught exceptions, as text
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, url: str, *, fake_audio: Path | None = None, timeout_s: float = 30.0, default_webrtc: bool = False):
        exe = chromium_path()
        if exe is None:
            raise BrowserError("no Chromium found (install Debian's chromium, or set AVATAR_CHROMIUM)")
        profile = tempfile.TemporaryDirectory(prefix="avatar-chromium-", ignore_cleanup_errors=True)
        args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns", "--autoplay-policy=no-user-gesture-required",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                f"--user-data-dir={profile.name}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
        if default_webrtc:  # as a user's Chrome: mDNS host names instead of addresses, no loopback candidates
            args = [a for a in args if a not in ("--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns")]
        if fake_audio is not None:
            args.append(f"--use-file-for-fake-audio-capture={fake_audio}")
        args.append(url)
        log = open(Path(profile.name) / "chromium.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: renderers and zygotes go with it
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        browser = None
        try:
            port = await _devtools_port(Path(profile.name), proc, timeout_s)
            ws_url = await _page_target(http, port, timeout_s)
            ws = await http.ws_connect(ws_url, max_msg_size=64 * 2**20)
            browser = cls(proc, profile, http, ws)
            browser._reader = asyncio.create_task(browser._read())
            await browser.send("Runtime.enable")
            yield browser
        finally:
            if browser is not None and browser._reader is not None:
                browser._reader.cancel()
                await asyncio.gather(browser._reader, return_exceptions=True)
                await browser._ws.close()
            await http.close()
            _signal_group(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
            except asyncio.TimeoutError:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            log.close()
            profile.cleanup()

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            m = json.loads(msg.data)
            if "id" in m:
                fut = self._pending.pop(m["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(m)
            elif m.get("method") == "Runtime.consoleAPICalled":
                p = m["params"]
                self.console.append(f"{p['type']}: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif m.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + m["params"]["exceptionDetails"].get("exception", {}).get("description", "?"))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("the DevTools connection closed"))

    async def send(self, method: str, params: dict | None = None, timeout_s: float = 30.0) -> dict:
        if self._reader is not None and self._reader.done():
            raise BrowserError(f"{method}: the DevTools connection is closed (Chromium exited?)")
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self._ws.send_json({"id": i, "method": method, "params": params or {}})
        m = await asyncio.wait_for(fut, timeout_s)
        if "error" in m:
            raise BrowserError(f"{method}: {m['error']}")
        return m["result"]

    async def evaluate(self, expression: str, timeout_s: float = 30.0) -> Any:
        """The value of a JavaScript expression (awaited if a promise); a thrown error raises BrowserError."""
        r = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                            timeout_s)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r} threw: {d.get('exception', {}).get('description', d.get('text'))}")
        return r["result"].get("value")

    async def navigate(self, url: str) -> None:
        """Load another URL in the page (returns once the navigation is committed; poll for what it shows)."""
        r = await self.send("Page.navigate", {"url": url})
        if r.get("errorText"):
            raise BrowserError(f"cannot open {url}: {r['errorText']}")

    async def wait_for(self, expression: str, timeout_s: float, poll_s: float = 0.1) -> Any:
        """Poll until the expression is truthy; its value, or BrowserError after ``timeout_s``."""
        t_end = time.monotonic() + timeout_s
        while True:
            v = await self.evaluate(expression)
            if v:
                return v
            if time.monotonic() > t_end:
                raise BrowserError(f"not true within {timeout_s:g} s: {expression}; console: {self.console[-5:]}")
            await asyncio.sleep(poll_s)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass  # already gone


async def _devtools_port(profile: Path, proc: subprocess.Popen, timeout_s: float) -> int:
    f = profile / "DevToolsActivePort"
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise BrowserError(f"Chromium exited with {proc.returncode}: {(profile / 'chromium.log').read_text(errors='replace')[-2000:]}")
        if f.is_file():
            lines = f.read_text().split()
            if lines and lines[0].isdigit():
                return int(lines[0])
        await asyncio.sleep(0.05)
    raise BrowserError(f"Chromium did not open its DevTools port within {timeout_s:g} s")


async def _page_target(http: aiohttp.ClientSession, port: int, timeout_s: float) -> str:
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        await asyncio.sleep(0.1)
    raise BrowserError("Chromium has no page to drive")
