"""`llava-batch quantize` then `llava-batch run` on the W8A16 dir, from both backends."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from pipeline.cli import main
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest


def captions(out):
    rows = sorted(ds.dataset(out / "captions").to_table().to_pylist(), key=lambda r: r["row_index"])
    return [r["caption"] for r in rows], {r["model"] for r in rows}, [r["status"] for r in rows]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("qrun")
    paths = [str(write_image(root / f"{i}.png", seed=70 + i, size=(60 + 10 * i, 80))) for i in range(5)]
    return write_manifest(root / "m.parquet", {"path": paths})


def test_run_captions_from_a_builtin_w8a16_dir(tiny_model, manifest, tmp_path, capsys):
    src = tiny_model("llava")
    dst = tmp_path / "w8a16"
    assert main(["quantize", str(src), str(dst), "--backend", "builtin"]) == 0
    job = write_job(tmp_path / "job.toml", job_sections(dst, manifest, tmp_path / "out"))
    assert main(["run", str(job)]) == 0
    caps, models, status = captions(tmp_path / "out")
    assert status == ["ok"] * 5 and all(caps)
    assert models == {"w8a16 (W8A16 per-channel (builtin))"}
    capsys.readouterr()
    assert main(["quantize", str(dst), str(tmp_path / "again")]) == 2  # already quantized
    assert main(["quantize", str(src), str(dst)]) == 2  # DST not empty
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("llava-batch: error: ") for line in err)


def test_run_captions_identical_from_builtin_and_msmodelslim(tiny_model, manifest, tmp_path):
    pytest.importorskip("msmodelslim")
    src = tiny_model("llava")
    results = {}
    for backend in ("builtin", "msmodelslim"):
        dst = tmp_path / backend
        assert main(["quantize", str(src), str(dst), "--backend", backend]) == 0
        job = write_job(tmp_path / f"{backend}.toml", job_sections(dst, manifest, tmp_path / f"out-{backend}"))
        assert main(["run", str(job)]) == 0
        results[backend] = captions(tmp_path / f"out-{backend}")[0]
    assert results["builtin"] == results["msmodelslim"] and len(set(results["builtin"])) > 1
