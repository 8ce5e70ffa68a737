"""Reading: manifests as files, dirs and globs; media from paths, URIs and bytes columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.cli import main
from pipeline.config import InputConfig
from pipeline.data.manifest import open_manifest
from pipeline.data.sources import MediaSource, SourceError
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest


def read_out(out):
    return sorted(ds.dataset(out / "captions").to_table().to_pylist(), key=lambda r: r["row_index"])


def test_plan_and_stream_across_files_and_row_groups(tmp_path):
    for k in range(3):
        write_manifest(tmp_path / "m" / f"part-{k}.parquet", {"n": list(range(k * 7, k * 7 + 7))}, row_group_size=3)
    manifest = open_manifest(InputConfig(manifest=[str(tmp_path / "m")], path_column=None))
    assert manifest.num_rows == 21
    shards = manifest.plan(5)
    assert [(s.start, s.stop) for s in shards] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 21)]
    for shard in shards:
        for chunk in shard.chunks(2):
            got = [v for _, b in manifest.iter_rows(chunk.start, chunk.stop) for v in b.column("n").to_pylist()]
            assert got == list(range(chunk.start, chunk.stop))
    globbed = open_manifest(InputConfig(manifest=[str(tmp_path / "m" / "part-*.parquet")], path_column=None))
    assert globbed.num_rows == 21 and globbed.fingerprint() == manifest.fingerprint()


def test_media_root_refuses_escapes_before_opening(tmp_path):
    root = tmp_path / "root"
    inside = write_image(root / "sub" / "a.png", seed=1)
    outside = write_image(tmp_path / "b.png", seed=2)
    (root / "link.png").symlink_to(outside)
    source = MediaSource(InputConfig(manifest=["x"], media_root=str(root)))
    assert source.open({"path": "sub/a.png"}).read(4) == inside.read_bytes()[:4]
    assert source.open({"path": str(inside)}).read(4) == inside.read_bytes()[:4]
    for bad in ["../b.png", "sub/../../b.png", str(outside), "link.png", f"file://{outside}"]:
        with pytest.raises(SourceError, match="escapes media_root"):
            source.open({"path": bad})
    with pytest.raises(SourceError, match="missing file"):
        source.open({"path": "sub/nope.png"})


def test_bytes_column_binary_and_hf_struct(tiny_model, tmp_path):
    images = [write_image(tmp_path / f"{i}.png", seed=40 + i).read_bytes() for i in range(3)]
    struct = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    manifest = write_manifest(tmp_path / "m.parquet", {"uid": ["a", "b", "c"], "raw": images, "image": struct})
    model = tiny_model("llava")
    results = {}
    for col in ("raw", "image"):
        job = write_job(tmp_path / f"{col}.toml", job_sections(
            model, manifest, tmp_path / col, input={"bytes_column": col, "id_column": "uid"}))
        assert main(["run", str(job)]) == 0
        rows = read_out(tmp_path / col)
        assert [r["status"] for r in rows] == ["ok"] * 3
        assert col not in rows[0], "the media bytes are not copied into the captions"
        results[col] = [r["caption"] for r in rows]
    assert results["raw"] == results["image"]


def test_prompt_kind_columns_uri_paths_and_passthrough(tiny_model, tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", seed=50 + i) for i in range(3)]
    manifest = write_manifest(tmp_path / "m.parquet", {
        "path": [f"file://{paths[0]}", str(paths[1]), str(paths[2])],
        "prompt": ["Describe it.", None, "What colour is it?"],
        "kind": ["image", "image", "video"],  # a wrong hint: the content decides
        "score": [0.5, 0.7, 0.9],
    })
    job = write_job(tmp_path / "job.toml", job_sections(
        tiny_model("llava"), manifest, tmp_path / "out",
        input={"prompt_column": "prompt", "kind_column": "kind"}, generation={"prompt": "Default prompt."}))
    assert main(["run", str(job)]) == 0
    rows = read_out(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert [r["score"] for r in rows] == [0.5, 0.7, 0.9]
    assert rows[0]["input_prompt"] == "Describe it." and "Describe it." in rows[0]["prompt"]
    assert "Default prompt." in rows[1]["prompt"] and "What colour" in rows[2]["prompt"]


def test_a_manifest_and_media_behind_an_fsspec_uri(tiny_model, tmp_path):
    """A scheme pyarrow has no filesystem for goes through fsspec's (its in-memory one here): the
    manifest is listed and read there, and so are the media its paths name."""
    import io

    import fsspec
    import pyarrow.parquet as pq

    memory, root = fsspec.filesystem("memory"), f"/inputs-{id(tmp_path)}"
    paths = [write_image(tmp_path / f"{i}.png", seed=60 + i) for i in range(3)]
    for p in paths:
        memory.pipe(f"{root}/media/{p.name}", p.read_bytes())
    uris = [f"memory://{root}/media/{p.name}" for p in paths] + [f"memory://{root}/media/missing.png"]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"path": uris}), buffer)
    memory.pipe(f"{root}/manifest/part-0.parquet", buffer.getvalue())
    local = write_manifest(tmp_path / "m.parquet", {"path": [str(p) for p in paths]})
    try:
        job = write_job(tmp_path / "remote.toml", job_sections(tiny_model("llava"), f"memory://{root}/manifest",
                                                               tmp_path / "remote"))
        assert main(["run", str(job)]) == 0
    finally:
        memory.rm(root, recursive=True)
    assert main(["run", str(write_job(tmp_path / "local.toml", job_sections(tiny_model("llava"), local,
                                                                            tmp_path / "local")))]) == 0
    got, expected = read_out(tmp_path / "remote"), read_out(tmp_path / "local")
    assert [r["caption"] for r in got[:3]] == [r["caption"] for r in expected]
    assert got[3]["status"] == "error" and got[3]["error"].startswith("missing file")


def test_processor_without_chat_template_uses_the_family_format(tiny_model, tmp_path):
    image = write_image(tmp_path / "a.png", seed=3)
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(image)]})
    job = write_job(tmp_path / "job.toml", job_sections(
        tiny_model("llava", chat_template=False), manifest, tmp_path / "out", generation={"prompt": "Hi"}))
    assert main(["run", str(job)]) == 0
    assert read_out(tmp_path / "out")[0]["prompt"] == "USER: <image>\nHi ASSISTANT:"


def test_start_sweeps_stale_temp_files_only(tmp_path):
    import os
    import time

    from pipeline.data.output import OutputDir

    out = OutputDir(tmp_path / "out")
    out.tmp.mkdir(parents=True)
    stale, fresh = out.tmp / "shard-00000-chunk-00000.parquet.dead", out.tmp / "shard-00000-chunk-00001.parquet.live"
    stale.write_bytes(b"left by a kill -9")
    fresh.write_bytes(b"another run is writing this")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    out.start({"version": 1}, "resume")
    assert not stale.exists() and fresh.exists()
