"""A screenshot of the web client mid-speech, for the docs: `avatar serve` (the default bundle) in a
subprocess, headless Chromium (tests/browser.py) whose fake microphone plays a speech file, the
page started, and a PNG taken once the overlay has numbers.

    .venv/bin/python scripts/web_screenshot.py --out docs/clients/web_page.png [--audio SPEECH.wav]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.server import start_server, stop_server  # noqa: E402
from engine.audio import decode_audio  # noqa: E402
from tests.browser import Browser  # noqa: E402

SPEECH = REPO.parent / "shared" / "data" / "speech" / "echomimic__assets_test_audios_jane.wav"


async def _shoot(url: str, mic: Path, out: Path, after_s: float) -> None:
    async with Browser.launch(f"{url}/?autostart=1", fake_audio=mic) as b:
        await b.send("Emulation.setDeviceMetricsOverride", {"width": 900, "height": 820, "deviceScaleFactor": 1, "mobile": False})
        await b.wait_for("window.avatarClient && window.avatarClient.session && window.avatarClient.session.stats.latencyMs", 60)
        await asyncio.sleep(after_s)
        shot = await b.send("Page.captureScreenshot", {"format": "png"})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "clients" / "web_page.png"))
    ap.add_argument("--audio", default=str(SPEECH))
    ap.add_argument("--after", type=float, default=3.0, help="seconds of speech before the screenshot")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mic = Path(tmp) / "mic.wav"
        x = decode_audio(a.audio, sample_rate_hz=48000)
        with wave.open(str(mic), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
            w.writeframes(np.clip(np.round(x * 32767), -32768, 32767).astype("<i2").tobytes())
        proc, url = start_server()
        try:
            asyncio.run(_shoot(url, mic, Path(a.out), a.after))
        finally:
            stop_server(proc)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
