"""One bad row never stops a job: every broken input gets status=error with a named cause."""

from __future__ import annotations

import io
import os

import av
import numpy as np
import pyarrow.dataset as ds
from PIL import Image

from pipeline.cli import main
from pipeline.testing.demo import write_image, write_video
from pipeline.testing.jobs import job_sections, write_job, write_manifest


def write_audio_only(path):
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_bomb(path):
    Image.new("L", (6000, 6000)).save(path)  # 36 MP: over the job's 10 MP limit, tiny on disk
    return path


def test_bad_rows_are_errors_and_the_job_goes_on(tiny_model, tmp_path, capsys):
    root = tmp_path / "media"
    good = [write_image(root / f"ok{i}.png", seed=i) for i in range(3)]
    video = write_video(root / "ok.mp4", n_frames=8)
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + os.urandom(64))
    truncated = root / "truncated.mp4"
    truncated.write_bytes(write_video(tmp_path / "full.mp4", n_frames=8).read_bytes()[:300])
    write_audio_only(root / "sound.wav")
    write_bomb(root / "bomb.png")
    text = root / "notes.jpg"
    text.write_text("just some text, not an image")
    outside = write_image(tmp_path / "outside.png", seed=9)
    (root / "link.png").symlink_to(outside)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buf, "PNG")
    cut_png = root / "cut.png"
    cut_png.write_bytes(buf.getvalue()[:60])

    cases = {
        "ok0.png": None, "ok1.png": None, "missing.png": "missing file", "corrupt.jpg": "",
        "ok.mp4": None, "truncated.mp4": "video", "sound.wav": "audio-only", "bomb.png": "too large",
        "../outside.png": "escapes media_root", "link.png": "escapes media_root", "notes.jpg": "not an image",
        "cut.png": "truncated", "ok2.png": None, str(outside): "escapes media_root",
    }
    manifest = write_manifest(tmp_path / "m.parquet", {"path": list(cases)})
    job = write_job(tmp_path / "job.toml", job_sections(
        tiny_model("llava_next_video"), manifest, tmp_path / "out",
        input={"media_root": str(root), "max_image_pixels": 10_000_000}))
    assert main(["run", str(job)]) == 0
    rows = {r["path"]: r for r in ds.dataset(tmp_path / "out" / "captions").to_table().to_pylist()}
    assert len(rows) == len(cases)
    for path, cause in cases.items():
        row = rows[path]
        if cause is None:
            assert row["status"] == "ok" and row["caption"], row
        else:
            assert row["status"] == "error" and row["caption"] is None, row
            assert cause.lower() in row["error"].lower(), (path, row["error"])
    assert "4 ok, 10 errors" in capsys.readouterr().out
    assert good and video


def test_video_rows_on_an_image_only_model_are_row_errors(tiny_model, tmp_path):
    video = write_video(tmp_path / "v.mp4")
    image = write_image(tmp_path / "i.png", seed=1)
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(video), str(image)]})
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava"), manifest, tmp_path / "out"))
    assert main(["run", str(job)]) == 0
    rows = sorted(ds.dataset(tmp_path / "out" / "captions").to_table().to_pylist(), key=lambda r: r["row_index"])
    assert rows[0]["status"] == "error" and "video" in rows[0]["error"]
    assert rows[1]["status"] == "ok"


def test_max_error_rate_exceeded_exits_1(tiny_model, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", {"path": ["nope1.png", "nope2.png", str(write_image(tmp_path / "a.png", 1))]})
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava"), manifest, tmp_path / "out"))
    assert main(["run", str(job), "--set", "run.max_error_rate=0.5"]) == 1
