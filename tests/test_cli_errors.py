"""Everyday mistakes on the command line: each is one line on stderr and exit code 2, found before
any model loads (the verbs' functions are replaced by ones that fail the test if reached); a port
in use is found before loading too; Ctrl-C during `avatar render` ends with one line and no file;
`avatar --version`."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

import engine.cli as cli
from engine.bundle import DEFAULT_BUNDLE
from engine.cli import DEMO, build_parser, main
from engine.cli_checks import check_args

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
VERBS = ("_cmd_render", "_cmd_serve", "_cmd_client", "_cmd_vcam", "_cmd_live", "_cmd_bench_server", "_cmd_bench_pipeline",
         "_cmd_distill", "_cmd_eval")


@pytest.fixture
def no_verb_runs(monkeypatch):
    """Reaching a verb's function (which loads models) fails the test: the mistake must be caught before."""
    def reached(a):
        raise AssertionError(f"`avatar {a.command}` went on to load models: the mistake was not caught before")

    for name in VERBS:
        monkeypatch.setattr(cli, name, reached)


def _one_line_error(capsys, verb: str) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"avatar {verb}: error: "), err
    return err


def test_version() -> None:
    r = subprocess.run([sys.executable, "-m", "engine.cli", "--version"], capture_output=True, text=True, timeout=30, cwd=REPO, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == f"avatar {version('avatar-engine')}" and r.stderr == ""


@pytest.mark.parametrize("argv, needle", [
    (["render", "--portrait", "{tmp}/missing.jpg"], "--portrait {tmp}/missing.jpg: no such file"),
    (["render", "--audio", "{tmp}/missing.wav"], "--audio {tmp}/missing.wav: no such file"),
    (["render", "--audio", "{tmp}"], "not a file"),
    (["render", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["render", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["render", "--bundle", "{tmp}"], "not a model bundle"),
    (["render", "--bundle", "{tmp}/nowhere"], "no such folder"),
    (["client", "--server", "127.0.0.1:8080"], "http://127.0.0.1:8080"),
    (["client", "--server", "ftp://127.0.0.1"], "with its scheme"),
    (["client", "--server", "http://127.0.0.1:99999"], "port"),
    (["client", "--audio", "{tmp}/missing.wav"], "no such file"),
    (["client", "--seconds", "0"], "--seconds must be > 0"),
    (["serve", "--steps", "0"], "--steps must be >= 1"),
    (["serve", "--port", "70000"], "--port must be in [0, 65535]"),
    (["serve", "--pending-timeout", "0"], "--pending-timeout must be > 0"),
    (["serve", "--max-sessions", "0"], "--max-sessions must be >= 1"),
    (["serve", "--batch-sessions", "0"], "--batch-sessions must be >= 1"),
    (["serve", "--batch-wait-ms", "-1"], "--batch-wait-ms must be >= 0"),
    (["serve", "--portrait", "{tmp}/missing.png", "--port", "0"], "no such file"),
    (["vcam", "--audio", "{tmp}/missing.wav"], "no such file"),
    (["live", "--portrait", "{tmp}/missing.png"], "no such file"),
    (["bench", "pipeline", "--out", "{tmp}/r.json", "--duration", "0"], "--duration must be > 0"),
    (["bench", "server", "--out", "{tmp}/r.json", "--sessions", "1", "0"], "--sessions must all be >= 1"),
    (["distill", "--data", "{tmp}", "--out", "{tmp}/d", "--steps", "0"], "--steps must be >= 1"),
    (["eval", "--out", "{tmp}/e", "--max-frames", "0"], "--max-frames must be >= 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_mistakes_are_one_line_before_any_model_loads(argv, needle, tmp_path, capsys, no_verb_runs) -> None:
    argv = [s.replace("{tmp}", str(tmp_path)) for s in argv]
    if argv[0] == "render":
        argv += ["-o", str(tmp_path / "out.mp4")]
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 2.0  # no model was loaded
    assert needle.replace("{tmp}", str(tmp_path)) in _one_line_error(capsys, argv[0])


@pytest.mark.parametrize("out, needle", [
    ("x.avi", "only MP4 is written"),
    ("x.mkv", "name the output x.mp4"),
    ("x", "only MP4"),
    ("no/such/folder/x.mp4", "does not exist"),
    (".", "is a folder"),
])
def test_render_output_is_checked_and_nothing_is_written(out, needle, tmp_path, capsys, no_verb_runs) -> None:
    target = tmp_path / out
    assert main(["render", "-o", str(target)]) == 2
    assert needle in _one_line_error(capsys, "render")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not an .avi, not an .mp4 beside it


def test_argparse_mistakes_are_one_line_too(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["render"])  # -o is required
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("avatar render: error: ") and "-o/--out" in err
    with pytest.raises(SystemExit) as e:
        main(["render", "-o", "x.mp4", "--backend", "nope"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_good_arguments_pass_the_checks(tmp_path) -> None:
    """The checks refuse mistakes, not what works: an upper-case .MP4, an https URL with a path, port 0, defaults."""
    for argv in (["render", "-o", str(tmp_path / "x.MP4")], ["render", "-o", "relative.mp4", "--steps", "1"],
                 ["client", "--server", "https://example.com:8443/avatar"], ["client"], ["serve", "--port", "0"],
                 ["vcam", "--audio", str(DEMO / "demo_voice.wav"), "--seconds", "0.5"], ["live"],
                 ["bench", "server", "--out", "r.json"], ["eval", "--out", str(tmp_path)]):
        check_args(build_parser().parse_args(argv))


def test_serve_on_a_port_in_use_is_one_line_before_loading() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--port", str(port)], capture_output=True, text=True,
                           timeout=60, cwd=REPO, env=ENV)
        took_s = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"avatar serve: error: 127.0.0.1:{port} is already in use (another server is listening there): " \
                       "stop it or pick another --port\n"
    assert r.stdout == "" and took_s < 5.0  # the models (seconds to load) were not loaded


def test_serve_port_taken_while_loading_is_one_line(monkeypatch, capsys) -> None:
    """The port is free at the check but taken by the time the server binds (after loading): still one line."""
    import errno

    import engine.runtime
    import server.app

    async def bind_fails(runtime, config):
        raise OSError(errno.EADDRINUSE, f"error while attempting to bind on address ('127.0.0.1', {config.port}): address in use")

    monkeypatch.setattr(engine.runtime, "load_runtime", lambda *a, **k: object())
    monkeypatch.setattr(server.app, "serve", bind_fails)
    monkeypatch.setattr(cli, "check_args", lambda a: None)  # the check before loading saw the port free
    assert main(["serve", "--port", "8765"]) == 2
    assert "127.0.0.1:8765 is already in use" in _one_line_error(capsys, "serve")


@pytest.mark.skipif(not (DEFAULT_BUNDLE / "manifest.json").is_file(), reason="no default bundle in this checkout")
def test_ctrl_c_during_render_is_one_line_and_leaves_no_file(tmp_path) -> None:
    out = tmp_path / "demo.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "render", "-o", str(out), "--threads", "1"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # a shell's background job ignores SIGINT, and the child would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        os.set_blocking(proc.stderr.fileno(), False)
        err, t_end = b"", time.monotonic() + 90
        while b"render:" not in err and proc.poll() is None and time.monotonic() < t_end:  # frames are being written
            time.sleep(0.1)
            err += proc.stderr.read() or b""
        assert b"render:" in err, err[-2000:]
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        t_sig = time.monotonic()
        rest_out, rest_err = proc.communicate(timeout=30)
        took_s = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err_text = (err + rest_err).decode(errors="replace")
    assert proc.returncode == 130, err_text[-2000:]
    assert "Traceback" not in err_text, err_text[-3000:]
    last = err_text.strip().splitlines()[-1]
    assert last == f"avatar render: interrupted; nothing written ({out} not created or changed)", last
    assert rest_out == b"" and took_s < 10.0
    assert list(tmp_path.iterdir()) == []  # neither the mp4 nor its .partial.mp4
