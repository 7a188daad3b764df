"""A local TURN relay for the relay-path test and benchmark: Debian's coturn (``turnserver``) on
127.0.0.1 only, with one long-term user, no TLS, no CLI, no database outside a temporary folder.

    with LocalTurn() as turn:            # raises TurnUnavailable where turnserver is not installed
        servers = [turn.ice_server()]    # IceServer("turn:127.0.0.1:PORT?transport=udp", user, password)
        run_client(..., ice_servers=servers, relay_only=True)

Loopback peers are allowed (``--allow-loopback-peers``: coturn refuses to relay to 127.0.0.0/8 by
default, and both peers of the test live there); that is for this use only, never a deployment.
The process is started with its own arguments (no shell), waited for until it answers a STUN
binding request, and stopped by its pid at exit.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from server.ice import IceServer

TURN_USER = "avatar"  # the long-term credential of the local relay
TURN_PASSWORD = "relay-test-only"
TURN_REALM = "avatar.local"


class TurnUnavailable(RuntimeError):
    """turnserver (Debian package coturn) is not installed, or did not start."""


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stun_answers(port: int, timeout_s: float) -> bool:
    """A STUN binding request (RFC 5389) to 127.0.0.1:port over UDP gets an answer."""
    tid = os.urandom(12)
    req = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + tid
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        try:
            s.sendto(req, ("127.0.0.1", port))
            data, _ = s.recvfrom(2048)
        except OSError:  # timeout, or ICMP port unreachable (not listening yet)
            return False
    return len(data) >= 20 and data[8:20] == tid


class LocalTurn:
    """coturn on 127.0.0.1 at a free port, relay ports in a small range; a context manager."""

    def __init__(self, *, start_timeout_s: float = 10.0, relay_ports: int = 40):
        self.binary = shutil.which("turnserver")
        if self.binary is None:
            raise TurnUnavailable("turnserver is not installed (Debian/Ubuntu: apt-get install coturn, "
                                  "or scripts/install.sh --dev as root)")
        self.start_timeout_s = start_timeout_s  # waiting for its first STUN answer at most this long
        self.relay_ports = relay_ports  # relay (allocation) ports it may use
        self.port = 0  # its listening port (UDP and TCP), once started
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def ice_server(self, transport: str = "udp") -> IceServer:
        """The relay as an ICE server: ``turn:127.0.0.1:PORT?transport=udp`` with its user and password."""
        return IceServer((f"turn:127.0.0.1:{self.port}?transport={transport}",), TURN_USER, TURN_PASSWORD)

    def start(self) -> "LocalTurn":
        self._dir = tempfile.TemporaryDirectory(prefix="avatar-turn-")
        d = Path(self._dir.name)
        self.port = _free_port(socket.SOCK_DGRAM)
        lo = 49152 + (self.port * 7) % 12000  # a relay range that differs between concurrent runs
        args = [self.binary, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={self.port}",
                f"--min-port={lo}", f"--max-port={lo + self.relay_ports}", "--lt-cred-mech", f"--user={TURN_USER}:{TURN_PASSWORD}",
                f"--realm={TURN_REALM}", "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls", "--relay-threads=1",
                "--no-software-attribute", f"--userdb={d / 'turndb'}", f"--pidfile={d / 'turn.pid'}",
                f"--log-file={d / 'turn.log'}", "--simple-log", "--no-stdout-log"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t_end = time.monotonic() + self.start_timeout_s
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                self.stop()
                raise TurnUnavailable(f"turnserver exited with {self.proc.returncode} at start: {err[-300:]}")
            if _stun_answers(self.port, 0.2):
                return self
        self.stop()
        raise TurnUnavailable(f"turnserver did not answer STUN on 127.0.0.1:{self.port} within {self.start_timeout_s:g} s")

    def log_text(self) -> str:
        """What coturn logged (its allocations, permissions, errors)."""
        if self._dir is None:
            return ""
        logs = sorted(Path(self._dir.name).glob("turn*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "LocalTurn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
