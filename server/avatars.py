"""The server's avatars: portraits prepared once (face found, aligned, mouth-region latent
encoded) and kept by id.

``default`` is the shipped demo portrait (or the one ``avatar serve --portrait`` names). An
upload is identified by the sha256 of its bytes: uploading the same image again returns the
same avatar without preparing it again. Preparing runs in a worker thread, one at a time, at a
lower CPU priority (nice +10): it competes with the live sessions for the same cores, and a
stream that stalls is worse than an upload that takes a moment longer. Uploaded portraits must
show exactly one face (``on_multiple="refuse"``): a server cannot ask which face was meant.

With a ``directory``, each accepted upload's bytes are kept there as ``<id>.img`` (written
atomically; removed when the upload is evicted), and ``restore()`` prepares them again when the
server starts: uploads survive restarts, prepared with whatever bundle the server runs now.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.avatar import MAX_SIDE_PX, Avatar, decode_portrait, load_portrait, prepare_avatar
from engine.errors import FaceTooSmallError, ImageTooLargeError, UnreadableMediaError
from engine.face.landmarks import FaceOptions
from server.images import ImageFormatError, probe_image

DEFAULT_ID = "default"
MIN_SIDE_PX = FaceOptions().min_face_px  # an image whose shorter side (once scaled to MAX_SIDE_PX) is below this holds no usable face
PREPARE_NICE = 10  # the preparing thread's niceness: live sessions' threads come first on a busy CPU
log = logging.getLogger("avatar.server")


class UnsupportedImageError(UnreadableMediaError):
    """An image, but of a format uploads may not be (only server.images.ALLOWED_FORMATS): HTTP 415."""


def _lower_priority() -> None:
    """Run the calling thread (and the threads it starts, e.g. MediaPipe's) at a lower CPU priority.
    Linux schedules threads on their own, so this touches only the preparing thread, not the server."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARE_NICE)
        except OSError as e:  # not permitted in some sandboxes: prepare at normal priority
            log.debug("cannot lower the avatar preparation thread's priority: %s", e)


@dataclass
class AvatarEntry:
    avatar_id: str
    avatar: Avatar
    source: str  # "default: <path>" or "upload"
    created_s: float = field(default_factory=time.time)

    def describe(self) -> dict:
        h, w = self.avatar.image.shape[:2]
        return {"id": self.avatar_id, "source": self.source, "width": w, "height": h, "notes": list(self.avatar.notes)}


class AvatarStore:
    """Prepared avatars by id; ``await store.upload(data)`` adds one from encoded image bytes."""

    def __init__(self, runtime: Any, *, max_avatars: int = 32, max_pixels: int = 40_000_000, directory: str | Path | None = None):
        self.runtime = runtime
        self.directory = Path(directory) if directory is not None else None  # where uploads are kept (None: memory only)
        self.max_avatars = max_avatars  # uploads kept at most (least recently used go first; never the default)
        self.max_pixels = max_pixels  # larger images are refused from their header, before decoding
        self._entries: OrderedDict[str, AvatarEntry] = OrderedDict()
        self._busy = asyncio.Lock()  # one preparation at a time
        # one thread, at a lower priority: preparing an upload takes ~1 s of CPU that live sessions need more
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="avatar-prepare", initializer=_lower_priority)
        self._inflight: dict[str, asyncio.Future] = {}  # id -> the preparation under way

    def __contains__(self, avatar_id: str) -> bool:
        return avatar_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, avatar_id: str) -> Avatar:
        """The avatar; raises KeyError for an unknown id."""
        entry = self._entries[avatar_id]
        self._entries.move_to_end(avatar_id)
        return entry.avatar

    def describe(self) -> list[dict]:
        return [e.describe() for e in self._entries.values()]

    def add(self, avatar_id: str, avatar: Avatar, source: str) -> AvatarEntry:
        """Keep an already prepared avatar (the default, or one prepared elsewhere)."""
        entry = self._entries[avatar_id] = AvatarEntry(avatar_id, avatar, source)
        uploads = [k for k, e in self._entries.items() if e.source == "upload"]
        for k in uploads[: max(0, len(uploads) - self.max_avatars)]:
            del self._entries[k]
            if self.directory is not None:
                (self.directory / f"{k}.img").unlink(missing_ok=True)
        return entry

    def _keep(self, avatar_id: str, data: bytes) -> None:
        """The upload's bytes on disk, written atomically (a crash leaves no half file under the id)."""
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{avatar_id}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / f"{avatar_id}.img")

    async def restore(self) -> int:
        """Prepare the uploads kept in ``directory`` (the newest ``max_avatars``); returns how many.
        A file that is not what its name says, or no longer prepares, is skipped with a warning."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        files = sorted(self.directory.glob("*.img"), key=lambda f: f.stat().st_mtime)[-self.max_avatars :]
        n = 0
        for f in files:
            avatar_id = f.stem
            if avatar_id in self._entries:
                continue
            data = f.read_bytes()
            if hashlib.sha256(data).hexdigest()[:32] != avatar_id:
                log.warning("avatar file %s does not hold what its name says: skipped", f)
                continue
            try:
                await self._prepare(avatar_id, data, keep=False)
                n += 1
            except Exception as e:  # an upload that no longer prepares (another bundle, another MediaPipe): skip it
                log.warning("kept avatar %s no longer prepares (%s): skipped", avatar_id, e)
        return n

    async def load_default(self, portrait: str | Path) -> AvatarEntry:
        """Prepare ``portrait`` (a file; the face picked as ``avatar render`` does) as ``default``."""
        loop = asyncio.get_running_loop()
        crop = self.runtime.bundle.crop_size_px

        def prepare() -> Avatar:
            return prepare_avatar(load_portrait(portrait), self.runtime, crop_size_px=crop)

        async with self._busy:
            avatar = await loop.run_in_executor(self._pool, prepare)
        return self.add(DEFAULT_ID, avatar, f"default: {Path(portrait).name}")

    async def upload(self, data: bytes) -> tuple[AvatarEntry, bool]:
        """Prepare an uploaded image; returns (entry, created). Raises the engine's AvatarInputError
        subclasses: UnreadableMediaError (not an image), UnsupportedImageError (an image of a format
        not allowed), ImageTooLargeError, NoFaceError, MultipleFacesError, FaceTooSmallError (also
        for an image too small to hold a face). Format and size come from the header, before decoding."""
        avatar_id = hashlib.sha256(data).hexdigest()[:32]
        if avatar_id in self._entries:
            self._entries.move_to_end(avatar_id)
            return self._entries[avatar_id], False
        if avatar_id in self._inflight:  # the same bytes are being prepared: share the result
            await asyncio.shield(self._inflight[avatar_id])
            return self._entries[avatar_id], False
        fut = asyncio.get_running_loop().create_future()
        self._inflight[avatar_id] = fut
        try:
            entry = await self._prepare(avatar_id, data)
            fut.set_result(None)
            return entry, True
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._inflight[avatar_id]

    async def _prepare(self, avatar_id: str, data: bytes, *, keep: bool = True) -> AvatarEntry:
        self.check_header(data)
        loop = asyncio.get_running_loop()
        crop = self.runtime.bundle.crop_size_px
        opts = FaceOptions(on_multiple="refuse", max_image_pixels=self.max_pixels)

        def prepare() -> Avatar:
            image = decode_portrait(data, what="the uploaded image")
            return prepare_avatar(image, self.runtime, crop_size_px=crop, opts=opts, what="the uploaded image")

        async with self._busy:
            avatar = await loop.run_in_executor(self._pool, prepare)
        if keep and self.directory is not None:
            self._keep(avatar_id, data)
        return self.add(avatar_id, avatar, "upload")

    def check_header(self, data: bytes) -> None:
        """Refuse, from the header alone and before OpenCV decodes anything: a format not in
        ALLOWED_FORMATS (whatever else OpenCV could decode, e.g. a Radiance HDR bomb), more than
        ``max_pixels``, or an image too small (or too thin) to hold a face once scaled."""
        try:
            info = probe_image(data)
        except ImageFormatError as e:
            cls = UnsupportedImageError if e.known else UnreadableMediaError
            raise cls(f"the uploaded image: {e}") from None
        w, h = info.width_px, info.height_px
        if w * h > self.max_pixels:
            raise ImageTooLargeError(f"the uploaded image is {w}x{h} = {w * h} pixels, more than {self.max_pixels}")
        shorter_px = min(w, h) * min(1.0, MAX_SIDE_PX / max(w, h, 1))  # its shorter side once scaled as portraits are
        if shorter_px < MIN_SIDE_PX:
            raise FaceTooSmallError(f"the uploaded image is {w}x{h} pixels: too small to hold a face (the shorter side must be at "
                                    f"least {MIN_SIDE_PX} px, after scaling the longer one to at most {MAX_SIDE_PX})")
