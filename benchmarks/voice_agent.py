"""``avatar bench agent``: a voice agent's replies through the pipecat adapter, in a real pipecat
pipeline (``clients/pipecat/example.py``: pipecat's own ``PipelineWorker`` / ``WorkerRunner``, the
wav TTS stand-in streaming 24 kHz pieces of 20 ms at 2x real time, ``AvatarVideoProcessor``, an
output transport that plays in real time), with the shipped default bundle and its default
``PipelineConfig(realtime=True)``.

Per reply (``--replies``, >= 20 for the issue's p95) it measures, on the event loop's clock:

- first-frame latency: the reply's first TTS audio pushed by the TTS -> the reply's first avatar
  speech frame shown by the output transport (its image; its audio is written right after it);
  split into where the time goes: TTS -> the processor, -> the engine's reader (audio arrival),
  -> the frame handed out by the engine (lookahead + models), -> the processor's send (pacing),
  -> shown by the transport (its audio queue);
- segment-end delay: the reply's last speech audio played -> the TTS stopped frame / bot stopped
  speaking, after the transport;
- lips / audio offset: each speech frame's audio located in the reply's audio by correlation
  (0 = the image carries exactly its own audio);

and, in a second short run per barge-in (``--barge-ins``), the frames of speech played after the
interruption and the time to the bot stopped speaking, in frames.

The 2 cores of the reference machine may be shared with other work: the numbers are what was
measured then (the JSON records the load average before and after).
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "engine" / "assets" / "demo"


def _q(xs: list[float], p: float) -> float | None:
    return round(float(np.percentile(np.asarray(xs, np.float64), p)), 1) if xs else None


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    return {"p50": _q(xs, 50), "p95": _q(xs, 95), "max": round(max(xs), 1) if xs else None,
            "mean": round(float(np.mean(xs)), 1) if xs else None, "n": len(xs)}


def _probe_cls():
    """``AvatarVideoProcessor`` that records when each TTS piece came in and each engine frame went out."""
    from clients.pipecat.processor import AvatarVideoProcessor

    class Probe(AvatarVideoProcessor):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.audio_in: list[float] = []  # loop time of each TTSAudioRawFrame taken
            self.audio_pushed: list[float] = []  # ... and of its push into the engine's PushSource done
            self.sent: list[tuple[float, object]] = []  # (loop time, OutputFrame) at _send

        async def _push_audio(self, frame) -> None:
            self.audio_in.append(asyncio.get_running_loop().time())
            await super()._push_audio(frame)
            self.audio_pushed.append(asyncio.get_running_loop().time())

        async def _send(self, f) -> None:
            self.sent.append((asyncio.get_running_loop().time(), f))
            await super()._send(f)

    return Probe


def _av_offset(frames: list, ref48: np.ndarray, max_lag: int = 2) -> dict:
    """Where each speech frame's 48 kHz audio sits in the reply's audio, in frames, relative to the
    frame's place on the reply's timeline (0 = in sync)."""
    n = 1920
    offsets = []
    for j, f in enumerate(frames):
        a = np.asarray(f.playback, np.float64)
        if np.sum(a**2) < 1e-4:
            continue
        best, best_lag = -1.0, None
        for lag in range(-max_lag, max_lag + 1):
            lo = (j + lag) * n
            if lo < 0 or lo + n > len(ref48):
                continue
            b = ref48[lo : lo + n]
            c = float(np.dot(a, b) / (np.sqrt(np.sum(a**2) * np.sum(b**2)) + 1e-12))
            if c > best:
                best, best_lag = c, lag
        if best_lag is not None and best > 0.5:
            offsets.append(best_lag)
    return {"frames_checked": len(offsets), "max_abs_offset_frames": int(max((abs(o) for o in offsets), default=0)),
            "nonzero": int(sum(o != 0 for o in offsets))}


def _replies(run, fps: int, ref48: np.ndarray) -> list[dict]:
    from pipecat.frames.frames import (BotStoppedSpeakingFrame, OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame,
                                       TTSStoppedFrame)

    period_ms = 1000.0 / fps
    starts = [t for t, f in run.tts.pushed if isinstance(f, TTSStartedFrame)]
    tts_audio = [t for t, f in run.tts.pushed if isinstance(f, TTSAudioRawFrame)]
    played = run.log.frames
    sent = run.avatar.sent
    out = []
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else float("inf")
        t_tts = next((t for t in tts_audio if s <= t < end), None)
        j_in = next((j for j, t in enumerate(run.avatar.audio_in) if t_tts is not None and t >= t_tts), None)
        t_in = run.avatar.audio_in[j_in] if j_in is not None else None
        t_pushed = run.avatar.audio_pushed[j_in] if j_in is not None else None
        # the engine's frames of this reply, as the processor sent them: the first speech frame is the first with
        # audible audio from the timeline (the processor's own rule for the reply's first frame)
        mine = [(t, f) for t, f in sent if f.audio_arrival_s is not None and s <= f.audio_arrival_s < end]
        first = next(((t, f) for t, f in mine if f.audio.any()), None)
        # what the transport played: the reply's first speech audio and the image just before it
        idx = [j for j, (t, f) in enumerate(played) if s <= t < end and type(f) is TTSAudioRawFrame]
        r: dict = {"reply": i}
        if t_tts is None or first is None or not idx:
            r["error"] = "no speech played"
            out.append(r)
            continue
        j0 = idx[0]
        t_image = next((played[j][0] for j in range(j0, -1, -1) if isinstance(played[j][1], OutputImageRawFrame)), None)
        t_audio = played[j0][0]
        t_sent, f0 = first
        r.update({
            "first_frame_ms": round(1000 * (t_image - t_tts), 1),  # first TTS audio -> first avatar speech image shown
            "first_audio_played_ms": round(1000 * (t_audio - t_tts), 1),
            "split_ms": {
                "tts_to_processor": round(1000 * (t_in - t_tts), 1) if t_in else None,
                "processor_push": round(1000 * (t_pushed - t_in), 1) if t_in else None,
                "push_to_engine_reader": round(1000 * (f0.audio_arrival_s - t_pushed), 1) if t_in else None,
                "engine_reader_to_frame_out": round(1000 * (f0.emitted_s - f0.audio_arrival_s), 1),
                "frame_out_to_processor_send": round(1000 * (t_sent - f0.emitted_s), 1),
                "processor_send_to_shown": round(1000 * (t_image - t_sent), 1),
            },
        })
        t_last = played[idx[-1]][0]
        t_stop = next((t for t, f in played if isinstance(f, TTSStoppedFrame) and t_last <= t < end), None)
        t_bot = next((t for t, f in played if isinstance(f, BotStoppedSpeakingFrame) and t_last <= t < end), None)
        # the frame's audio is written (and starts playing) when the log sees it; it has been played one frame later
        r["segment_end_after_last_audio_ms"] = round(1000 * (t_stop - t_last), 1) if t_stop else None
        r["bot_stopped_after_last_audio_ms"] = round(1000 * (t_bot - t_last), 1) if t_bot else None
        r["segment_end_within_one_frame"] = bool(t_stop is not None and 1000 * (t_stop - t_last) <= period_ms)
        r["av_offset"] = _av_offset([f for _, f in mine], ref48)  # the reply's timeline frames, frame 0 first
        out.append(r)
    return out


def _barge(run, fps: int) -> dict:
    from pipecat.frames.frames import BotStoppedSpeakingFrame, TTSAudioRawFrame

    t_b = run.barge_in_s[0]
    played = run.log.frames
    speech_after = [t for t, f in played if type(f) is TTSAudioRawFrame and t > t_b]
    bot = next((t for t, f in played if isinstance(f, BotStoppedSpeakingFrame) and t >= t_b), None)
    return {"speech_frames_after_barge_in": len(speech_after),
            "last_speech_after_barge_in_frames": round((max(speech_after) - t_b) * fps, 2) if speech_after else 0.0,
            "bot_stopped_after_barge_in_frames": round((bot - t_b) * fps, 2) if bot is not None else None,
            "segments_interrupted": run.avatar.segments_interrupted}


async def _livekit_run(rt, av, config, *, replies: int, reply_s: float, tts_speed: float) -> list[dict]:
    """The LiveKit adapter inside livekit-agents' own ``AvatarRunner`` (its ``AVSynchronizer``, ``rtc.AudioSource`` /
    ``VideoSource``) with ``QueueAudioOutput`` as the agent's audio output; only the room is a stand-in (it publishes
    nothing). Per reply: first TTS audio given to the agent output -> the reply's first speech video frame captured
    by the runner's ``VideoSource`` (and its first audio by the ``AudioSource``); the reply's last audio captured by
    the ``AudioSource`` -> the agent output's ``playback_finished``."""
    from livekit import rtc
    from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput

    from clients.livekit import AvatarVideoGenerator
    from clients.livekit.local_room import LocalRoom
    from clients.pipecat.example import DEMO_VOICE, TTS_RATE_HZ
    from engine.audio import decode_audio

    loop = asyncio.get_running_loop()

    class Gen(AvatarVideoGenerator):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.speech_video: list[object] = []  # video frames yielded with a reply's audio (kept: ids stay unique)

        def _translate(self, f):
            out = super()._translate(f)
            if len(out) > 1 and isinstance(out[1], rtc.AudioFrame):
                self.speech_video.append(out[0])
            return out

    wave = decode_audio(DEMO_VOICE, sample_rate_hz=TTS_RATE_HZ)[: int(reply_s * TTS_RATE_HZ)]
    pcm = (np.clip(wave, -1, 1) * 32767).round().astype(np.int16)
    piece = TTS_RATE_HZ // 50
    gen = Gen(rt, av, config=config)
    agent_out = QueueAudioOutput(wait_playback_start=True)
    finished: list[float] = []  # loop time of each playback_finished the agent's output got
    agent_out.on("playback_finished", lambda ev: finished.append(loop.time()))
    runner = AvatarRunner(LocalRoom(), audio_recv=agent_out, video_gen=gen, options=gen.avatar_options())
    await runner.start()
    video_log: list[tuple[float, object]] = []
    audio_log: list[float] = []
    vs, aus = runner._video_source, runner._audio_source  # the runner's sources: when a frame is captured (played)
    v_cap, a_cap = vs.capture_frame, aus.capture_frame

    def cap_video(frame, *a, **kw):
        video_log.append((loop.time(), frame))
        return v_cap(frame, *a, **kw)

    async def cap_audio(frame, *a, **kw):
        audio_log.append(loop.time())
        return await a_cap(frame, *a, **kw)

    vs.capture_frame, aus.capture_frame = cap_video, cap_audio
    out = []
    try:
        await asyncio.sleep(0.5)  # idle frames flowing, as between turns
        for i in range(replies):
            t0 = loop.time()
            for k in range(0, len(pcm), piece):
                delay = t0 + k / TTS_RATE_HZ / tts_speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                x = pcm[k : k + piece]
                await agent_out.capture_frame(rtc.AudioFrame(x.tobytes(), TTS_RATE_HZ, 1, len(x)))
            agent_out.flush()
            await asyncio.wait_for(agent_out.wait_for_playout(), 10 + 2 * reply_s)
            t_done = loop.time()
            speech = {id(v) for v in gen.speech_video}
            first_v = next((t for t, v in video_log if t >= t0 and id(v) in speech), None)
            first_a = next((t for t in audio_log if t >= t0), None)
            end = next((t for t in finished if t >= t0), None)
            last_a = max((t for t in audio_log if t0 <= t <= (end or t_done)), default=None)
            out.append({"reply": i,
                        "first_frame_ms": round(1000 * (first_v - t0), 1) if first_v else None,
                        "first_audio_played_ms": round(1000 * (first_a - t0), 1) if first_a else None,
                        "segment_end_after_last_audio_ms": round(1000 * (end - last_a), 1) if end and last_a else None})
            await asyncio.sleep(0.2)  # the user's turn
    finally:
        await runner.aclose()
        await gen.aclose()
    return out


