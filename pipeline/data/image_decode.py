"""Images through Pillow: frame 0, EXIF-rotated, as RGB; a per-call pixel limit is checked before decoding.

Safe to call from many threads at once: no Pillow global is ever written after import.
"""

from __future__ import annotations

import re
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data.media_errors import MediaError, NotThisKind

# Register every Pillow plugin now: the lazy first-use registration is not meant to run in
# several worker threads at once.
Image.init()
# We enforce our own per-call pixel limit before decoding, so Pillow's process-wide warning
# (at Image.MAX_IMAGE_PIXELS) is only noise. Its hard error (at 2x) still applies and is mapped.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Formats a captioning dataset plausibly holds. Excluding the rest keeps odd parsers (EPS calls
# Ghostscript) away from untrusted bytes, and stops Pillow's MPEG plugin (header only, no
# decoder) from claiming MPEG videos. Only names this Pillow can open (MPO comes via JPEG).
_IMAGE_FORMATS = tuple(
    f for f in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF", "JPEG2000", "PPM", "ICO",
                "PCX", "SGI", "TGA", "PSD", "QOI", "HEIF")
    if f in Image.OPEN
)  # fmt: skip
_ERR = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError)


def decode_image(fileobj: BinaryIO, max_pixels: int) -> Image.Image:
    """Frame 0 as RGB (transparency composited on white); content Pillow cannot identify is NotThisKind."""
    try:
        im = Image.open(fileobj, formats=_IMAGE_FORMATS)
    except UnidentifiedImageError as e:
        raise NotThisKind from e
    except Image.DecompressionBombError as e:  # over Pillow's process-wide hard limit
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise MediaError(f"image too large: {m[1] if m else '?'} pixels > limit {max_pixels}") from e
    except _ERR as e:
        raise MediaError(f"corrupt image: {e}") from e
    with im:
        # Open only parsed the header: refuse bombs before any pixel is decoded.
        pixels = im.width * im.height
        if pixels > max_pixels:
            raise MediaError(f"image too large: {pixels} pixels > limit {max_pixels}")
        try:
            im.load()  # frame 0 of animations / multi-page files; raises on truncation
            rgb = _to_rgb(_exif_transpose(im))
        except _ERR as e:
            raise MediaError(f"{'truncated' if 'truncated' in str(e) else 'corrupt'} image: {e}") from e
    return rgb


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose a readable picture
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        im = _high_depth_to_l(im)  # Pillow's convert() clips 16-bit values to 255 (all white)
    if im.has_transparency_data:  # RGBA, LA, PA, P/RGB with tRNS: composite on white
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    arr = np.asarray(im, dtype=np.float64)
    hi = float(arr.max()) if arr.size else 0.0
    if im.mode.startswith("I;16") or 255 < hi <= 65535:
        arr = arr / 257.0  # 16-bit range -> 8-bit
    elif im.mode == "F" and hi <= 1.0:
        arr = arr * 255.0  # float images in [0, 1]
    elif hi > 65535:
        arr = arr * (255.0 / hi)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
