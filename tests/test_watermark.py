"""The provenance watermark and metadata (engine/provenance): payload and CRC, embed/detect round trips
(synthetic and real frames, after H.264 at 1 Mbit/s), no detection on unmarked frames, the pipeline
marks its frames, `avatar verify` on a rendered file and on an unmarked one, C2PA + tags written and
read. Robustness and false-positive rates are measured in benchmarks/watermark.py."""
from __future__ import annotations

import json
import os
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.cli import DEMO, main
from benchmarks.watermark import codec_roundtrip
from engine.provenance.payload import Payload
from engine.provenance.watermark import Watermarker, detect

PAYLOAD = Payload(1, 0xABCDE, 0x42)


@pytest.fixture(autouse=True)
def _c2pa_dir(tmp_path, monkeypatch):
    """Signing credentials in the test's folder, never the user's config."""
    monkeypatch.setenv("AVATAR_C2PA_DIR", str(tmp_path / "c2pa"))


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return cv2.imread(str(DEMO / "astronaut.jpg"))[:, :, ::-1].copy()  # (512, 512, 3) RGB


def _moving(image: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` frames of ``image`` with a small head-sway-like motion (sub-pixel shifts, a slight rotation)."""
    h, w = image.shape[:2]
    out = []
    for i in range(n):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.6 * np.sin(i / 5), 1.0)
        m[:, 2] += (1.5 * np.sin(i / 3), 1.0 * np.cos(i / 4))
        out.append(cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT))
    return out


def test_payload_round_trip_and_crc_rejects_a_flipped_bit():
    bits = PAYLOAD.code_bits()
    assert bits.shape == (48,) and set(np.unique(bits)) <= {-1, 1}
    assert Payload.from_code_bits(bits) == PAYLOAD
    for i in (0, 5, 31, 40):
        flipped = bits.copy()
        flipped[i] = -flipped[i]
        assert Payload.from_code_bits(flipped) is None
    with pytest.raises(ValueError):
        Payload(16, 0, 0)


def test_embed_is_invisible_cheap_and_decodes_on_synthetic_and_real_frames(portrait):
    rng = np.random.default_rng(0)
    # synthetic, not square: smooth gradients, shapes and sensor noise
    yy, xx = np.mgrid[0:288, 0:480]
    synth = np.stack([(xx / 480 * 200 + 20), (yy / 288 * 180 + 30), 120 + 60 * np.sin(xx / 23.0) * np.cos(yy / 31.0)], axis=-1)
    cv2.circle(synth, (240, 140), 80, (220, 180, 150), -1)
    synth = np.clip(synth + rng.normal(0, 3, synth.shape), 0, 255).astype(np.uint8)
    for image in (synth, portrait):
        wm = Watermarker(PAYLOAD)
        marked = [wm.embed(f) for f in _moving(image, 10)]
        mse = np.mean((marked[0].astype(np.float64) - _moving(image, 1)[0]) ** 2)
        assert 10 * np.log10(255**2 / mse) >= 40.0  # PSNR against the unmarked frame
        d = detect(marked)
        assert d.found and d.payload == PAYLOAD, (d.score, d.bit_margin)
        assert d.confidence > 0.9999 and d.bit_margin > 2.5


def test_decodes_after_h264_at_1_mbit_and_after_a_crop(portrait):
    wm = Watermarker(PAYLOAD)
    marked = [wm.embed(f) for f in _moving(portrait, 25)]
    d = detect(codec_roundtrip(marked, "libx264", 1_000_000))
    assert d.found and d.payload == PAYLOAD and d.bit_margin > 2.0, d.bit_margin
    crop = [m[26:-26, 26:-26] for m in marked[:10]]  # 10 % off each side's length, native scale
    d = detect(crop, anisotropic=False)
    assert d.found and d.payload == PAYLOAD and abs(d.period_px[0] / 64.0 - 512 / 460) < 0.02


def test_no_detection_on_unmarked_frames(portrait):
    others = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "portraits").glob("*.png"))[:3]
    images = [portrait] + [cv2.imread(str(p))[:, :, ::-1].copy() for p in others]
    for image in images:
        d = detect(_moving(image, 5))
        assert not d.found and d.confidence == 0.0
        assert d.score < 200, d.score  # marked content scores several hundred (benchmarks/watermark.py)


def test_pipeline_marks_every_output_frame(tmp_path, caplog):
    """Idle frames of a silent file are the portrait: with the watermark on, the *marked* portrait,
    bit for bit what a Watermarker for the pipeline's payload makes; off, the portrait and a warning."""
    from engine.avatar import load_portrait, prepare_avatar
    from engine.pipeline.pipeline import Pipeline, PipelineConfig
    from engine.pipeline.sources import FileSource
    from engine.provenance.stamp import bundle_payload
    from engine.runtime import load_runtime
    from tests import aio
    from tests.tiny import tiny_bundle

    rt = load_runtime(tiny_bundle(tmp_path / "b"), "torch", threads=1)
    avt = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    path = tmp_path / "silence.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(4000, np.int16).tobytes())

    def run(cfg):
        async def go():
            async with Pipeline(rt, avt, cfg) as p:
                p.start(FileSource(path, realtime=False))
                return [f async for f in p.frames()]

        return aio.run(go())

    base = dict(realtime=False, blinks=False, head_motion=False)
    frames = run(PipelineConfig(**base, watermark_id=7))
    expected = Watermarker(bundle_payload(rt.bundle.manifest, 7)).embed(avt.image)
    assert frames and all(f.kind == "idle" and np.array_equal(f.image, expected) for f in frames)
    with caplog.at_level("WARNING", logger="avatar.provenance"):
        plain = run(PipelineConfig(**base, watermark=False))
    assert all(np.array_equal(f.image, avt.image) for f in plain)
    assert "watermark is OFF" in caplog.text


def _voice(path: Path, seconds: float) -> Path:
    from engine.audio import decode_audio

    x = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)[8000 : 8000 + int(seconds * 16000)]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(x, -1, 1) * 32767).round().astype(np.int16).tobytes())
    return path


def test_render_writes_marks_and_metadata_and_verify_reports_them(tmp_path, capsys):
    from engine.provenance.metadata import read_c2pa, read_tags
    from engine.provenance.verify import verify_video
    from tests.tiny import tiny_bundle

    bundle = tiny_bundle(tmp_path / "b")
    out = tmp_path / "out.mp4"
    assert main(["render", "--audio", str(_voice(tmp_path / "v.wav", 1.2)), "-o", str(out), "--bundle", str(bundle), "--quiet", "--threads", "1"]) == 0
    assert "provenance: watermark v1" in capsys.readouterr().out
    # metadata: container tags and a signed C2PA manifest, key kept private
    tags = read_tags(out)
    assert tags["generator"] == "avatar-engine" and tags["generative_model"] and tags["watermark"]["embedded"]
    c2 = read_c2pa(out)
    assert c2.present and c2.signature_valid and c2.ai_generated and not c2.trusted
    assert c2.record["bundle_manifest_sha256"] == tags["bundle_manifest_sha256"]
    key = Path(os.environ["AVATAR_C2PA_DIR"]) / "signer_key.pem"
    assert key.is_file() and (key.stat().st_mode & 0o077) == 0
    # the watermark, through the CLI and the API
    assert main(["verify", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"generated by avatar-engine, bundle {tags['bundle']}") and "valid signature" in said
    v = verify_video(out)
    assert v.generated and v.bundle == tags["bundle"] and v.watermark.payload.session == tags["watermark"]["id"]
    assert json.loads(json.dumps(v.as_dict()))["generated"] is True


def test_verify_says_none_on_an_unmarked_file_and_2_on_unreadable(tmp_path, portrait, capsys):
    from engine.media.mp4 import Mp4Writer

    plain = tmp_path / "plain.mp4"
    with Mp4Writer(plain, fps=25, width=512, height=512, audio=None) as wr:
        for f in _moving(portrait, 30):
            wr.write(f)
    assert main(["verify", str(plain)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("no watermark found") and "no C2PA manifest" in said and "no provenance tags" in said
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    assert main(["verify", str(bad)]) == 2
    assert "cannot be opened" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "missing.webm")]) == 2
