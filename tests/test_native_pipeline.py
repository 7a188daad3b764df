"""The native path through the live pipeline with the shipped default bundle (ONNX Runtime): the
demo voice speaks, the mouth region moves, everything outside the warped box and the pasted
interior keeps the portrait's own pixels, idle frames are the portrait itself."""
from __future__ import annotations

import numpy as np

from engine.avatar import load_portrait, prepare_avatar
from engine.bundle import load_bundle
from engine.cli import DEMO
from engine.generator import FrameGenerator
from engine.pipeline.pipeline import Pipeline, PipelineConfig
from engine.pipeline.sources import FileSource
from engine.runtime import load_runtime
from tests import aio


def test_demo_through_the_pipeline_moves_the_mouth_and_keeps_the_rest():
    rt = load_runtime(load_bundle(), "auto", threads=1)
    img = load_portrait(DEMO / "astronaut.jpg")
    av = prepare_avatar(img, rt, crop_size_px=rt.bundle.crop_size_px)
    box = FrameGenerator(rt, av).pixel_warp.box
    x0, y0, x1, y1 = box

    async def main():
        out = []
        async with Pipeline(rt, av, PipelineConfig(realtime=False, blinks=False, head_motion=False, watermark=False)) as p:
            p.start(FileSource(DEMO / "demo_voice.wav", realtime=False))
            async for f in p.frames():
                out.append(f)
                if len(out) >= 150:
                    break
        return out

    frames = aio.run(main(), timeout_s=240)
    assert len(frames) >= 100
    outside = np.ones(img.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    moved = []
    for f in frames:
        assert f.image.shape == img.shape
        assert np.array_equal(f.image[outside], img[outside])  # the portrait's own pixels, untouched
        d = np.abs(f.image[y0:y1, x0:x1].astype(np.float32) - img[y0:y1, x0:x1]).mean()
        if f.kind == "idle":
            assert d == 0.0
        else:
            moved.append(d)
    assert len(moved) > 50
    assert np.percentile(moved, 90) > 1.0  # the mouth moves while the voice speaks
