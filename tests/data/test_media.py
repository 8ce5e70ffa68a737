"""pipeline.data.media: real files written with Pillow and PyAV into tmp_path, never downloaded."""

from __future__ import annotations

import io
import math
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from pipeline.data.media import Media, MediaError, decode_media

# ------------------------------------------------------------------------------ helpers


def _decode_path(path, **kw) -> Media:
    with open(path, "rb") as f:
        return decode_media(f, **kw)


def _decode_bytes(data: bytes, **kw) -> Media:
    return decode_media(io.BytesIO(data), **kw)


def _n_frames(media: Media) -> int | None:
    return None if media.frames is None else int(media.frames.shape[0])


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _write_video(path, pts_ms, *, size=(64, 48), codec="libx264", fmt=None, options=None, gop=10, noise=0):
    """Frame k is grey level 8*k (+- noise, to make packets big), shown at pts_ms[k] milliseconds."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        st = out.add_stream(codec, rate=30)
        st.width, st.height, st.pix_fmt = size[0], size[1], "yuv420p"
        st.time_base = st.codec_context.time_base = Fraction(1, 1000)
        st.codec_context.gop_size = gop
        if codec == "mpeg4":  # its default 200 kb/s drifts flat greys by a level or so
            st.bit_rate = 4_000_000
        for k, t in enumerate(pts_ms):
            pixels = 8 * k + rng.integers(-noise, noise + 1, (size[1], size[0], 3))
            frame = av.VideoFrame.from_ndarray(np.clip(pixels, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            out.mux(st.encode(frame))
        out.mux(st.encode(None))
    return path


def _indices(media: Media) -> list[int]:
    return [round(float(f.mean()) / 8) for f in media.frames]


def _expected_by_time(path, pts_ms, n) -> list[int]:
    """First frame with pts >= centre of each of n equal segments of the stream's timeline."""
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        if st.duration:
            tb = float(st.time_base) * 1000
            start, dur = (st.start_time or 0) * tb, st.duration * tb
        else:  # Matroska: only the container knows its duration
            start, dur = (c.start_time or 0) / 1000, c.duration / 1000
    targets = [start + (i + 0.5) * dur / n for i in range(n)]
    return [next((k for k, t in enumerate(pts_ms) if t >= x), len(pts_ms) - 1) for x in targets]


@pytest.fixture(scope="module")
def cfr_mp4(tmp_path_factory):
    return _write_video(tmp_path_factory.mktemp("v") / "cfr.mp4", [round(k * 1000 / 30) for k in range(30)])


# ------------------------------------------------------------------------------ images


def test_jpeg_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _save(Image.new("RGB", (40, 20), (200, 30, 30)), "JPEG", exif=exif.tobytes())
    m = _decode_bytes(data)
    assert m.kind == "image" and m.image.mode == "RGB" and m.image.size == (20, 40)
    assert _n_frames(m) is None and m.frames is None


def test_rgba_png_is_composited_on_white():
    im = Image.new("RGBA", (4, 1), (255, 0, 0, 255))
    im.putpixel((1, 0), (0, 0, 0, 0))
    im.putpixel((2, 0), (255, 0, 0, 128))
    out = _decode_bytes(_save(im, "PNG")).image
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((2, 0))
    assert r == 255 and 120 <= g <= 135 and g == b


@pytest.mark.parametrize("mode", ["P", "L", "1", "LA", "CMYK"])
def test_every_mode_becomes_rgb(mode):
    src = Image.new("RGB", (8, 8), (0, 0, 0) if mode == "1" else (255, 0, 0)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = _decode_bytes(_save(src, fmt)).image
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode == "CMYK":  # Adobe-inverted CMYK JPEG read back as red, not its complement
        r, g, b = out.getpixel((4, 4))
        assert r > 200 and g < 60 and b < 60


def test_p_mode_with_transparency_goes_white():
    im = Image.new("P", (2, 1), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 1
    out = _decode_bytes(_save(im, "PNG", transparency=1)).image
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


def test_16bit_grey_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    out = _decode_bytes(_save(Image.fromarray(arr), "PNG")).image
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_animated_gif_and_multipage_tiff_give_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    for fmt in ("GIF", "TIFF", "WEBP", "PNG"):  # PNG with save_all = APNG
        m = _decode_bytes(_save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100))
        assert m.kind == "image", fmt
        r, g, b = m.image.getpixel((4, 4))
        assert r > 200 and g < 60 and b < 60, fmt


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    data = _save(Image.new("L", (2000, 2000)), "PNG")
    with pytest.raises(MediaError, match=r"image too large: 4000000 pixels > limit 1000000"):
        _decode_bytes(data, max_image_pixels=1_000_000)
    assert _decode_bytes(data, max_image_pixels=4_000_000).image.size == (2000, 2000)


def test_header_beyond_pillow_global_limit_is_refused():
    # A PNG that only claims 30000x30000 in its header (Pillow's own hard limit is hit at open).
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"")

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    with pytest.raises(MediaError, match=r"image too large: 900000000 pixels"):
        _decode_bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(fmt):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _save(Image.fromarray(noise), fmt)
    with pytest.raises(MediaError, match="truncated image: image file is truncated"):
        _decode_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("data", "msg"),
    [
        (b"", "empty file"),
        (np.random.default_rng(1).bytes(4096), r"not an image or video \(unrecognised content\)"),
        (b"this is not a picture\n" * 50, r"not an image or video"),
    ],
)
def test_not_media(tmp_path, data, msg):
    path = tmp_path / "x.jpg"  # the extension lies; content decides
    path.write_bytes(data)
    with pytest.raises(MediaError, match=msg):
        _decode_path(path)