def bench_agent(out: str | Path | None = "docs/benchmarks/voice_agent.json", *, replies: int = 20, reply_s: float = 1.0,
                barge_ins: int = 2, bundle: str | None = None, backend: str = "auto", threads: int | None = None,
                precision: str | None = None, portrait: str | None = None, tts_speed: float = 2.0,
                livekit: bool = True) -> dict:
    from clients.pipecat.example import DEMO_VOICE, run_agent
    from engine.audio import decode_audio
    from engine.avatar import load_portrait, prepare_avatar
    from engine.pipeline.pipeline import PipelineConfig
    from engine.runtime import load_runtime

    load0 = os.getloadavg()
    rt = load_runtime(bundle, backend, threads=threads, precision=precision)
    av = prepare_avatar(load_portrait(portrait or DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    fps = rt.bundle.fps
    ref48 = decode_audio(DEMO_VOICE, sample_rate_hz=48000)[: int(reply_s * 48000)].astype(np.float64)
    probe = _probe_cls()
    cfg = PipelineConfig(realtime=True)
    t0 = time.monotonic()
    run = asyncio.run(run_agent(rt, av, replies=replies, max_reply_s=reply_s, config=cfg, tts_speed=tts_speed,
                                timeout_s=60 + 5 * replies * (reply_s + 1), processor_cls=probe))
    per = _replies(run, fps, ref48)
    barges = []
    for _ in range(barge_ins):
        b = asyncio.run(run_agent(rt, av, replies=1, max_reply_s=3.0, barge_in_after_s=0.5, config=cfg, tts_speed=tts_speed,
                                  timeout_s=60, processor_cls=probe))
        barges.append(_barge(b, fps))
    lk = None
    if livekit:
        try:
            import livekit.agents  # noqa: F401
        except ImportError:
            lk = {"skipped": "livekit-agents is not installed"}
        else:
            lk_per = asyncio.run(_livekit_run(rt, av, cfg, replies=replies, reply_s=reply_s, tts_speed=tts_speed))
            lk = {"what": "the LiveKit adapter in livekit-agents' AvatarRunner (AVSynchronizer, rtc sources; a stand-in room)",
                  "first_frame_ms": _stats([r["first_frame_ms"] for r in lk_per]),
                  "first_audio_played_ms": _stats([r["first_audio_played_ms"] for r in lk_per]),
                  "segment_end_after_last_audio_ms": _stats([r["segment_end_after_last_audio_ms"] for r in lk_per]),
                  "per_reply": lk_per}
    ok = [r for r in per if "error" not in r]
    split_keys = list(ok[0]["split_ms"]) if ok else []
    rep = {
        "what": "a voice agent's replies through the pipecat adapter in a real pipecat pipeline (clients/pipecat/example.py)",
        "adapter": "pipecat",
        "runtime": {k: v for k, v in rt.describe().items() if k != "graphs"},
        "fps": fps,
        "audio_lookahead_ms": None,
        "replies": len(per),
        "reply_s": reply_s,
        "tts": f"24 kHz pieces of 20 ms at {tts_speed}x real time",
        "first_frame_ms": _stats([r["first_frame_ms"] for r in ok]),
        "first_audio_played_ms": _stats([r["first_audio_played_ms"] for r in ok]),
        "first_frame_split_ms_p50": {k: _q([r["split_ms"][k] for r in ok if r["split_ms"][k] is not None], 50) for k in split_keys},
        "first_frame_split_ms_p95": {k: _q([r["split_ms"][k] for r in ok if r["split_ms"][k] is not None], 95) for k in split_keys},
        "segment_end_after_last_audio_ms": _stats([r["segment_end_after_last_audio_ms"] for r in ok]),
        "bot_stopped_after_last_audio_ms": _stats([r["bot_stopped_after_last_audio_ms"] for r in ok]),
        "segment_ends_within_one_frame": sum(r["segment_end_within_one_frame"] for r in ok),
        "av_offset_max_abs_frames": max((r["av_offset"]["max_abs_offset_frames"] for r in ok), default=None),
        "av_offset_frames_checked": sum(r["av_offset"]["frames_checked"] for r in ok),
        "barge_ins": barges,
        "barge_in_bot_stopped_frames_max": max((b["bot_stopped_after_barge_in_frames"] or 0 for b in barges), default=None),
        "barge_in_last_speech_frames_max": max((b["last_speech_after_barge_in_frames"] for b in barges), default=None),
        "per_reply": per,
        "livekit": lk,
        "wall_s": round(time.monotonic() - t0, 1),
        "machine": {"cores_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    try:
        from engine.pipeline.features import StreamingFeatures

        rep["audio_lookahead_ms"] = StreamingFeatures(rt, fps=fps).lookahead_ms
    except Exception:  # informative only
        pass
    if out is not None:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rep, indent=1) + "\n")
    return rep


def summary(r: dict) -> str:
    ff, sp = r["first_frame_ms"], r["first_frame_split_ms_p50"]
    return (f"{r['replies']} replies via {r['adapter']}: first avatar frame after the first TTS audio p50 {ff['p50']} / p95 {ff['p95']} ms "
            f"(lookahead {r['audio_lookahead_ms']} ms; p50 split {sp}); segment end after the last audio p95 "
            f"{r['segment_end_after_last_audio_ms']['p95']} ms ({r['segment_ends_within_one_frame']}/{r['replies']} within a frame); "
            f"A/V offset max {r['av_offset_max_abs_frames']} frames over {r['av_offset_frames_checked']}; barge-in: bot stopped after "
            f"{r['barge_in_bot_stopped_frames_max']} frames, last speech {r['barge_in_last_speech_frames_max']} frames; "
            f"load {r['machine']['loadavg_before'][0]} -> {r['machine']['loadavg_after'][0]}"
            + (f"; LiveKit runner: first frame p50 {r['livekit']['first_frame_ms']['p50']} / p95 {r['livekit']['first_frame_ms']['p95']} ms, "
               f"first audio p95 {r['livekit']['first_audio_played_ms']['p95']} ms, segment end after the last audio p95 "
               f"{r['livekit']['segment_end_after_last_audio_ms']['p95']} ms" if r.get("livekit") and "first_frame_ms" in r["livekit"] else ""))


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks/voice_agent.json")
    ap.add_argument("--replies", type=int, default=20)
    ap.add_argument("--reply-s", type=float, default=1.0)
    ap.add_argument("--barge-ins", type=int, default=2)
    ap.add_argument("--bundle")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-livekit", action="store_true")
    a = ap.parse_args(argv)
    r = bench_agent(a.out, replies=a.replies, reply_s=a.reply_s, barge_ins=a.barge_ins, bundle=a.bundle, backend=a.backend,
                    threads=a.threads, livekit=not a.no_livekit)
    print(summary(r))


if __name__ == "__main__":
    main()
