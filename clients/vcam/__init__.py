"""``avatar vcam``: the avatar as a virtual camera (see ``clients/vcam/camera.py``)."""
from clients.vcam.camera import Framer, VcamReport, parse_size, run_vcam

__all__ = ["Framer", "VcamReport", "parse_size", "run_vcam"]
