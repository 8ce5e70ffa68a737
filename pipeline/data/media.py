"""Decode one media item (bytes of an image or a video) into model-ready pixels.

Images go through Pillow, videos through PyAV. Which one is decided by the content (magic bytes,
then what the decoders accept), never by a file name; a manifest ``kind`` column may only change
the order of attempts for content we cannot sniff. Every failure is a ``MediaError`` whose message
names the cause, so the runner can write it into the row's ``error`` column and move on.

Safe to call from many threads at once: no Pillow global is ever written.
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


class MediaError(Exception):
    """A media item could not be decoded; ``str(e)`` names the cause."""


class _NotThisKind(Exception):
    """This decoder does not recognise the content; try the other one."""


@dataclass
class Media:
    kind: str  # "image" | "video"
    image: Image.Image | None = None  # RGB (image rows)
    frames: np.ndarray | None = None  # uint8 [T, H, W, 3] (video rows)

    @property
    def n_frames(self) -> int | None:
        return None if self.frames is None else int(self.frames.shape[0])


def decode_media(
    fileobj: BinaryIO,
    *,
    video_frames: int = 8,
    max_image_pixels: int = 89_478_485,
    kind_hint: str | None = None,
) -> Media:
    """Decode a seekable binary file object holding exactly one image or video (from offset 0).

    Content wins over ``kind_hint``: a JPEG hinted "video" is still returned as an image.
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
                return Media("image", image=_decode_image(fileobj, max_image_pixels))
            return Media("video", frames=_decode_video(fileobj, video_frames, max_image_pixels, sniffed))
        except _NotThisKind:
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


# ----------------------------------------------------------------------------------- images


