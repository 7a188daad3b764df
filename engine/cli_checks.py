"""The command line's checks: every argument and file a verb needs, checked before any model loads.

A mistake is one line on stderr and exit code 2 (``avatar render: error: --steps must be >= 1,
got 0``), found in milliseconds instead of after ten seconds of model loading. Argparse's own
errors (a missing ``-o``, a bad choice) are one line too (:class:`OneLineParser`). Imports only
the standard library: ``avatar --help`` and these checks stay instant.
"""
from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

RENDER_SUFFIXES = (".mp4",)  # what `avatar render -o` writes: H.264 + AAC in an MP4 container (engine/media/mp4.py)

# numeric options: attribute -> (flag, smallest allowed value, whether the smallest is allowed itself)
_AT_LEAST: dict[str, tuple[str, float, bool]] = {
    "steps": ("--steps", 1, True),
    "teacher_steps": ("--teacher-steps", 1, True),
    "threads": ("--threads", 1, True),
    "jobs": ("--jobs", 1, True),
    "repeats": ("--repeats", 1, True),
    "max_frames": ("--max-frames", 1, True),
    "max_sessions": ("--max-sessions", 1, True),
    "batch_sessions": ("--batch-sessions", 1, True),
    "workers": ("--workers", 1, True),
    "ray_max_replicas": ("--ray-max-replicas", 1, True),
    "batch_wait_ms": ("--batch-wait-ms", 0, True),
    "seconds": ("--seconds", 0, False),
    "duration": ("--duration", 0, False),
    "budget_ms": ("--budget-ms", 0, False),
    "peer_timeout": ("--peer-timeout", 0, False),
    "pending_timeout": ("--pending-timeout", 0, False),
    "idle_timeout": ("--idle-timeout", 0, False),
    "body_timeout": ("--body-timeout", 0, False),
    "max_connections": ("--max-connections", 1, True),
    "drift_seconds": ("--drift-seconds", 0, True),
}

# input files: (verb, attribute) -> flag; checked when given (defaults are the shipped demo files)
_FILES: dict[tuple[str, str], str] = {
    ("render", "portrait"): "--portrait", ("render", "audio"): "--audio",
    ("live", "portrait"): "--portrait",
    ("vcam", "portrait"): "--portrait", ("vcam", "audio"): "--audio",
    ("client", "audio"): "--audio",
    ("serve", "portrait"): "--portrait",
    ("bench", "audio"): "--audio", ("bench", "portrait"): "--portrait",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``avatar render: error: ...; see avatar render --help``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version as package_version

    try:
        return package_version("avatar-engine")
    except PackageNotFoundError:
        return "unknown"


def check_args(a: argparse.Namespace) -> None:
    """Raise ValueError with a one-line message for the first mistake in ``a`` (any verb)."""
    for attr, (flag, low, inclusive) in _AT_LEAST.items():
        value = getattr(a, attr, None)
        if value is None or isinstance(value, bool):
            continue
        if value != value or (value < low if inclusive else value <= low):  # value != value: NaN
            raise ValueError(f"{flag} must be {'>=' if inclusive else '>'} {low:g}, got {value:g}")
    for n in getattr(a, "sessions", None) or ():
        if n < 1:
            raise ValueError(f"--sessions must all be >= 1, got {n}")
    port = getattr(a, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535] (0: any free port), got {port}")
    for (verb, attr), flag in _FILES.items():
        path = getattr(a, attr, None) if a.command == verb else None
        if path:
            _check_file(flag, Path(path))
    bundle = getattr(a, "bundle", None)
    if bundle and not (Path(bundle) / "manifest.json").is_file():
        what = "no such folder" if not Path(bundle).exists() else "not a model bundle (no manifest.json)"
        raise ValueError(f"--bundle {bundle}: {what}")
    if a.command == "render":
        check_render_output(Path(a.out))
    if a.command == "client":
        check_server_url(a.server)
    if a.command == "serve":
        check_open_files(a.max_connections)
        check_can_listen(a.host, a.port)


def _check_file(flag: str, path: Path) -> None:
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{flag} {path}: not a file")


def check_render_output(out: Path) -> None:
    """``-o``: a file name ending in .mp4, in a folder that exists (never silently another container)."""
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the output file's name, e.g. {out / 'out.mp4'}")
    if out.suffix.lower() not in RENDER_SUFFIXES:
        raise ValueError(f"-o {out}: only MP4 is written (H.264 + AAC); name the output {out.with_suffix('.mp4').name}")
    if not out.parent.is_dir():
        raise ValueError(f"-o {out}: the folder {out.parent} does not exist")


def check_server_url(url: str) -> None:
    """``--server``: http(s)://host[:port][/path]."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--server {url!r}: give the server's URL with its scheme, e.g. http://{url.split('://')[-1] or '127.0.0.1:8080'}")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError:
        raise ValueError(f"--server {url!r}: the port is not a number in [0, 65535]") from None


FILES_BESIDES_CONNECTIONS = 256  # what the server opens besides its HTTP connections: models, sessions' UDP sockets, pipes


def check_open_files(max_connections: int) -> None:
    """``--max-connections``: the process may open that many sockets and what else it needs (``ulimit -n``)."""
    try:
        import resource
    except ImportError:  # not Unix
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections + FILES_BESIDES_CONNECTIONS > soft:
        raise ValueError(f"--max-connections {max_connections} needs about {max_connections + FILES_BESIDES_CONNECTIONS} open files, "
                         f"this process may open {soft} (ulimit -n): lower it to at most {max(1, soft - FILES_BESIDES_CONNECTIONS)} "
                         "or raise the limit")


def check_can_listen(host: str, port: int) -> None:
    """Bind ``host:port`` (every address it resolves to) and let go at once, as aiohttp will bind it,
    so that a port in use is reported before the models load. Port 0 (any free port) always works."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            if sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server does
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise ValueError(listen_error(host, port, e)) from None


def listen_error(host: str, port: int, e: OSError) -> str:
    """The one line for a socket that cannot listen at ``host:port``."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return f"{where} is already in use (another server is listening there): stop it or pick another --port"
    if e.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges): pick another --port"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host} is not an address of this machine"
    return f"cannot listen on {where}: {e.strerror or e}"


def interrupted(a: argparse.Namespace, started_s: float) -> str:
    """The one line for Ctrl-C: what was done. A render writes to a side file and renames it only
    when complete, so an interrupted render leaves nothing (and an older file of that name as it was)."""
    line = f"avatar {a.command}: interrupted"
    if a.command == "render":
        out = Path(a.out)
        try:
            written = out.stat().st_mtime >= started_s
        except OSError:
            written = False
        line += f"; {out} was written before the interrupt" if written else f"; nothing written ({out} not created or changed)"
    return line
