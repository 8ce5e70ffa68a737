"""Decode one media item (bytes of an image or a video) into model-ready pixels.

Images go through Pillow (image_decode), videos through PyAV (video_decode). Which one is decided
by the content (magic bytes, then what the decoders accept), never by a file name; a manifest
``kind`` column may only change the order of attempts for content we cannot sniff. Every failure
is a ``MediaError`` whose message names the cause, so the runner can write it into the row's
``error`` column and move on.

Safe to call from many threads at once: no Pillow global is ever written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from pipeline.data.image_decode import decode_image
from pipeline.data.media_errors import MediaError, NotThisKind
from pipeline.data.video_decode import decode_video


@dataclass
class Media:
    kind: str  # "image" | "video"
    image: Image.Image | None = None  # RGB (image rows)
    frames: np.ndarray | None = None  # uint8 [T, H, W, 3] (video rows)
    frame_times: list[float | None] | None = None  # seconds, one per frame (video rows)


def decode_media(
    fileobj: BinaryIO,
    *,
    video_frames: int = 8,
    max_image_pixels: int = 89_478_485,
    kind_hint: str | None = None,
    video_fps: float | None = None,
) -> Media:
    """Decode a seekable binary file object holding exactly one image or video (from offset 0).

    Content wins over ``kind_hint``: a JPEG hinted "video" is still returned as an image. Videos:
    ``video_frames`` uniformly by time, or frames ``video_fps`` a second, at most ``video_frames``.
    """
    if video_frames < 1:
        raise ValueError("video_frames must be >= 1")
    fileobj.seek(0)
    head = fileobj.read(64)
    if not head:
        raise MediaError("empty file")
    sniffed = _sniff(head)
    order = [sniffed or kind_hint or "image"]
    if sniffed is None:  # unknown magic: let both decoders have a look
        order.append("video" if order[0] == "image" else "image")
    for kind in order:
        fileobj.seek(0)
        try:
            if kind == "image":
                return Media("image", image=decode_image(fileobj, max_image_pixels))
            frames, times = decode_video(fileobj, video_frames, max_image_pixels, sniffed, video_fps)
            return Media("video", frames=frames, frame_times=times)
        except NotThisKind:
            continue
    raise MediaError("not an image or video (unrecognised content)")


def _sniff(head: bytes) -> str | None:
    """Cheap magic-byte check; None when unsure (decoders then decide)."""
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\0", b"MM\0*")):
        return "image"
    if head[:4] == b"RIFF":
        return "image" if head[8:12] == b"WEBP" else "video"  # AVI, WAV (-> audio-only error)
    if head[4:8] == b"ftyp":  # ISO BMFF: the brand tells still images (AVIF/HEIF) from video
        return "image" if head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1") else "video"
    if head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"ID3", b"fLaC", b"\0\0\1\xba", b"\0\0\1\xb3")):
        return "video"  # Matroska/WebM, FLV, Ogg, MP3, FLAC, MPEG-PS/ES
    return None
