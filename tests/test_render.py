"""Bundles (hash checks) and the offline render, end to end with a tiny random-weight bundle."""
from __future__ import annotations

import json
import wave

import av
import numpy as np
import pytest

from engine.bundle import load_bundle
from engine.cli import main
from engine.errors import BundleError, NoFaceError
from tests.synth import speech_like
from tests.tiny import tiny_bundle

PORTRAIT = "portraits/dreamtalk__data_src_img_cropped_f30.png"


def _wav(path, seconds: float, sr: int = 16000):
    x = (speech_like(seconds, sr) * 32767 * 0.5).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(x.tobytes())
    return path


def test_bundle_loads_and_refuses_changed_files(tmp_path):
    d = tiny_bundle(tmp_path / "b")
    b = load_bundle(d)
    assert b.fps == 25 and b.steps == 2 and set(b.models) == {"autoencoder", "audio_encoder", "a2l", "denoiser"}
    w = d / "a2l.pt"
    w.write_bytes(w.read_bytes() + b"\0")
    with pytest.raises(BundleError, match=r"a2l\.pt: sha256 does not match"):
        load_bundle(d)
    (d / "a2l.json").unlink()
    with pytest.raises(BundleError, match=r"a2l\.json: listed in the manifest but missing"):
        load_bundle(d)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)


def test_default_bundle_is_valid_and_small():
    from engine.bundle import DEFAULT_BUNDLE

    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        pytest.skip("no default bundle in this checkout yet")
    b = load_bundle()
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE.iterdir())
    assert size < 50 * 2**20
    assert b.manifest["steps"] >= 1


def test_render_one_second_gives_25_frames_and_audio(shared_data, tmp_path):
    d = tiny_bundle(tmp_path / "b")
    out = tmp_path / "out.mp4"
    rc = main(["render", "--portrait", str(shared_data / PORTRAIT), "--audio", str(_wav(tmp_path / "a.wav", 1.0)), "-o", str(out),
               "--bundle", str(d), "--quiet", "--threads", "1"])
    assert rc == 0
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 25
        assert a.codec_context.name == "aac" and a.sample_rate == 48000
    with av.open(str(out)) as c:
        n_audio = sum(f.samples for f in c.decode(audio=0))
    assert abs(n_audio / 48000 - 1.0) < 0.05


def test_render_is_deterministic_given_seed(shared_data, tmp_path):
    from engine.render import render

    d = tiny_bundle(tmp_path / "b")
    wav = _wav(tmp_path / "a.wav", 0.4)
    outs = []
    for i in range(2):
        info = render(shared_data / PORTRAIT, wav, tmp_path / f"o{i}.mp4", bundle=d, seed=7, progress=False)
        with av.open(str(tmp_path / f"o{i}.mp4")) as c:
            outs.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
        # every frame went through the encoder thread (one worker: in order), timed
        assert info["stages_ms"]["encode"]["count"] == info["frames"] == len(outs[-1])
    assert np.array_equal(outs[0], outs[1])


def test_render_bad_inputs_give_clear_errors(shared_data, tmp_path, capsys):
    d = tiny_bundle(tmp_path / "b")
    wav = _wav(tmp_path / "a.wav", 0.3)
    blank = tmp_path / "blank.png"
    import cv2

    cv2.imwrite(str(blank), np.full((256, 256, 3), 128, np.uint8))
    assert main(["render", "--portrait", str(blank), "--audio", str(wav), "-o", str(tmp_path / "x.mp4"), "--bundle", str(d), "--quiet"]) == 2
    assert "no face" in capsys.readouterr().err.lower()
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert main(["render", "--portrait", str(junk), "--audio", str(wav), "-o", str(tmp_path / "x.mp4"), "--bundle", str(d), "--quiet"]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["render", "--portrait", str(shared_data / PORTRAIT), "--audio", str(junk), "-o", str(tmp_path / "x.mp4"), "--bundle", str(d), "--quiet"]) == 2
    assert not (tmp_path / "x.mp4").exists()


