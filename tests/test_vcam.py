"""`avatar vcam`: sizes, the fitting of the portrait into a 16:9 camera, a clear error where no virtual
camera exists (here: no v4l2loopback), and the whole path (a speech file in real time -> the live
pipeline -> fitted frames at the frame rate -> the sink; the mouth moves while the file speaks,
then idles) into a sink that keeps what a camera would receive."""
from __future__ import annotations

import wave

import numpy as np
import pytest

from clients.sinks import OutputDeviceUnavailable, VirtualCameraSink
from clients.vcam import Framer, parse_size, run_vcam
from engine.audio import decode_audio
from engine.avatar import load_portrait
from engine.cli import DEMO, main
from tests.test_server import _lower_face
from tests.tiny import tiny_bundle


def test_parse_size():
    assert parse_size("1280x720") == (1280, 720)
    for bad in ("1280", "1280x", "axb", "8x8", "1281x720", "99999x720"):
        with pytest.raises(ValueError, match="--size"):
            parse_size(bad)
    with pytest.raises(SystemExit):
        main(["vcam", "--size", "12x7"])


def test_framer_centres_the_portrait_on_its_blurred_copy():
    img = load_portrait(DEMO / "astronaut.jpg")  # 512 x 512
    f = Framer(img, (1280, 720))
    out = f(img)
    assert out.shape == (720, 1280, 3) and out.dtype == np.uint8
    assert (f.fit_w, f.fit_h, f.x0, f.y0) == (720, 720, 280, 0)
    inner = out[:, 280:1000].astype(np.float32)
    import cv2

    assert np.abs(inner - cv2.resize(img, (720, 720), interpolation=cv2.INTER_LINEAR).astype(np.float32)).mean() < 3
    side = out[:, :280].astype(np.float32)
    assert side.mean() < img.mean() * 0.6, "the background is darkened"
    assert np.abs(np.diff(side, axis=1)).mean() < 2, "the background is blurred"
    assert Framer(img, None)(img) is img  # the portrait's own size: nothing to do


@pytest.mark.parametrize("argv", [["vcam", "--seconds", "1"], ["live", "--vcam"]])
def test_vcam_without_a_device_says_so(argv, capsys):
    try:
        VirtualCameraSink(64, 64, 25).close()
        pytest.skip("this machine has a virtual camera device")
    except OutputDeviceUnavailable:
        pass
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"avatar {argv[0]}: error" in err and "virtual camera" in err and ("v4l2loopback" in err or "pyvirtualcam" in err)


def test_vcam_unreadable_audio_is_an_error_before_any_device(tmp_path, capsys):
    bad = tmp_path / "speech.wav"
    bad.write_bytes(b"not audio at all")
    assert main(["vcam", "--audio", str(bad), "--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert "avatar vcam: error" in err and "speech.wav" in err and "virtual camera" not in err, err


class KeepingSink:
    """What a camera receives: the frame's size, its arrival time, and a crop of it."""

    name = "test sink"

    def __init__(self, w: int, h: int, fps: int, box: tuple[slice, slice]):
        self.size, self.fps, self.box = (w, h), fps, box
        self.frames: list[tuple[float, tuple[int, ...], np.ndarray]] = []
        self.closed = False

    def send(self, rgb: np.ndarray) -> bool:
        import time

        self.frames.append((time.monotonic(), rgb.shape, rgb[self.box].astype(np.float32)))
        return True

    def close(self) -> None:
        self.closed = True


def test_vcam_speaks_a_file_then_idles(tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    portrait = load_portrait(DEMO / "astronaut.jpg")
    voice = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)[: int(2.5 * 16000)]
    speech = tmp_path / "speech.wav"
    with wave.open(str(speech), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.round(voice * 32767).astype("<i2").tobytes())

    # the lower face as it lands in the 640x360 camera: the 512 px portrait scaled to 360 px, from x = 140
    from engine.avatar import prepare_avatar
    from engine.runtime import load_runtime

    rt = load_runtime(bundle, "torch", threads=1)
    rows, cols = _lower_face(prepare_avatar(portrait, rt, crop_size_px=rt.bundle.crop_size_px))
    s = 360 / 512
    box = (slice(int(rows.start * s), int(rows.stop * s)), slice(140 + int(cols.start * s), 140 + int(cols.stop * s)))
    sinks: list[KeepingSink] = []

    def make(w, h, fps):
        sinks.append(KeepingSink(w, h, fps, box))
        return sinks[-1]

    r = run_vcam(DEMO / "astronaut.jpg", audio=speech, size=(640, 360), bundle=str(bundle), backend="torch", threads=1,
                 seconds=4.5, sink=make)
    sink = sinks[0]
    assert sink.closed and sink.size == (640, 360) and sink.fps == 25
    assert r.frames == len(sink.frames) and r.size == (640, 360)
    assert all(shape == (360, 640, 3) for _, shape, _ in sink.frames)
    assert r.fps > 10 and r.frames > 60, r.as_dict()  # the camera is fed, never frozen (its speed: benchmarks)

    # the mouth moves while the file speaks, and rests once it has ended
    ref = Framer(portrait, (640, 360))(portrait)[box].astype(np.float32)
    t0 = sink.frames[0][0]
    during = [np.abs(c - ref).mean() for t, _, c in sink.frames if 0.5 < t - t0 < 2.3]
    after = [np.abs(c - ref).mean() for t, _, c in sink.frames if t - t0 > 3.6]
    assert len(during) > 20 and len(after) > 10, (len(during), len(after))
    assert np.median(during) > 2 * np.median(after) + 2, (np.median(during), np.median(after))
