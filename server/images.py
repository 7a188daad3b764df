"""What an uploaded image is, from its first bytes only: format and size, before anything decodes it.

The server decodes uploads with OpenCV, which also reads formats that nobody needs for a portrait
and that make cheap decompression bombs (a 9 MB Radiance HDR decodes to 144 MP) or that Pillow
cannot read (so a Pillow header check lets them through). So uploads are allowed by a list:
PNG, JPEG, WebP and BMP, recognised by their magic bytes, and their width and height are read
here from the same header fields that OpenCV's decoder for that format (libpng, libjpeg,
libwebp, its BMP reader) takes them from; the caller refuses an image that is too large or too
small before OpenCV sees it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

ALLOWED_FORMATS = ("PNG", "JPEG", "WebP", "BMP")  # what an upload may be

# Other image formats, recognised only to name them in the refusal (415 rather than "not an image").
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"#?RADIANCE", "Radiance HDR"), (b"#?RGBE", "Radiance HDR"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"\x76\x2f\x31\x01", "OpenEXR"), (b"\0\0\0\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"\x59\xa6\x6a\x95", "Sun raster"), (b"PF\n", "PFM"), (b"Pf\n", "PFM"),
    (b"\0\0\0\x0cJXL ", "JPEG XL"), (b"\xff\x0a", "JPEG XL"), (b"8BPS", "Photoshop"), (b"\0\0\1\0", "ICO"),
)
_PNM = (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7")


class ImageFormatError(ValueError):
    """Not an image of an allowed format, or a header that cannot be read. ``known`` names the
    format when the bytes are an image of another format (the server answers 415), else None."""

    def __init__(self, message: str, known: str | None = None):
        super().__init__(message)
        self.known = known


@dataclass(frozen=True)
class ImageInfo:
    format: str  # one of ALLOWED_FORMATS
    width_px: int
    height_px: int


def probe_image(data: bytes) -> ImageInfo:
    """Format, width and height from the header; raises ImageFormatError."""
    head = bytes(data[:32])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(data)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(data)
    if head.startswith(b"BM"):
        return _bmp(data)
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            raise ImageFormatError(_not_allowed(name), known=name)
    if head[:2] in _PNM and len(head) > 2 and head[2:3] in b" \t\r\n":
        raise ImageFormatError(_not_allowed("PNM"), known="PNM")
    raise ImageFormatError(f"not a readable image: an upload must be {_allowed()}")


def _allowed() -> str:
    return ", ".join(ALLOWED_FORMATS[:-1]) + " or " + ALLOWED_FORMATS[-1]


def _not_allowed(name: str) -> str:
    return f"{name} images are not accepted: send {_allowed()}"


def _truncated(fmt: str) -> ImageFormatError:
    return ImageFormatError(f"not a readable image: a truncated or malformed {fmt} header")


def _png(data: bytes) -> ImageInfo:
    # signature (8), then the IHDR chunk: length (4), b"IHDR", width (4), height (4), ...
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise _truncated("PNG")
    w, h = struct.unpack(">II", data[16:24])
    return ImageInfo("PNG", w, h)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def _jpeg(data: bytes) -> ImageInfo:
    """Walk the marker segments (skipping APPn/EXIF, which may hold a thumbnail) to the first SOFn."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise _truncated("JPEG")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if length < 2:
            break
        if marker in _SOF:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            if h == 0:  # the height comes later, in a DNL marker: not worth supporting
                raise ImageFormatError("not a readable image: a JPEG whose height is not in its frame header")
            return ImageInfo("JPEG", w, h)
        i += 2 + length
    raise _truncated("JPEG")


def _webp(data: bytes) -> ImageInfo:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # extended: canvas size, 24-bit fields of size - 1
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return ImageInfo("WebP", w, h)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        w, h = struct.unpack("<HH", data[26:30])
        return ImageInfo("WebP", w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless: 14-bit fields of size - 1
        bits = int.from_bytes(data[21:25], "little")
        return ImageInfo("WebP", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
    raise _truncated("WebP")


def _bmp(data: bytes) -> ImageInfo:
    if len(data) < 26:
        raise _truncated("BMP")
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # BITMAPCOREHEADER: 16-bit unsigned sizes
        w, h = struct.unpack("<HH", data[18:22])
    elif header >= 40 and len(data) >= 26:  # BITMAPINFOHEADER and later: signed 32-bit, height < 0 = top-down
        w, h = struct.unpack("<ii", data[18:26])
        h = abs(h)
    else:
        raise _truncated("BMP")
    if w <= 0:
        raise _truncated("BMP")
    return ImageInfo("BMP", w, h)
