"""Video sampling by time (generation.video_fps) on a variable-frame-rate file written with PyAV:
the frames chosen are, for each asked time, the first frame shown at or after it."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pyarrow.dataset as ds
import pytest

from pipeline.cli import main
from pipeline.data.media import decode_media
from pipeline.testing.jobs import job_sections, write_job, write_manifest

PTS_MS = [0, 100, 150, 900, 1000, 1100, 2500, 2600, 3900]  # bursts and gaps: no fixed rate


def vfr_video() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate(PTS_MS):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def shown_at(t: float) -> float:
    """The frame on screen from time t on: the first one whose time is >= t."""
    return next(p / 1000 for p in PTS_MS if p / 1000 >= t - 1e-9)


@pytest.mark.parametrize("fps,frames,asked", [
    (1.0, 8, [0, 1, 2, 3]),  # a 4 s video: one frame a second
    (2.0, 8, [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]),
    (2.0, 3, [0, 2, 3.5]),  # capped at 3 frames: first, middle and last of the 8 times asked
])
def test_frames_are_the_ones_shown_at_the_times_asked(fps, frames, asked):
    media = decode_media(io.BytesIO(vfr_video()), video_frames=frames, video_fps=fps)
    assert media.frame_times == [shown_at(t) for t in asked]
    assert media.frames.shape[0] == len(asked)
    # each frame is the picture shown then (frame i was filled with 20 * i)
    for picture, t in zip(media.frames, media.frame_times, strict=True):
        assert abs(int(picture.mean()) - 20 * PTS_MS.index(round(t * 1000))) <= 3


def test_frame_times_reach_the_output(tiny_model, tmp_path):
    video = tmp_path / "vfr.mp4"
    video.write_bytes(vfr_video())
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(video)]})
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava_next_video"), manifest, tmp_path / "out",
                                                        generation={"video_fps": 1.0, "video_frames": 8}))
    assert main(["run", str(job)]) == 0
    row = ds.dataset(tmp_path / "out" / "captions").to_table().to_pylist()[0]
    assert row["status"] == "ok", row
    assert (row["frames"], row["frame_times"]) == (4, [0.0, 1.0, 2.5, 3.9])
