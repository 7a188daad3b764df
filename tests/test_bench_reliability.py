"""`avatar bench reliability` small and bounded (a tiny bundle, 3 disconnects, a 4 s soak, short timeouts):
a real `avatar serve` process against the hostile inputs, a killed client, a peer closed without DELETE,
an offer never connected, an interrupt flood, connections over the cap and pushed speech. What must hold
whatever the machine's load: no 5xx, no handler exception in the server's log, every refusal a 4xx or a
closed connection, every slot freed within its timeout, nothing left open after the disconnects.
(Speed is measured, not tested: latency and dropped frames are only checked to be reported.)"""
from __future__ import annotations

import json

import pytest

from benchmarks.reliability import RAW_CASES, WS_CASES
from engine.cli import main
from tests.tiny import tiny_bundle

PEER_TIMEOUT_S, PENDING_TIMEOUT_S = 3.0, 2.0


def test_bench_reliability_small(tmp_path):
    b = tiny_bundle(tmp_path / "b")
    out = tmp_path / "bench" / "reliability.json"
    assert main(["bench", "reliability", "--out", str(out), "--bundle", str(b), "--backend", "torch", "--threads", "1",
                 "--disconnects", "3", "--soak-s", "4", "--sample-s", "1", "--capacity-offers", "2", "--flood-requests", "80",
                 "--connections-over", "5", "--max-connections", "16", "--idle-timeout", "1.5", "--body-timeout", "1.5",
                 "--pending-timeout", str(PENDING_TIMEOUT_S), "--peer-timeout", str(PEER_TIMEOUT_S), "--quiet"]) == 0
    r = json.loads(out.read_text())
    s = r["summary"]
    # hostile inputs: at least 40, each a 4xx (or an error message / a closed connection), no 5xx, no traceback
    assert s["hostile_inputs"] >= 40 + len(WS_CASES) + len(RAW_CASES) - 10
    assert s["answers_5xx"] == 0 and s["handler_exceptions"] == 0 and r["handler_exceptions"] == []
    assert s["not_4xx_or_closed"] == [], s["not_4xx_or_closed"]
    rows = {row["input"]: row for row in r["hostile"]["rows"]}
    assert rows["raw: half a request line, then a stall"]["status"] == "closed"
    assert rows["raw: half a request line, then a stall"]["ms"] <= 1000 * (1.5 + 1.0)
    assert rows["raw: a body that stalls"]["status"] == 408
    # floods: interrupts limited (429), connections over the cap refused, the session beside them streamed on
    flood = r["hostile"]["interrupt_flood"]
    assert flood["requests"] == 80 and flood["answered_429"] > 0 and flood["other"] == []
    cap = r["hostile"]["connection_cap"]
    assert cap["refused_503"] == 5 and cap["open_connection_healthz"]["status"] == 200
    assert r["hostile"]["session_beside"]["frames"] > 0 and r["hostile"]["session_beside"]["max_gap_s"] < 2.0
    # disconnects: one of each kind, each slot freed within its timeout (plus the closing and polling)
    d = r["disconnects"]
    assert d["errors"] == [] and [row["kind"] for row in d["rows"]] == ["killed", "closed without DELETE", "never connected"]
    free = {row["kind"]: row["free_s"] for row in d["rows"]}
    assert free["killed"] <= PEER_TIMEOUT_S + 3.0 and free["closed without DELETE"] <= 2.0
    assert PENDING_TIMEOUT_S - 0.5 <= free["never connected"] <= PENDING_TIMEOUT_S + 2.0
    res = d["resources"]
    assert res["after"]["fds"] <= res["before"]["fds"] and res["after"]["asyncio_tasks"] <= res["before"]["asyncio_tasks"]
    assert res["after"]["threads"] <= res["before"]["threads"]
    # the soak: speech pushed in 100 ms pieces, refused offers while it streamed, figures reported
    soak = r["soak"]
    assert soak["pushes"] == {"200": 40} and soak["capacity"]["refused_503"] == soak["capacity"]["offers"] == 2
    assert soak["latency_ms"]["count"] > 0 and soak["latency_ms"]["p95_ms"] is not None
    assert soak["frames"]["received"] > 0 and soak["speech_frames_dropped"]["pipeline"] is not None
    assert len(soak["samples"]) >= 2 and all(x["asyncio_tasks"] is not None for x in soak["samples"])


def test_bench_reliability_refuses_bad_counts(capsys):
    for args, needle in ((["--soak-s", "0"], "--soak-s must be > 0"), (["--disconnects", "-1"], "--disconnects must be >= 0"),
                         (["--piece-ms", "5"], "--piece-ms must be >= 10")):
        assert main(["bench", "reliability", "--out", "x.json", *args]) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "reliability"])  # --out is required
