"""`llava-batch bench`: the MindIE-style table and the caption-workload report, on the tiny model."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.bench import captions, perf
from pipeline.cli import main
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import write_manifest

PEAKS = {"bf16_matmul_gflop_per_s": 100.0, "copy_gb_per_s": 20.0}


@pytest.fixture(autouse=True)
def quick_peaks(monkeypatch):
    monkeypatch.setattr(perf, "machine_peaks", lambda: PEAKS)
    monkeypatch.setattr(captions, "machine_peaks", lambda: PEAKS)


def test_perf_table_with_hf_comparison(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", str(tiny_model("llava")), "--batch-sizes", "1,3", "--output-length", "6",
                 "--compare", "hf", "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert [int(r["batch_size"]) for r in rows] == [1, 3]
    assert set(perf.COLUMNS) | {"hf_tokens_per_s", "speedup"} <= set(rows[0])
    assert all(int(r["output_tokens"]) == 6 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert float(rows[1]["e2e_s"]) > 0 and float(rows[0]["first_token_ms"]) > 0
    report = json.loads((out / "benchmark.json").read_text())
    assert report["batch1_roofline"]["floor_ms"] > 0
    pytest.importorskip("matplotlib")
    assert (out / "benchmark.png").stat().st_size > 1000


def test_captions_workload_times_run_and_the_hf_loop(tiny_model, tmp_path):
    paths = [write_image(tmp_path / "m" / f"{i}.png", seed=i, size=(60 + 8 * i, 70)) for i in range(6)]
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(p) for p in paths]})
    out = tmp_path / "bench"
    code = main(["bench", "--workload", "captions", "--model", str(tiny_model("llava")), "--manifest", str(manifest),
                 "--max-batch-size", "4", "--max-output-length", "12", "--compare", "hf", "--hf-batch-sizes", "2,6",
                 "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "captions_bench.json").read_text())
    fast, hf = report["fast"], report["hf"]
    assert fast["ok"] == 6 and fast["output_tokens"] > 6
    assert 0 < fast["busy_fraction"] <= 1 and fast["prefill_gflop"] > 0
    assert [r["batch_size"] for r in hf] == [2, 6]
    # Same greedy fp32 captions, so the same token count, whatever the batching.
    assert {r["output_tokens"] for r in hf} == {fast["output_tokens"]}
    assert report["speedup"] > 0


def test_bad_batch_sizes_are_a_usage_error(tiny_model, capsys):
    assert main(["bench", "--model", str(tiny_model("llava")), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
