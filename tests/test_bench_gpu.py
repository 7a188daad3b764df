"""``avatar bench gpu`` on this CPU (so it cannot rot before a GPU is lent): the JSON's structure and
values, the run without mediapipe / OpenCV / PyAV / ONNX Runtime, the one-line exit 2 where CUDA is
absent, the time budget, and the DDIM loop against ``engine.sampling.ddim_sample``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.gpu import GRAPHS, bench_gpu, project
from benchmarks.gpu_path import FORBIDDEN_MODULES, AvatarAsset, FramePath, load_models
from engine.sampling import ddim_sample

REPO = Path(__file__).resolve().parents[1]

# A fresh interpreter where the modules a bare CUDA machine lacks cannot be imported (even where
# they are installed), importing the engine through PYTHONPATH only (``-S``: no site processing, so
# no editable install's finder), running the benchmark on the CPU.
_BLOCKED_RUN = """
import importlib.abc, json, sys
FORBIDDEN = {forbidden!r}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: absent on the GPU machine)")
        return None
sys.meta_path.insert(0, Absent())
import benchmarks.gpu, benchmarks.gpu_path, engine
assert engine.__file__.startswith({repo!r}), engine.__file__
rc = benchmarks.gpu.main(["--device", "cpu", "--frames", "3", "--warmup", "1", "--batches", "1", "2", "--threads", "1",
                          "--out", {out!r}])
print(json.dumps({{"rc": rc, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)}}))
"""


def _env(*, site_packages: bool = False) -> dict[str, str]:
    """PYTHONPATH = the checkout (and, for ``python -S``, this interpreter's site-packages, where torch is)."""
    import site

    paths = [str(REPO)] + (site.getsitepackages() if site_packages else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def test_cpu_run_without_the_absent_modules_writes_sane_json(tmp_path: Path):
    out = tmp_path / "gpu.json"
    code = _BLOCKED_RUN.format(forbidden=FORBIDDEN_MODULES, out=str(out), repo=str(REPO))
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=_env(site_packages=True), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    tail = json.loads(r.stdout.strip().splitlines()[-1])
    assert tail == {"rc": 0, "loaded": []}

    rep = json.loads(out.read_text())
    assert rep["format"] == "avatar-bench-gpu/1" and rep["complete"] is True and rep["elapsed_s"] > 0
    env = rep["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["threads"] == 1
    assert rep["settings"]["batches"] == [1, 2] and rep["settings"]["modes"] == ["fp32"] and rep["settings"]["steps"] == 2
    chk = rep["check"]["fp32"]  # the same path on the same kind of device: equal to the stored reference
    assert chk["max_abs_latent"] < 1e-3 and chk["max_abs_landmarks"] < 1e-4 and chk["mean_abs_crop"] < 0.5

    assert [(e["mode"], e["batch"], e["status"]) for e in rep["results"]] == [("fp32", 1, "ok"), ("fp32", 2, "ok")]
    for e in rep["results"]:
        f = e["frame"]
        assert f["n"] == 3 and f["complete"] and 0 < f["min_ms"] <= f["p50_ms"] <= f["p95_ms"] <= f["max_ms"]
        assert f["per_session_ms"] == pytest.approx(f["p50_ms"] / e["batch"], rel=1e-3) and f["fps_at_p95"] > 0
        tp = e["throughput"]
        assert tp["ms_per_frame"] > 0 and tp["frames_per_s"] > 0 and tp["sessions_at_25fps"] >= 0
        assert set(e["graphs"]) == set(GRAPHS)
        assert all(g["p50_ms"] > 0 and g["p95_ms"] >= g["p50_ms"] and g["n"] == 3 for g in e["graphs"].values())
        assert e["memory"] is None and e["seconds"] > 0
    proj = rep["projection"]
    assert set(proj) >= {"fp32", "best", "notes"} and proj["best"]["mode"] == "fp32"
    assert proj["fp32"]["batches_measured"] == [1, 2] and proj["fp32"]["latency_bound_sessions"] >= 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("no PNG" in n for n in rep["notes"])
    else:
        assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_where_absent_is_one_line_and_exit_2(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cuda", "--out", str(tmp_path / "g.json")],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "--device cpu" in lines[0]
    assert not (tmp_path / "g.json").exists()

    from engine.cli import main

    assert main(["bench", "gpu", "--device", "cuda", "--out", str(tmp_path / "g.json")]) == 2


def test_budget_spent_keeps_a_valid_partial_report(tmp_path: Path):
    torch.set_num_threads(1)
    rep = bench_gpu(tmp_path / "g.json", device="cpu", batches=(1, 2), frames=2, warmup=0, budget_s=0.0, log=lambda s: None)
    assert rep["complete"] is False
    assert [e["status"] for e in rep["results"]] == ["skipped", "skipped"]
    assert all("time budget" in e["reason"] for e in rep["results"])
    assert json.loads((tmp_path / "g.json").read_text())["results"] == rep["results"]


def test_projection_from_a_batch_curve():
    def row(b: int, p95: float, ms: float, mode: str = "fp32") -> dict:
        return {"mode": mode, "batch": b, "frame": {"p95_ms": p95},
                "throughput": {"sessions_at_25fps": int(b * 40 // ms), "frames_per_s": 1000 * b / ms},
                "memory": {"per_session_mb": 100.0}}

    p = project([row(1, 5, 4), row(8, 20, 16), row(32, 60, 50), row(1, 4, 3, "bf16"), row(16, 30, 20, "bf16")], gpu_memory_mb=10_000)
    assert p["fp32"]["latency_bound_sessions"] == 8 and not p["fp32"]["limited_by_largest_batch"]
    assert p["fp32"]["throughput_sessions"] == 25 and p["fp32"]["at_batch"] == 32  # 32 x 40 / 50
    assert p["fp32"]["max_frames_per_s"] == 640 and p["fp32"]["memory_bound_sessions"] == 90
    assert p["bf16"]["latency_bound_sessions"] == 16 and p["bf16"]["limited_by_largest_batch"]
    assert p["best"]["mode"] == "bf16" and p["best"]["latency_bound_sessions"] == 16


def test_ddim_loop_equals_ddim_sample():
    torch.set_num_threads(1)
    _, models = load_models()
    path = FramePath(models, AvatarAsset.load(), batch=2, steps=3)
    with torch.no_grad():
        k, tokens, gru, previous = path.init_state()
        lm, _ = path.landmarks(path.audio(k), gru)
        cond = path.conditions(lm, tokens, previous)
        ours = path.sample(cond)
        ref = ddim_sample(path.denoise, path.noise, cond, steps=3)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=0, atol=1e-6)
