"""Provenance (issue 17): an invisible watermark on every generated frame, a detector anyone can run,
signed metadata in the files the engine writes.

    payload.py    the 32-bit payload (format version, bundle short hash, session / file id) + CRC-16
    watermark.py  Watermarker (embed: a tiled spread-spectrum luma pattern) and detect (scale search, fold, correlate)
    stamp.py      the pipeline's hook: every OutputFrame's image is marked where the pipeline makes it
    metadata.py   container tags and a signed C2PA manifest (write and read)
    verify.py     verify_video(path) -> Verdict (``avatar verify``)
"""
from engine.provenance.payload import Payload
from engine.provenance.watermark import Watermarker, WatermarkConfig, detect


def verify_video(path, **kw):
    """``engine.provenance.verify.verify_video`` (imported lazily: it pulls in PyAV and c2pa)."""
    from engine.provenance.verify import verify_video as _verify

    return _verify(path, **kw)


__all__ = ["Payload", "Watermarker", "WatermarkConfig", "detect", "verify_video"]