def test_bundle_refuses_models_that_do_not_fit_together(tmp_path):
    import dataclasses

    from engine.bundle import write_manifest
    from engine.models.denoiser import Denoiser
    from engine.models.io import save_model
    from tests.tiny import DEN

    d = tiny_bundle(tmp_path / "b")
    save_model(Denoiser(dataclasses.replace(DEN, n_landmarks=12)), d / "denoiser")
    write_manifest(d, fps=25, sample_rate_hz=16000, crop_size_px=256, steps=2)
    with pytest.raises(BundleError, match="do not fit together: denoiser n_landmarks 12 != a2l 57"):
        load_bundle(d)


def test_render_to_a_folder_is_refused(shared_data, tmp_path, capsys):
    d = tiny_bundle(tmp_path / "b")
    rc = main(["render", "--portrait", str(shared_data / PORTRAIT), "--audio", str(_wav(tmp_path / "a.wav", 0.2)), "-o", str(tmp_path),
               "--bundle", str(d), "--quiet"])
    assert rc == 2 and "is a folder" in capsys.readouterr().err


def test_main_job_renders_the_demo_with_the_default_bundle(tmp_path):
    """The README's main job, cut to one second of the demo voice: the shipped portrait, voice and bundle."""
    from engine.bundle import DEFAULT_BUNDLE
    from engine.cli import DEMO
    from engine.audio import decode_audio

    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        pytest.skip("no default bundle in this checkout yet")
    wav = tmp_path / "one_second.wav"
    x = decode_audio(DEMO / "demo_voice.wav")[:16000]
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((x * 32767).astype(np.int16).tobytes())
    out = tmp_path / "demo.mp4"
    assert main(["render", "--audio", str(wav), "-o", str(out), "--quiet", "--threads", "2", "--no-head-motion"]) == 0
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 25
    portrait = __import__("engine.avatar", fromlist=["load_portrait"]).load_portrait(DEMO / "astronaut.jpg")
    assert frames[0].shape == portrait.shape
    moving = np.abs(frames[5].astype(int) - frames[15].astype(int)).sum(-1) > 30
    assert moving.any()  # the mouth region changes with speech ...
    ys, xs = np.nonzero(moving)
    assert ys.min() > portrait.shape[0] * 0.1 and ys.max() < portrait.shape[0] * 0.6  # ... and only around the face


def test_mp4_audio_from_blocks_equals_audio_from_an_array(tmp_path):
    """The mp4's audio track read from an iterator of blocks (a decoder streaming a long file) is the
    same file as from the whole array; both cut or padded to the video's duration."""
    from engine.media.mp4 import Mp4Writer

    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(int(48000 * 1.3))).astype(np.float32)  # 1.3 s of audio for 1.0 s of video
    blocks = np.split(x, [1000, 1001, 5000, 47000, 47999])  # odd sizes, an empty one
    outs = []
    for name, audio in (("array", x), ("blocks", iter(blocks)), ("short", iter([x[:30000]]))):
        path = tmp_path / f"{name}.mp4"
        with Mp4Writer(path, fps=25, width=64, height=64, audio=audio, audio_rate_hz=48000) as w:
            for _ in range(25):
                w.write(np.zeros((64, 64, 3), np.uint8))
        with av.open(str(path)) as c:
            outs.append(np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]))
    assert np.array_equal(outs[0], outs[1])
    assert abs(len(outs[0]) / 48000 - 1.0) < 0.05 and abs(len(outs[2]) / 48000 - 1.0) < 0.05  # cut, padded: the video's second
    assert np.abs(outs[2][40000:]).max() < 0.05  # padded with silence past the short track's end


def test_render_streams_the_audio_and_never_decodes_the_whole_file(shared_data, tmp_path, monkeypatch):
    """The render reads the speech as it goes (a 16 kHz source and a 48 kHz track, both incremental):
    decoding a whole file, which held ~2 GB for 40 minutes of audio, is not on its path at all."""
    import engine.audio.decode as decode
    from engine.render import render

    def refuse(*a, **kw):
        raise AssertionError("decode_audio (the whole file in memory) was called by the render")

    monkeypatch.setattr(decode, "decode_audio", refuse)
    d = tiny_bundle(tmp_path / "b")
    info = render(shared_data / PORTRAIT, _wav(tmp_path / "a.wav", 1.3), tmp_path / "o.mp4", bundle=d, progress=False)
    assert info["frames"] == 33 and info["audio_s"] == pytest.approx(1.3)  # ceil(1.3 * 25): the last partial frame kept
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 33