def test_content_wins_over_kind_hint():
    data = _save(Image.new("RGB", (8, 8)), "JPEG")
    assert _decode_bytes(data, kind_hint="video").kind == "image"


# ------------------------------------------------------------------------------ videos


def test_video_frames_sampled_uniformly_by_time(cfr_mp4):
    m = _decode_path(cfr_mp4, video_frames=8)
    assert m.kind == "video" and m.image is None and m.frames.dtype == np.uint8
    assert m.frames.shape == (8, 48, 64, 3) and _n_frames(m) == 8
    pts = [round(k * 1000 / 30) for k in range(30)]
    assert _indices(m) == _expected_by_time(cfr_mp4, pts, 8)
    assert _indices(m) == [2, 6, 10, 14, 17, 21, 25, 29]  # centres of 8 segments of 1 s at 30 fps
    assert _indices(_decode_path(cfr_mp4, video_frames=1)) == _expected_by_time(cfr_mp4, pts, 1)


@pytest.mark.parametrize(("name", "fmt", "codec"), [("a.ts", "mpegts", "libx264"), ("a.avi", "avi", "mpeg4")])
def test_other_containers(tmp_path, name, fmt, codec):
    # MPEG-TS: starts at 0.067 s, no index, seeks land on the keyframe *after* the target.
    path = _write_video(tmp_path / name, [round(k * 1000 / 30) for k in range(30)], fmt=fmt, codec=codec)
    assert _indices(_decode_path(path, video_frames=8)) == [2, 6, 10, 14, 17, 21, 25, 29]


def test_vfr_video_sampled_by_time_not_index(tmp_path):
    pts = [k * 10 for k in range(20)] + [300 + k * 100 for k in range(10)]  # dense, then sparse
    path = _write_video(tmp_path / "vfr.mkv", pts)
    got = _indices(_decode_path(path, video_frames=6))
    assert got == _expected_by_time(path, pts, 6)
    assert got != [math.floor((i + 0.5) * 30 / 6) for i in range(6)]  # not uniform in index
    assert got[-3:] == sorted(got[-3:]) and min(got[1:]) >= 20  # most time is in sparse frames


def test_short_video_returns_each_frame_once(tmp_path):
    for name in ("three.mp4", "three.mkv"):  # mp4 knows its frame count, Matroska does not
        path = _write_video(tmp_path / name, [0, 33, 67])
        m = _decode_path(path, video_frames=8)
        assert _n_frames(m) == 3 and _indices(m) == [0, 1, 2], name


def test_video_named_jpg_is_decided_by_content(tmp_path, cfr_mp4):
    path = tmp_path / "clip.jpg"
    path.write_bytes(cfr_mp4.read_bytes())
    assert _n_frames(_decode_path(path, video_frames=4, kind_hint="image")) == 4


def test_truncated_video(tmp_path, cfr_mp4):
    # moov at the end (PyAV's default): the index is gone, nothing can be decoded.
    data = cfr_mp4.read_bytes()
    with pytest.raises(MediaError, match="truncated video"):
        _decode_bytes(data[: len(data) // 2])
    # moov first (faststart): the start still decodes; we keep what is decodable, each frame once.
    pts = [round(k * 1000 / 30) for k in range(30)]
    path = _write_video(tmp_path / "f.mp4", pts, size=(128, 96), noise=40, options={"movflags": "faststart"})
    data = path.read_bytes()
    m = _decode_bytes(data[: len(data) // 2], video_frames=8)
    assert 1 <= _n_frames(m) < 8 and m.frames.shape[1:] == (96, 128, 3)
    assert len({f.tobytes() for f in m.frames}) == _n_frames(m)


@pytest.mark.parametrize(("name", "codec"), [("a.wav", "pcm_s16le"), ("a.m4a", "aac")])
def test_audio_only(tmp_path, name, codec):
    path = tmp_path / name
    with av.open(str(path), "w") as out:
        st = out.add_stream(codec, rate=16000, layout="mono")
        fmt = "s16" if codec == "pcm_s16le" else "fltp"
        samples = np.zeros((1, 1024), np.int16 if fmt == "s16" else np.float32)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format=fmt, layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(st.encode(frame))
        out.mux(st.encode(None))
    with pytest.raises(MediaError, match="audio-only file: no video stream"):
        _decode_path(path)


def test_video_pixel_limit(cfr_mp4):
    with pytest.raises(MediaError, match="video too large: 3072 pixels"):
        _decode_path(cfr_mp4, max_image_pixels=1000)


# ------------------------------------------------------------------------------ sources, threads


def test_pyarrow_native_file(tmp_path, cfr_mp4):
    fs = pytest.importorskip("pyarrow.fs").LocalFileSystem()
    img = tmp_path / "img.bin"
    img.write_bytes(_save(Image.new("RGB", (10, 6), (0, 255, 0)), "PNG"))
    with fs.open_input_file(str(img)) as f:
        assert decode_media(f).image.size == (10, 6)
    with fs.open_input_file(str(cfr_mp4)) as f:
        assert _indices(decode_media(f, video_frames=8)) == [2, 6, 10, 14, 17, 21, 25, 29]
        assert not f.closed  # the caller owns the file object


def test_thread_pool(cfr_mp4):
    jpeg = _save(Image.new("RGB", (32, 32), (1, 2, 3)), "JPEG")
    video = cfr_mp4.read_bytes()
    jobs = [jpeg, video, b"", jpeg, video, b"junk" * 9] * 2

    def run(data):
        try:
            return _decode_bytes(data, video_frames=4).kind
        except MediaError:
            return "error"

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, jobs)) == ["image", "video", "error", "image", "video", "error"] * 2
