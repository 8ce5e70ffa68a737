"""Videos through PyAV: n frames sampled uniformly by time, or at `fps` frames a second (at most n,
spread over the whole video when it is longer), by index where the file has no usable timeline;
as uint8 RGB [T, H, W, 3] at the first frame's size, with each frame's time in seconds. Times come
from the frames' timestamps, never from their indices, so variable-frame-rate files are sampled by
time too."""

from __future__ import annotations

import itertools
import math
from typing import BinaryIO

import numpy as np

from pipeline.data.media_errors import MediaError, NotThisKind

try:
    import av
except ImportError:  # PyAV is a wheel of its own that some hosts lack: there images still caption
    av = None


def decode_video(fileobj: BinaryIO, n: int, max_pixels: int, sniffed: str | None, fps: float | None = None
                 ) -> tuple[np.ndarray, list[float | None]]:
    """Up to `n` frames of the file's first video stream and their times; `sniffed` is what its magic
    bytes said ("video" or None): unsniffed content that FFmpeg does not take for a video is NotThisKind."""
    if av is None:
        if sniffed != "video":
            raise NotThisKind
        raise MediaError("video decoding needs PyAV, which is not installed (pip install av)")
    try:
        container = av.open(fileobj, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        if sniffed != "video":
            raise NotThisKind from e
        raise MediaError(f"corrupt or truncated video: {e}") from e
    with container:
        fmt = container.format.name
        if sniffed is None and ("_pipe" in fmt or fmt == "image2" or not container.streams.video):
            raise NotThisKind  # FFmpeg's probe guessed an image or audio: not a video to us
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
            frames = _sample(container, stream, n, fps)
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


def _targets(start: float, duration: float, n: int, fps: float | None, time_base: float) -> list[float]:
    """Target times in stream units: the centres of n equal segments, or one every 1/fps seconds
    from the start; when there are more than n of those, n of them from the first to the last."""
    if not fps:
        return [start + (i + 0.5) * duration / n for i in range(n)]
    step = 1 / fps / time_base
    count = max(1, math.ceil(duration / step - 1e-9))
    if count <= n:
        picks = range(count)
    else:
        picks = sorted({round(i * (count - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]
    return [start + k * step for k in picks]


def _sample(container, stream, n: int, fps: float | None = None) -> list[av.VideoFrame] | None:
    """Seek-based sampling by time: for each target, the first frame with pts >= it."""
    span = _timeline(container, stream)
    if span is None:
        raise _NoTimestamps
    start, duration = span
    targets = _targets(start, duration, n, fps, float(stream.time_base))
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


def _sample_by_index(fileobj: BinaryIO, n: int, max_pixels: int) -> tuple[np.ndarray, list[float | None]]:
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


def _stack(frames: list[av.VideoFrame], max_pixels: int) -> tuple[np.ndarray, list[float | None]]:
    # Mid-stream resolution changes happen (streams spliced together): scale to the first size.
    w, h = frames[0].width, frames[0].height
    if w * h > max_pixels:
        raise MediaError(f"video too large: {w * h} pixels per frame > limit {max_pixels}")
    rgb = {id(f): f.to_ndarray(format="rgb24", width=w, height=h) for f in frames}  # repeats once
    times = [None if f.time is None else round(float(f.time), 6) for f in frames]
    return np.stack([rgb[id(f)] for f in frames]), times
