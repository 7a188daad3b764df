"""`avatar`: the command line. Thin: parse arguments, call the library, report errors plainly."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.cli_checks import OneLineParser, check_args, interrupted, listen_error, version
from engine.errors import AvatarInputError

DEMO = Path(__file__).resolve().parent / "assets" / "demo"  # public-domain portrait and synthesised voice (see its README)


def _cmd_prepare(a: argparse.Namespace) -> int:
    from engine.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(
        crop_size_px=a.crop_size,
        on_multiple="refuse" if a.refuse_multiple_faces else "largest",
        require_audio=not a.allow_no_audio,
        min_face_px=a.min_face_px,
    )
    card = prepare([Path(s) for s in a.src], Path(a.out), cfg, jobs=a.jobs, force=a.force, progress=not a.quiet)
    run = card["run"]
    print(
        f"{card['clips_kept']}/{card['clips_total']} clips kept, {card['identities_kept']} identities, "
        f"{card['minutes_kept']:.2f} of {card['minutes_source']:.2f} min, {card['frames_kept']}/{card['frames_total']} frames, "
        f"{card['segments']} segments, {card['camera_cuts']} camera cuts"
    )
    if run.get("frames_per_s"):
        print(f"this run: {run['frames_processed']} frames in {run['wall_s']:.1f} s ({run['frames_per_s']:.1f} frames/s, {run['jobs']} jobs)")
    for d in card["clips_dropped"]:
        print(f"dropped {d['clip']}: {d['reason']}")
    print(f"data card: {Path(a.out) / 'data_card.md'}")
    return 0 if card["clips_kept"] else 1


def _cmd_inspect(a: argparse.Namespace) -> int:
    from engine.data.inspect import inspect

    written = inspect(Path(a.dir), out=Path(a.out) if a.out else None, clips=a.clip or None)
    for p in written:
        print(p)
    return 0 if written else 1


def _cmd_train(a: argparse.Namespace) -> int:
    from engine.training.loop import TrainingInterrupted
    from engine.training.run import run_training

    try:
        run_training(a.model, data=a.data, config=Path(a.config), out=Path(a.out))
    except TrainingInterrupted as e:
        print(f"avatar train: {e}", file=sys.stderr)
        return 3
    return 0


def _cmd_render(a: argparse.Namespace) -> int:
    from engine.render import render

    info = render(a.portrait, a.audio, a.out, bundle=a.bundle, steps=a.steps, seed=a.seed, blinks=not a.no_blinks, head_motion=not a.no_head_motion, threads=a.threads,
                  progress=not a.quiet, backend=a.backend, watermark=not a.no_watermark)
    for n in info["notes"]:
        print(f"note: {n}")
    pv = info["provenance"]
    mark = f"watermark v{pv['watermark']['version']} (bundle {pv['watermark']['bundle']}, id {pv['watermark']['id']})" if pv["watermark"].get("embedded") \
        else "NO watermark (--no-watermark)"
    print(f"provenance: {mark}; C2PA manifest {pv['c2pa']}; check with `avatar verify {info['out']}`")
    print(f"wrote {info['out']}: {info['frames']} frames at {info['fps']} fps ({info['audio_s']} s of audio), "
          f"{info['steps']} denoising steps on {info['backend']}, {info['frames_per_s']} frames/s, {info['seconds']['total']} s in all")
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from engine.provenance.verify import verify_video

    v = verify_video(a.file)
    print(json.dumps(v.as_dict(), indent=1) if a.json else v.summary())
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from engine.bundle import load_bundle
    from engine.eval.selfrecon import evaluate_selfrecon, prepare_eval_clips

    if not a.data and not a.clips:
        raise ValueError("give --clips DIR (raw clips; the held-out ones are prepared) or --data DIR.. (prepared folders)")
    data = list(a.data or [])
    if a.clips:
        data.append(str(prepare_eval_clips(a.clips, Path(a.out) / "prepared")))
    variants = {}
    for v in a.variant or []:
        name, _, rest = v.partition("=")
        path, _, steps = rest.partition(":")
        if not name or not path:
            raise ValueError(f"--variant {v!r}: expected NAME=BUNDLE[:STEPS]")
        variants[name] = (load_bundle(path), int(steps) if steps else None)
    compositors = {}
    for v in a.compositor or []:
        name, _, kind = v.partition("=")
        if name not in {"ours", *variants} or kind not in ("native", "patch"):
            raise ValueError(f"--compositor {v!r}: expected NAME=native|patch with NAME ours or a --variant's name")
        compositors[name] = kind
    evaluate_selfrecon(load_bundle(a.bundle), data, a.out, max_frames=a.max_frames, steps=a.steps, seed=a.seed,
                       backend=a.backend, threads=a.threads, variants=variants, drift_seconds=a.drift_seconds,
                       cross_identity=not a.no_cross_identity, compositors=compositors, true_motion=a.true_motion)
    print((Path(a.out) / "report.md").read_text())
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from export.onnx import export_bundle

    from engine.bundle import DEFAULT_BUNDLE

    rep = export_bundle(a.bundle or DEFAULT_BUNDLE, a.out)
    for name, m in rep["models"].items():
        err = ", ".join(f"{k} {v:.1e}" for k, v in m["max_abs_error"].items())
        print(f"{name}: {m['bytes'] / 2**20:.2f} MiB, max-abs error vs PyTorch {err}")
    e2e = rep.get("end_to_end")
    if e2e:
        print(f"end to end on the demo ({e2e['frames']} frames): PyTorch vs ONNX Runtime max pixel difference {e2e['max_abs_pixel_diff']} "
              f"(mean {e2e['mean_abs_pixel_diff']})")
    print(f"wrote the bundle {a.out} (ONNX graphs, export_report.json, manifest.json); run it with `avatar render --bundle {a.out}`")
    return 0


def _cmd_live(a: argparse.Namespace) -> int:
    from clients.live import run_live

    snap = run_live(a.portrait, bundle=a.bundle, vcam=a.vcam, vcam_device=a.vcam_device, speaker=a.speaker, mic_device=a.mic,
                    backend=a.backend, threads=a.threads, steps=a.steps)
    if snap:
        print(json.dumps({k: snap[k] for k in ("fps", "counters") if k in snap}))
    return 0


def _cmd_vcam(a: argparse.Namespace) -> int:
    from clients.vcam import run_vcam

    r = run_vcam(a.portrait, audio=a.audio, device=a.device, size=a.size, speaker=a.speaker, mic_device=a.mic, bundle=a.bundle,
                 backend=a.backend, threads=a.threads, steps=a.steps, seconds=a.seconds)
    print(json.dumps(r.as_dict()))
    return 0


def _vcam_size(text: str) -> tuple[int, int]:
    from clients.vcam import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_bench_pipeline(a: argparse.Namespace) -> int:
    from benchmarks.pipeline import bench_pipeline

    r = bench_pipeline(a.out, bundle=a.bundle, audio=a.audio, portrait=a.portrait, duration_s=a.duration, backend=a.backend,
                       threads=a.threads, steps=a.steps, budget_ms=a.budget_ms)
    lat = r["latency_ms"]
    print(f"{r['audio_s']} s of {r['speech']} paced in real time: {r['sustained_fps']} fps sustained, latency p50 {lat['p50']} / "
          f"p95 {lat['p95']} / p99 {lat['p99']} ms, first frame {r['first_frame_ms']} ms, frames {r['frame_kinds']}, "
          f"degraded {r['degraded_frames']}, dropped {r['dropped_frames']}")
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.png')}")
    return 0


def _cmd_bench_agent(a: argparse.Namespace) -> int:
    from benchmarks.voice_agent import bench_agent, summary

    r = bench_agent(a.out, replies=a.replies, reply_s=a.reply_s, barge_ins=a.barge_ins, bundle=a.bundle, backend=a.backend,
                    threads=a.threads, precision=a.precision, livekit=not a.no_livekit)
    print(summary(r))
    print(f"wrote {a.out}")
    return 0


def _cmd_distill(a: argparse.Namespace) -> int:
    from engine.training.distill_bundle import distill_bundle
    from engine.training.loop import TrainingInterrupted

    try:
        info = distill_bundle(a.bundle, a.data, a.out, steps=a.steps, teacher_steps=a.teacher_steps, config=a.config)
    except TrainingInterrupted as e:
        print(f"avatar distill: {e}", file=sys.stderr)
        return 3
    print(f"wrote the bundle {info['bundle']} with the {a.steps}-step student as its denoiser (rounds: {info['rounds']})")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import asyncio
    import errno
    import os

    from engine.runtime import load_runtime
    from server.app import DEMO_PORTRAIT, ServerConfig, serve
    from server.session import SessionConfig

    from server.ice import ice_servers_from_env, parse_ice_servers
    from server.workers import default_workers

    token = a.token or os.environ.get("AVATAR_TOKEN") or None
    # --ice-server URL (repeatable), else $AVATAR_ICE_SERVERS; checked before the models load
    ice = tuple(parse_ice_servers(a.ice_server, username=a.ice_username, credential=a.ice_credential) if a.ice_server
                else ice_servers_from_env())
    cfg = ServerConfig(host=a.host, port=a.port, max_sessions=a.max_sessions, token=token, cors_origins=tuple(a.cors or ()),
                       session=SessionConfig(steps=a.steps, connect_timeout_s=a.pending_timeout, ice_servers=ice), peer_timeout_s=a.peer_timeout,
                       avatars_dir=Path(a.avatars_dir) if a.avatars_dir else None, default_portrait=Path(a.portrait) if a.portrait else DEMO_PORTRAIT,
                       batch_sessions=a.batch_sessions, batch_wait_ms=a.batch_wait_ms,
                       idle_timeout_s=a.idle_timeout, body_timeout_s=a.body_timeout, max_connections=a.max_connections)
    if a.ray is not None or (a.workers or default_workers()) > 1:  # sessions in worker processes or Ray Serve replicas
        from server.scale import serve_scaled

        asyncio.run(serve_scaled(cfg, workers=a.workers or default_workers(), ray=a.ray, bundle=a.bundle, backend=a.backend,
                                 threads=a.threads, max_replicas=a.ray_max_replicas))
        return 0
    rt = load_runtime(a.bundle, a.backend, threads=a.threads)
    try:
        asyncio.run(serve(rt, cfg))
    except OSError as e:  # the port was taken between the check before loading and now
        if e.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        raise ValueError(listen_error(a.host, a.port, e)) from None
    return 0


def _cmd_client(a: argparse.Namespace) -> int:
    import asyncio
    import os

    from clients.python.client import ClientError, run_client
    from server.ice import ice_servers_from_env, parse_ice_servers, rtc_configuration

    try:  # --ice-server URL (repeatable), else $AVATAR_ICE_SERVERS; checked before anything connects
        ice = (parse_ice_servers(a.ice_server, username=a.ice_username, credential=a.ice_credential) if a.ice_server
               else ice_servers_from_env())
        rtc_configuration(ice, relay_only=a.ice_relay_only)
    except (ValueError, OSError) as e:
        print(f"avatar client: error: {e}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_client(a.server, a.audio, avatar=a.avatar, record=a.record, seconds=a.seconds,
                                        token=a.token or os.environ.get("AVATAR_TOKEN") or None, steps=a.steps,
                                        ice_servers=ice, relay_only=a.ice_relay_only))
    except (ClientError, OSError) as e:
        print(f"avatar client: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "tensorrt"),
                   help="what runs the models (default auto: ONNX Runtime when the bundle has exported graphs, else PyTorch)")
    p.add_argument("--threads", type=int, help="inference threads (default: the cores this process may use)")
    p.add_argument("--precision", choices=("auto", "fp32", "int8", "bf16", "fp16"),
                   help="auto (default; $AVATAR_PRECISION): int8 graphs on ONNX Runtime where the CPU has VNNI/AMX and the bundle has them, "
                        "else fp32; bf16 is for --backend torch, fp16 for tensorrt")


def _cmd_bench_server(a: argparse.Namespace) -> int:
    from benchmarks.server import bench_server

    if a.bench_workers or a.ray_replicas:  # the scale-out table (docs/benchmarks/scale_out.json)
        from benchmarks.server import bench_scale_out

        r = bench_scale_out(a.out, sessions=tuple(a.sessions), workers=tuple(a.bench_workers or ()), ray_replicas=tuple(a.ray_replicas or ()),
                            audio=a.audio, bundle=a.bundle, backend=a.backend, threads=a.threads, steps=a.steps)
        print(f"sessions holding 25 fps here: {r['sessions_holding_25fps']}; wrote {a.out}")
        return 0
    r = bench_server(a.out, sessions=tuple(a.sessions), audio=a.audio, bundle=a.bundle, backend=a.backend, threads=a.threads, steps=a.steps)
    print(f"sessions holding 25 fps here: {r['sessions_holding_25fps']} ({r['caveat']}); wrote {a.out} and its .png")
    return 0


def _cmd_bench_audio(a: argparse.Namespace) -> int:
    from benchmarks.audio_fidelity import bench_audio_fidelity, summary

    r = bench_audio_fidelity(a.out, bundle=a.bundle, backend=a.backend, threads=a.threads, seconds=a.seconds,
                             webrtc=not a.no_webrtc, relay=not a.no_relay)
    print(summary(r))
    print(f"wrote {a.out}")
    return 0


def _cmd_bench_models(a: argparse.Namespace) -> int:
    from benchmarks.models import bench_models, summary

    r = bench_models(a.out, bundle=a.bundle, threads=a.threads, repeats=a.repeats)
    print(summary(r))
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="avatar", description="Real-time talking-head avatar engine.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="turn talking-head videos into aligned training shards")
    p.add_argument("src", nargs="+", help="video files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (resumable: finished clips are skipped)")
    p.add_argument("--crop-size", type=int, default=256, choices=(128, 256, 512), help="aligned crop side in pixels")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2: this machine's cores)")
    p.add_argument("--min-face-px", type=int, default=48, help="drop frames whose face is shorter than this")
    p.add_argument("--refuse-multiple-faces", action="store_true", help="drop clips that show several faces instead of picking the largest")
    p.add_argument("--allow-no-audio", action="store_true", help="keep clips without audio (for motion-only data)")
    p.add_argument("--force", action="store_true", help="redo clips that are already done")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("inspect", help="write a contact-sheet PNG per prepared clip")
    p.add_argument("dir", help="a folder written by `avatar prepare`")
    p.add_argument("--out", help="where to write the PNGs (default DIR/inspect)")
    p.add_argument("--clip", action="append", help="only this clip (repeatable)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("render", help="portrait + speech file -> mp4 (the default bundle unless --bundle)")
    p.add_argument("--portrait", default=str(DEMO / "astronaut.jpg"), help="an image with one face (PNG, JPEG, ...); default: the shipped demo portrait")
    p.add_argument("--audio", default=str(DEMO / "demo_voice.wav"), help="speech: any audio or video file with an audio stream; default: the shipped demo voice")
    p.add_argument("-o", "--out", required=True, help="output mp4")
    p.add_argument("--bundle", help="model bundle folder (default: the bundle shipped with the engine)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0, help="noise and blink seed (renders are deterministic given it)")
    p.add_argument("--no-blinks", action="store_true", help="keep the eyes as in the portrait")
    p.add_argument("--no-head-motion", action="store_true", help="keep the head still (no idle sway)")
    p.add_argument("--no-watermark", action="store_true", help="leave out the invisible provenance watermark (not recommended: "
                   "the video can then not be recognised as generated; a warning is logged)")
    _runtime_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("verify", help="was this video generated by avatar-engine? decodes the watermark, reads the C2PA manifest and tags")
    p.add_argument("file", help="a video (mp4, webm, mov, mkv, ...)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("eval", help="held-out self-reconstruction report (JSON, Markdown, PNG strips)")
    p.add_argument("--clips", help="folder of raw clips (e.g. ../shared/data/clips): the held-out ones are prepared into OUT/prepared")
    p.add_argument("--data", nargs="+", help="folders written by `avatar prepare` holding the held-out clips (instead of --clips)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--variant", action="append", help="another generator in the same table: NAME=BUNDLE[:STEPS] (repeatable)")
    p.add_argument("--compositor", action="append", help="NAME=native|patch: how that generator composes its frames (default native; repeatable)")
    p.add_argument("--drift-seconds", type=float, default=60.0, help="length of the identity-drift render (0: skip)")
    p.add_argument("--no-cross-identity", action="store_true", help="skip cross-identity driving")
    p.add_argument("--true-motion", action="store_true", help="also drive ours and warp-only with ground truth's own lip and jaw "
                   "landmarks (rows *_true_motion): the renderer's quality apart from the A2L's")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--max-frames", type=int, default=100, help="frames evaluated per held-out segment")
    p.add_argument("--steps", type=int, help="denoising steps (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0)
    _runtime_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export a bundle's models to ONNX, each checked against PyTorch (names, shapes, max-abs error)")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--out", required=True, help="output bundle folder: the source bundle's files, <graph>.onnx, export_report.json, a new manifest")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("live", help="microphone in, the talking portrait in a preview window or a virtual camera")
    p.add_argument("--portrait", default=str(DEMO / "astronaut.jpg"), help="an image with one face (default: the shipped demo portrait)")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--vcam", action="store_true", help="send to a virtual camera (pyvirtualcam) instead of a preview window")
    p.add_argument("--vcam-device", help="virtual camera device, e.g. /dev/video10 (default: the first one)")
    p.add_argument("--speaker", action="store_true", help="also play the re-emitted audio, in sync with the frames")
    p.add_argument("--mic", help="input device index or name (default: the system's default input)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the bundle's; fewer when it falls behind)")
    _runtime_args(p)
    p.set_defaults(func=_cmd_live)

    p = sub.add_parser("vcam", help="the talking portrait as a virtual camera for video calls (pyvirtualcam: v4l2loopback, OBS)")
    p.add_argument("--portrait", default=str(DEMO / "astronaut.jpg"), help="an image with one face (default: the shipped demo portrait)")
    p.add_argument("--audio", help="speak this file (in real time, then stay idle) instead of listening to the microphone")
    p.add_argument("--mic", help="input device index or name (default: the system's default input)")
    p.add_argument("--device", help="virtual camera device, e.g. /dev/video10 (default: the first one)")
    p.add_argument("--size", type=_vcam_size, help="camera size WIDTHxHEIGHT, e.g. 1280x720 (default: the portrait's); "
                                                   "the portrait is fitted onto a blurred copy of itself")
    p.add_argument("--speaker", nargs="?", const=True, metavar="DEVICE",
                   help="also play the voice, in sync with the lips, on the default output (or DEVICE, e.g. a virtual microphone)")
    p.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the bundle's; fewer when it falls behind)")
    _runtime_args(p)
    p.set_defaults(func=_cmd_vcam)

    bench = sub.add_parser("bench", help="benchmarks that write JSON (and a plot beside it)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    p = bsub.add_parser("pipeline", help="the live pipeline on a real speech file paced in real time: fps, latency, drops")
    p.add_argument("--out", required=True, help="JSON report; the latency histogram goes beside it as .png")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--audio", help="speech file (default: 60 s of English from ../shared/data, else the demo voice looped)")
    p.add_argument("--portrait", help="portrait (default: the shipped demo portrait)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of speech (the file is looped if shorter)")
    p.add_argument("--steps", type=int, help="denoising steps at full quality (default: the bundle's)")
    p.add_argument("--budget-ms", type=float, default=150.0, help="latency budget: above it the pipeline degrades")
    _runtime_args(p)
    p.set_defaults(func=_cmd_bench_pipeline)
    p = bsub.add_parser("models", help="every graph on every backend and precision here: ms per call, GFLOP, %% of the CPU's peak, ms per frame")
    p.add_argument("--out", required=True, help="JSON report; the bar chart goes beside it as .png")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--threads", type=int, help="inference threads (default: the cores this process may use)")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per graph after the warm-up")
    p.set_defaults(func=_cmd_bench_models)

    p = bsub.add_parser("server", help="avatar serve with N concurrent avatar client sessions: first frame, fps, audio round trip, capacity")
    p.add_argument("--out", required=True, help="JSON report; the plot goes beside it as .png")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 3], help="concurrent sessions to try, one run each (default 1 2 3)")
    p.add_argument("--audio", help="speech each client sends (default: a shared-data speech file, else the demo voice)")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "tensorrt"), help="the server's backend")
    p.add_argument("--threads", type=int, help="the server's inference threads")
    p.add_argument("--steps", type=int, help="denoising steps the clients ask for (default: the bundle's)")
    p.add_argument("--workers", type=int, nargs="+", dest="bench_workers", metavar="N",
                   help="scale-out table: each session count with `avatar serve --workers N` for each N (1: one process), "
                        "--out then holds the table and the capacity model (docs/benchmarks/scale_out.json)")
    p.add_argument("--ray-replicas", type=int, nargs="+", metavar="N",
                   help="scale-out table: also with `avatar serve --ray local` and N replicas (needs '.[cluster]')")
    p.set_defaults(func=_cmd_bench_server)
    p = bsub.add_parser("audio", help="full-band audio: a 48 kHz voice through the pipeline, the server + client over WebRTC, and "
                                      "a local TURN relay; energy per band out vs in (dB), round trips")
    p.add_argument("--out", default="docs/benchmarks/audio_fidelity.json", help="JSON report (default: %(default)s)")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "tensorrt"), help="inference backend")
    p.add_argument("--threads", type=int, help="inference threads")
    p.add_argument("--seconds", type=float, default=6.0, help="seconds of the signal (default 6)")
    p.add_argument("--no-webrtc", action="store_true", help="the pipeline only (no server, no client)")
    p.add_argument("--no-relay", action="store_true", help="no TURN relay run (it needs coturn's turnserver)")
    p.set_defaults(func=_cmd_bench_audio)
    p = bsub.add_parser("agent", help="a voice agent's replies through the pipecat adapter (a real pipecat pipeline) and the LiveKit "
                                      "adapter (livekit-agents' AvatarRunner): first avatar frame after the first TTS audio, segment "
                                      "end, lips/audio offset, barge-in")
    p.add_argument("--out", default="docs/benchmarks/voice_agent.json", help="JSON report (default: %(default)s)")
    p.add_argument("--replies", type=int, default=20, help="replies per adapter (default 20)")
    p.add_argument("--reply-s", type=float, default=1.0, help="seconds of the demo voice per reply (default 1)")
    p.add_argument("--barge-ins", type=int, default=2, help="extra one-reply runs interrupted after 0.5 s (default 2)")
    p.add_argument("--no-livekit", action="store_true", help="the pipecat adapter only")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    _runtime_args(p)
    p.set_defaults(func=_cmd_bench_agent)
    p = bsub.add_parser("gpu", help="the per-frame path on one GPU, torch only (a bare CUDA machine): ms per frame at batch 1-32 "
                                    "in fp32 / bf16 / compiled, memory per session, sessions at 25 fps (scripts/gpu_check.sh)")
    from benchmarks.gpu import add_arguments as _bench_gpu_arguments, run_args as _cmd_bench_gpu  # numpy only; torch when run

    _bench_gpu_arguments(p)
    p.set_defaults(func=_cmd_bench_gpu)
    p = bsub.add_parser("reliability", help="avatar serve against hostile inputs, abrupt disconnects, floods and a soak of pushed "
                                            "speech on 127.0.0.1: answers, slot free times, fds / threads / tasks / RSS, latency")
    from benchmarks.reliability import add_arguments as _bench_reliability_arguments, run_args as _cmd_bench_reliability

    _bench_reliability_arguments(p)
    p.set_defaults(func=_cmd_bench_reliability)

    p = sub.add_parser("distill", help="progressive distillation of a bundle's denoiser to fewer steps; writes a new bundle")
    p.add_argument("--bundle", help="teacher bundle (default: the shipped bundle)")
    p.add_argument("--data", nargs="+", required=True, help="folders written by `avatar prepare` (the teacher's training data)")
    p.add_argument("--out", required=True, help="run folder: one sub-folder per round (resumable) and OUT/bundle, the student bundle")
    p.add_argument("--steps", type=int, default=2, help="steps of the student that becomes the bundle's denoiser (a power of two)")
    p.add_argument("--teacher-steps", type=int, default=8, help="the teacher's DDIM steps; each round halves them")
    p.add_argument("--config", help='JSON {"train": {...}, "options": {...}} per round (default: configs/cpu_small/distill.json)')
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("serve", help="WebRTC server: the avatar streamed to browsers and clients (aiohttp + aiortc)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--max-sessions", type=int, default=1, help="concurrent sessions (default 1: one pipeline keeps two cores busy); "
                                                                 "with --workers or --ray: per worker or replica")
    p.add_argument("--token", help="bearer token every route but /healthz requires (default: $AVATAR_TOKEN, else none)")
    p.add_argument("--cors", nargs="+", metavar="ORIGIN", help="origins allowed to call from other pages ('*': any; default: same origin only)")
    p.add_argument("--portrait", help="the portrait of the avatar 'default' (default: the shipped demo portrait)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the bundle's; an offer may ask for its own)")
    p.add_argument("--avatars-dir", default=str(Path.home() / ".local" / "share" / "avatar-engine" / "avatars"), metavar="DIR",
                   help="keep uploaded portraits here and prepare them again at the next start (default: %(default)s; "
                        "'' keeps them in memory only)")
    p.add_argument("--peer-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="close a session whose peer answers no connectivity check (ICE consent, one every quarter of this, at most 2 s) "
                        "this long: a killed client frees its slot after 3.5-5 s at the default 5; a closed page DELETEs at once")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="a STUN or TURN server for the server's peer and the page (stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp], "
                        "turns:HOST[:PORT]); repeatable (default: $AVATAR_ICE_SERVERS, else none: host candidates only, for loopback and LANs)")
    p.add_argument("--ice-username", help="the TURN servers' user name (the page receives it: prefer short-lived credentials)")
    p.add_argument("--ice-credential", help="the TURN servers' password")
    p.add_argument("--pending-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="close a session whose peer has not connected its media this long after the answer: an offer that never "
                        "connects holds a session slot this long at most (default 5)")
    p.add_argument("--idle-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="close a connection that has not sent a whole request's headers this long after it opened or was "
                        "last answered: idle keep-alives and slow (slowloris) clients (default 15)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="answer 408 to a request whose body sends no bytes this long (default 30; WebSockets are not timed)")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="HTTP connections open at once; one more is answered 503 at once and closed, the open ones go on (default 256)")
    p.add_argument("--batch-sessions", type=int, metavar="N",
                   help="run the denoiser calls of up to N sessions that are due together as one batch (on a GPU the decoder's too); "
                        "1: off (default: --max-sessions on a GPU, off on a CPU, where a batch costs about as much as its calls: "
                        "docs/benchmarks/batching.json)")
    p.add_argument("--batch-wait-ms", type=float, default=3.0, metavar="MS",
                   help="a batch waits this long at most for the other sessions' calls; a lone session never waits (default 3)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="run the sessions in N worker processes behind this one (signalling, page, /metrics); --max-sessions is then "
                        "per worker (default: one per 1.2 cores, at least 1; 1: the sessions run in this process)")
    p.add_argument("--ray", metavar="auto|ADDRESS",
                   help="host the sessions on Ray Serve replicas (pip install '.[cluster]'): 'auto' starts or joins a local Ray, "
                        "ADDRESS joins a cluster (ray://HOST:10001 or HOST:6379); --workers is then the replica count, "
                        "--max-sessions per replica")
    p.add_argument("--ray-max-replicas", type=int, metavar="N",
                   help="with --ray: autoscale between --workers and N replicas on the sessions open (default: a fixed --workers replicas)")
    _runtime_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("client", help="WebRTC client: speak an audio file to a server, receive and record the avatar, measure")
    p.add_argument("--server", default="http://127.0.0.1:8080", help="the server's URL")
    p.add_argument("--audio", default=str(DEMO / "demo_voice.wav"), help="speech sent as live audio (default: the shipped demo voice)")
    p.add_argument("--avatar", help="avatar id (default: the server's 'default'; GET /avatars lists them)")
    p.add_argument("--record", help="write what comes back (video + audio) to this mp4")
    p.add_argument("--seconds", type=float, help="stream this long after connecting (default: 1 s of silence + the audio + 2 s)")
    p.add_argument("--token", help="bearer token (default: $AVATAR_TOKEN)")
    p.add_argument("--steps", type=int, help="ask the server for this many denoising steps")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="a STUN or TURN server (stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp], turns:HOST[:PORT]); "
                        "repeatable (default: $AVATAR_ICE_SERVERS, a JSON list of {urls, username, credential}, else none: host candidates only)")
    p.add_argument("--ice-username", help="the TURN servers' user name")
    p.add_argument("--ice-credential", help="the TURN servers' password")
    p.add_argument("--ice-relay-only", action="store_true", help="only TURN relay candidates (test the relay path)")
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("train", help="train one model from prepared shards (resumes from OUT/checkpoint.pt)")
    p.add_argument("model", choices=("autoencoder", "a2l", "denoiser", "sync"), help="which model")
    p.add_argument("--data", nargs="+", required=True, help="folders written by `avatar prepare`")
    p.add_argument("--config", required=True, help='JSON: {"model": {...}, "train": {...}, "options": {...}} (configs/ has examples)')
    p.add_argument("--out", required=True, help="run folder: checkpoint, log.jsonl, loss.png, the trained model files")
    p.set_defaults(func=_cmd_train)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    started_s = time.time()
    try:
        check_args(a)  # arguments and files, before any model loads
        if getattr(a, "precision", None) is None:
            return a.func(a)
        from engine.runtime import default_precision

        with default_precision(a.precision):  # every runtime the command loads
            return a.func(a)
    except (AvatarInputError, FileNotFoundError, ValueError) as e:
        print(f"avatar {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was done, no traceback
        print(interrupted(a, started_s), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
