"""WebDataset tar shards as input (input.format = "webdataset"), tars written here: images with
their .txt/.json, a video, a sample with no media member, a member cut short by a truncated tar.
The captions must be the ones a Parquet manifest of the same media bytes gets."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.dataset as ds

from pipeline.cli import main
from pipeline.data.webdataset import open_webdataset, split_name
from pipeline.testing.demo import synthetic_image, write_video
from pipeline.testing.jobs import job_sections, write_job, write_manifest


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    synthetic_image(seed, (50 + 4 * seed, 40)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def shards(root: Path) -> tuple[list[Path], dict[str, bytes]]:
    video = write_video(root / "v.mp4", n_frames=8).read_bytes()
    media = {f"s{i:02d}": png(i) for i in range(5)} | {"clip": video}
    first = []
    for key in ("s00", "s01", "s02"):
        first += [(f"{key}.png", media[key]), (f"{key}.txt", f"text of {key}".encode()),
                  (f"{key}.json", json.dumps({"id": key}).encode())]
    first += [("clip.mp4", video), ("clip.txt", b"a video"), ("orphan.txt", b"no media here")]
    second = [("s03.jpg", media["s03"]), ("s03.txt", b"three"), ("s04.png", media["s04"])]
    cut = write_tar(root / "b.tar", second)
    with tarfile.open(cut) as tar:
        s04 = tar.getmember("s04.png")
    cut.write_bytes(cut.read_bytes()[:s04.offset_data + s04.size // 2])  # s04's data cut in half
    return [write_tar(root / "a.tar", first), cut], media


def test_tar_shards_caption_like_a_parquet_manifest_of_the_same_bytes(tiny_model, tmp_path):
    tars, media = shards(tmp_path)
    model = tiny_model("llava_next_video")
    job = write_job(tmp_path / "wds.toml", job_sections(model, tmp_path, tmp_path / "wds", input={"format": "webdataset"}))
    assert main(["run", str(job)]) == 0
    rows = {r["__key__"]: r for r in ds.dataset(tmp_path / "wds" / "captions").to_table().to_pylist()}
    assert sorted(rows) == ["clip", "orphan", "s00", "s01", "s02", "s03", "s04"]
    assert rows["orphan"]["status"] == "error" and rows["orphan"]["error"].startswith("missing media")
    assert rows["s04"]["status"] == "error" and rows["s04"]["error"].startswith("truncated tar member")
    assert (rows["s01"]["txt"], json.loads(rows["s01"]["json"])) == ("text of s01", {"id": "s01"})
    assert rows["clip"]["frames"] and rows["s03"]["txt"] == "three"
    assert "media" not in rows["s00"] and "__error__" not in rows["s00"]
    # the same bytes through a Parquet manifest's bytes column
    keys = ["s00", "s01", "s02", "clip", "s03"]
    manifest = write_manifest(tmp_path / "p" / "m.parquet", {"key": keys, "image": [media[k] for k in keys]})
    pjob = write_job(tmp_path / "p.toml", job_sections(model, manifest, tmp_path / "pq",
                                                       input={"bytes_column": "image", "path_column": None}))
    assert main(["run", str(pjob)]) == 0
    expected = {r["key"]: r for r in ds.dataset(tmp_path / "pq" / "captions").to_table().to_pylist()}
    for key in keys:
        assert rows[key]["status"] == "ok"
        assert (rows[key]["caption"], rows[key]["frames"]) == (expected[key]["caption"], expected[key]["frames"])


def test_tar_samples_take_several_prompts(tiny_model, tmp_path):
    """generation.prompts works on tars as on Parquet: a row per (sample, prompt), row errors per prompt."""
    shards(tmp_path)
    prompts = {"a": "caption", "b": "What is in the picture?"}
    job = write_job(tmp_path / "wds.toml", job_sections(tiny_model("llava_next_video"), tmp_path, tmp_path / "wds",
                                                        input={"format": "webdataset"}, generation={"prompts": prompts}))
    assert main(["run", str(job)]) == 0
    rows = ds.dataset(tmp_path / "wds" / "captions").to_table().to_pylist()
    assert sorted((r["__key__"], r["prompt_name"]) for r in rows) == [
        (k, p) for k in ["clip", "orphan", "s00", "s01", "s02", "s03", "s04"] for p in "ab"]
    assert {r["status"] for r in rows if r["__key__"] in ("orphan", "s04")} == {"error"}


def test_tars_behind_an_fsspec_uri_caption_as_local_ones(tiny_model, tmp_path):
    """A filesystem pyarrow has no driver for (fsspec's in-memory one, standing in for any remote
    fsspec scheme): the tars are listed, scanned and read at offsets through it."""
    import fsspec

    tars, _ = shards(tmp_path)
    memory = fsspec.filesystem("memory")
    for tar in tars:
        memory.pipe(f"/wds-{id(tmp_path)}/{tar.name}", tar.read_bytes())
    model = tiny_model("llava_next_video")
    local = write_job(tmp_path / "local.toml", job_sections(model, tmp_path, tmp_path / "local",
                                                            input={"format": "webdataset"}))
    remote = write_job(tmp_path / "remote.toml", job_sections(model, f"memory://wds-{id(tmp_path)}", tmp_path / "remote",
                                                              input={"format": "webdataset"}))
    try:
        assert main(["run", str(local)]) == 0 and main(["run", str(remote)]) == 0
    finally:
        memory.rm(f"/wds-{id(tmp_path)}", recursive=True)

    def rows(out):  # the tar's path in __url__ and in error texts differs
        table = ds.dataset(out / "captions").to_table().drop_columns(["__url__"]).to_pylist()
        for row in table:
            row["error"] = row["error"] and row["error"].split(":")[0]
        return sorted(table, key=lambda r: r["row_index"])

    got, expected = rows(tmp_path / "remote"), rows(tmp_path / "local")
    assert len(got) == 7 and got == expected
    assert sum(r["status"] == "ok" for r in got) == 5


def test_the_scan_of_the_tars_is_kept_and_reused_while_they_are_unchanged(tmp_path):
    import os

    import pyarrow.fs as pafs

    from pipeline.data.webdataset import load_index, save_index

    tars, _ = shards(tmp_path)
    paths, fs, index = [str(t) for t in tars], pafs.LocalFileSystem(), tmp_path / "out" / "_index" / "w.parquet"
    first = open_webdataset(fs, paths, index)
    assert first.scanned == len(tars)
    save_index(first, index)
    again = open_webdataset(fs, paths, index)
    assert again.scanned == 0 and again.files == first.files and again.fingerprint() == first.fingerprint()
    assert [t.note for t in again.files] == [t.note for t in first.files] and any(t.note for t in again.files)
    stat = os.stat(tars[0])
    os.utime(tars[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place, say
    assert open_webdataset(fs, paths, index).scanned == 1
    index.write_bytes(b"garbage")  # a cache: unreadable means scan again
    assert load_index(index) == {} and open_webdataset(fs, paths, index).scanned == len(tars)


def test_workers_of_a_tar_job_caption_from_the_index_as_one_worker_does(tiny_model, tmp_path):
    shards(tmp_path)
    model = tiny_model("llava_next_video")
    rows = {}
    for name, devices in (("one", ["cpu"]), ("two", ["cpu", "cpu"])):
        job = write_job(tmp_path / f"{name}.toml", job_sections(
            model, tmp_path, tmp_path / name, input={"format": "webdataset"}, run={"devices": devices},
            output={"rows_per_shard": 3, "chunk_rows": 2}))
        assert main(["run", str(job)]) == 0
        assert (tmp_path / name / "_index" / "webdataset.parquet").is_file()
        table = ds.dataset(tmp_path / name / "captions").to_table(columns=["row_index", "__key__", "caption", "status"])
        rows[name] = sorted(table.to_pylist(), key=lambda r: r["row_index"])
    assert rows["two"] == rows["one"] and len(rows["one"]) == 7


def test_the_plan_follows_tar_order_and_a_cut_header_ends_a_tar(tmp_path):
    import pyarrow.fs as pafs

    full = write_tar(tmp_path / "t.tar", [(f"k{i}.png", png(i)) for i in range(4)]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[:512 * 3 + len(png(0)) + 100])  # inside k1's header area
    wds = open_webdataset(pafs.LocalFileSystem(), [str(tmp_path / "t.tar"), str(tmp_path / "cut.tar")])
    keys = [r for _, batch in wds.iter_rows(0, wds.num_rows) for r in batch.column("__key__").to_pylist()]
    assert keys[:4] == ["k0", "k1", "k2", "k3"] and wds.files[1].num_rows >= 1
    assert wds.files[0].note is None
    assert split_name("dir/abc.seg.JPG") == ("dir/abc", "seg.jpg")


def test_prompt_column_is_refused_for_tars(tiny_model, tmp_path, capsys):
    tars, _ = shards(tmp_path)
    job = write_job(tmp_path / "j.toml", job_sections(tiny_model("llava"), tmp_path, tmp_path / "o",
                                                      input={"format": "webdataset", "prompt_column": "txt"}))
    assert main(["run", str(job)]) == 2
    assert "do not apply" in capsys.readouterr().err