def _decode_image(fileobj: BinaryIO, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(fileobj, formats=_IMAGE_FORMATS)
    except UnidentifiedImageError as e:
        raise _NotThisKind from e
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


# ----------------------------------------------------------------------------------- videos


def _decode_video(fileobj: BinaryIO, n: int, max_pixels: int, sniffed: str | None) -> np.ndarray:
    try:
        container = av.open(fileobj, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        if sniffed != "video":
            raise _NotThisKind from e
        raise MediaError(f"corrupt or truncated video: {e}") from e
    with container:
        fmt = container.format.name
        if sniffed is None and ("_pipe" in fmt or fmt == "image2" or not container.streams.video):
            raise _NotThisKind  # FFmpeg's probe guessed an image or audio: not a video to us
        if not container.streams.video:
            if container.streams.audio:
                raise MediaError("audio-only file: no video stream")
            # e.g. an mp4 cut before its moov atom opens fine but lists no streams
            raise MediaError("corrupt or truncated video: no stream found")
        stream = container.streams.video[0]
        pixels = stream.codec_context.width * stream.codec_context.height
        if pixels > max_pixels:
            raise MediaError(f"video too large: {pixels} pixels per frame > limit {max_pixels}")
        try:
            frames = _sample(container, stream, n)
            if frames:  # converted while the container is open: frames hold decoder buffers
                return _stack(frames, max_pixels)
        except _NoTimestamps:
            frames = None
        except av.FFmpegError as e:
            raise MediaError(f"corrupt or truncated video: {e}") from e
    if frames is None:  # no usable timeline, or maybe fewer frames than asked
        try:
            return _sample_by_index(fileobj, n, max_pixels)
        except av.FFmpegError as e:
            raise MediaError(f"corrupt or truncated video: {e}") from e
    raise MediaError("corrupt or truncated video: no decodable frame")


class _NoTimestamps(Exception):
    pass


def _timeline(container, stream) -> tuple[float, float] | None:
    """(start, duration) in stream time_base units, or None when the file does not say."""
    tb = stream.time_base
    if stream.duration and tb:
        return float(stream.start_time or 0), float(stream.duration)
    if container.duration and tb:  # e.g. Matroska stores only the container duration
        start = container.start_time or 0
        return start / av.time_base / float(tb), container.duration / av.time_base / float(tb)
    return None


def _sample(container, stream, n: int) -> list[av.VideoFrame] | None:
    """Seek-based uniform sampling by time: frame i is the first with pts >= centre of segment i."""
    span = _timeline(container, stream)
    if span is None:
        raise _NoTimestamps
    start, duration = span
    targets = [start + (i + 0.5) * duration / n for i in range(n)]
    # Keyframe index from the header (mp4 moov, mkv cues). Formats without one (MPEG-TS) grow it
    # while reading, so it only ever shows keyframes behind us: ignore it there.
    index = stream.index_entries if len(stream.index_entries) else ()
    picked: list[av.VideoFrame] = []
    cur, frames, damaged = None, None, False
    for target in targets:
        if cur is not None and cur.pts >= target:  # sparse/VFR: this frame also covers target
            picked.append(cur)
            continue
        if frames is None or _keyframe_ahead(index, target, cur.pts):
            try:
                frames = _seek_to(container, stream, target, start)
            except av.FFmpegError:  # unseekable: decode forward instead, correct but slower
                frames = frames or container.decode(stream)
        try:
            for frame in frames:
                if frame.pts is None:
                    raise _NoTimestamps
                cur = frame
                if frame.pts >= target:
                    break
        except av.FFmpegError:
            if cur is None:
                raise
            frames, damaged = iter(()), True  # damaged tail (truncated file): keep what decoded
        if cur is None:
            break
        picked.append(cur)  # stream ended before target: target lies within the last frame
    if damaged:  # repeats of the last good frame would pass a broken video off as a full one
        return list({f.pts: f for f in picked}.values())
    return _dedupe_if_short(picked, stream)


def _seek_to(container, stream, target: float, start: float):
    """Seek backward to the keyframe at or before target; return the decoding from there.

    Formats without an index (MPEG-TS) can land on the keyframe after target, or past the last
    one (no frame at all): step back further until they don't.
    """
    ts, back = target, 1 / float(stream.time_base)  # one second in stream units, then doubling
    while True:
        container.seek(int(ts), stream=stream, backward=True, any_frame=False)
        frames = container.decode(stream)
        first = next(frames, None)
        if first is None and ts < start:
            return iter(())
        if first is not None and (first.pts is None or first.pts <= target or ts < start):
            return itertools.chain([first], frames)
        ts, back = ts - back, back * 2  # may go below start: TS misses its first keyframe at start


def _keyframe_ahead(index, target: float, cur_pts: int) -> bool:
    """Seek only when a keyframe lies between where we are and target, else decode on."""
    if not len(index):
        return True
    try:
        entry = index[index.search_timestamp(int(target), backward=True)]
    except (IndexError, ValueError, av.FFmpegError):
        return True
    return entry.timestamp > cur_pts


def _dedupe_if_short(picked: list[av.VideoFrame], stream) -> list[av.VideoFrame] | None:
    """Keep repeats from time sampling (VFR gaps) but return a short video's frames once each."""
    if len({f.pts for f in picked}) == len(picked) or stream.frames > len(picked):
        return picked  # enough frames exist: repeats are what sampling by time means (VFR gaps)
    return None  # maybe fewer frames than asked (or unknown count): count them, keep each once


def _sample_by_index(fileobj: BinaryIO, n: int, max_pixels: int) -> np.ndarray:
    """Two passes keep memory bounded: count packets, then decode keeping a uniform subset."""
    fileobj.seek(0)
    with av.open(fileobj, mode="r") as container:
        try:
            total = sum(1 for p in container.demux(video=0) if p.size)
        except av.FFmpegError:
            total = 0  # truncated: fall back to keeping the first n frames
    # With total <= n every index is wanted, so a short video comes back whole, each frame once.
    wanted = {int((i + 0.5) * total / n) for i in range(n)} if total else set(range(n))
    fileobj.seek(0)
    with av.open(fileobj, mode="r") as container:
        picked = []
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    picked.append(frame)
                if len(picked) == len(wanted):
                    break
        except av.FFmpegError:
            pass  # truncated: keep what decoded
        if not picked:
            raise MediaError("corrupt or truncated video: no decodable frame")
        return _stack(picked, max_pixels)


def _stack(frames: list[av.VideoFrame], max_pixels: int) -> np.ndarray:
    # Mid-stream resolution changes happen (streams spliced together): scale to the first size.
    w, h = frames[0].width, frames[0].height
    if w * h > max_pixels:
        raise MediaError(f"video too large: {w * h} pixels per frame > limit {max_pixels}")
    rgb = {id(f): f.to_ndarray(format="rgb24", width=w, height=h) for f in frames}  # repeats once
    return np.stack([rgb[id(f)] for f in frames])
