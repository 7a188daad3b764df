"""Peak memory of ``avatar render`` against the audio's length (issue 15: a 40-minute file took the
render to ~2 GB, the whole file decoded twice). Writes docs/benchmarks/render_memory.json.

  audio path   the render's whole audio side for a LONG file (default 40 minutes): the pipeline's
               FileSource read to its end (16 kHz chunks) while the mp4's 48 kHz track is pulled in
               step, 1920 samples a frame, as engine/media/mp4.py does; no models. Each in its own
               process; peak RSS (VmHWM: ru_maxrss would carry the parent's from before the exec)
               against the same process's baseline after the imports.
  render       ``engine.render.render`` end to end (pipeline, H.264 + AAC mux, watermark) with a tiny
               random-weight bundle (tests/tiny.py: the models' own memory is not what is measured)
               for a few SHORT lengths (default 1 and 5 minutes): peak RSS of each process, which is
               flat in the length when nothing is held whole.

The speech: ../shared/data/speech (or the demo voice) looped into a 48 kHz mono 16-bit wav.

    python -m benchmarks.render_memory [--minutes 40] [--render-minutes 1 5] [--out docs/benchmarks/render_memory.json]

Bounded: about 4 minutes on 2 CPU cores with the defaults (a minute of render takes ~35 s there).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_SPEECH = REPO.parent / "shared" / "data" / "speech" / "MuseTalk__data_audio_eng.wav"
DEMO_VOICE = REPO / "engine" / "assets" / "demo" / "demo_voice.wav"
RATE_HZ = 48000  # the long file's rate (the render decodes it at 16 kHz and at 48 kHz)

_HWM = r"""
def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
"""

_AUDIO_PATH = _HWM + r"""
import asyncio, json, sys
import numpy as np
from engine.audio.decode import AudioBlocks
from engine.pipeline.sources import FileSource
base = hwm_mib()

async def main():
    src, track, n = FileSource(sys.argv[1], realtime=False, playback=False), iter(AudioBlocks(sys.argv[1], sample_rate_hz=48000)), 0
    buf = np.zeros(0, np.float32)
    async for chunk in src:
        n += 1
        if n % 4 == 0:  # a 25 fps frame per 4 chunks: its 1920 samples of the 48 kHz track
            while buf.size < 1920:
                b = next(track, None)
                if b is None:
                    break
                buf = np.concatenate([buf, b])
            buf = buf[1920:]
    return n, src.duration_s

n, dur = asyncio.run(main())
peak = hwm_mib()
print(json.dumps({"audio_s": dur, "chunks": n, "baseline_rss_mib": base, "peak_rss_mib": peak, "peak_over_baseline_mib": round(peak - base, 1)}))
"""

_RENDER = _HWM + r"""
import json, sys, time
from pathlib import Path
from engine.cli import DEMO
from engine.render import render
t = time.time()
info = render(DEMO / "astronaut.jpg", sys.argv[1], sys.argv[2], bundle=Path(sys.argv[3]), progress=False, threads=1, c2pa=False)
print(json.dumps({"audio_s": info["audio_s"], "frames": info["frames"], "wall_s": round(time.time() - t, 1),
                  "peak_rss_mib": hwm_mib()}))
"""


def long_wav(path: Path, minutes: float) -> Path:
    """A ``minutes`` long 48 kHz mono 16-bit wav of speech (a speech file looped), written in pieces."""
    sys.path.insert(0, str(REPO))
    from engine.audio.decode import decode_audio

    speech = SHARED_SPEECH if SHARED_SPEECH.is_file() else DEMO_VOICE
    x = (np.clip(decode_audio(speech, sample_rate_hz=RATE_HZ), -1, 1) * 32767).astype("<i2")
    n = int(minutes * 60 * RATE_HZ)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE_HZ)
        done = 0
        while done < n:
            k = min(len(x), n - done)
            w.writeframes(x[:k].tobytes())
            done += k
    return path


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_render_memory(out: str | Path, *, minutes: float = 40.0, render_minutes: tuple[float, ...] = (1.0, 5.0)) -> dict:
    sys.path.insert(0, str(REPO))
    from tests.tiny import tiny_bundle

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        audio = _child(_AUDIO_PATH, str(long_wav(tmp / "long.wav", minutes)))
        print(f"audio path, {minutes:g} min: peak RSS {audio['peak_rss_mib']} MiB ({audio['peak_over_baseline_mib']} over the imports)", flush=True)
        bundle = tiny_bundle(tmp / "bundle")
        renders = []
        for m in render_minutes:
            r = _child(_RENDER, str(long_wav(tmp / f"r{m:g}.wav", m)), str(tmp / "out.mp4"), str(bundle))
            renders.append({"minutes": m, **r})
            print(f"render, {m:g} min: peak RSS {r['peak_rss_mib']} MiB ({r['wall_s']} s)", flush=True)
    result = {
        "benchmark": "render_memory", "speech": (SHARED_SPEECH if SHARED_SPEECH.is_file() else DEMO_VOICE).name, "file_rate_hz": RATE_HZ,
        "audio_path": {"minutes": minutes, **audio}, "render_tiny_bundle": renders,
        "render_peak_rss_spread_mib": round(max(r["peak_rss_mib"] for r in renders) - min(r["peak_rss_mib"] for r in renders), 1),
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "note": "peak RSS (VmHWM) of one process each; the render with a tiny random-weight bundle, so the figure is the "
                "pipeline's and the mux's memory, not the models'; the default bundle adds its weights once, whatever the length",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=40.0, help="length of the file for the audio path")
    ap.add_argument("--render-minutes", type=float, nargs="+", default=[1.0, 5.0], help="lengths rendered end to end")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "render_memory.json"))
    a = ap.parse_args(argv)
    bench_render_memory(a.out, minutes=a.minutes, render_minutes=tuple(a.render_minutes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
