"""Two runs of different jobs started together on one fresh output dir: exactly one does the work,
the other exits 2 naming the setting, and the output holds the winner's captions only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest

N_ROWS = 24  # 6 shards of 4 rows: enough for two runs to split the shards between them

# Each run waits at the barrier with its imports done, then both go at once.
_AT_BARRIER = ("import sys; from pipeline.cli import main; print('ready', flush=True); sys.stdin.readline(); "
               "sys.exit(main(sys.argv[1:]))")


def start_together(*argvs: list[str]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-c", _AT_BARRIER, *argv], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("concurrent")
    paths = [str(write_image(root / "media" / f"{i}.png", seed=400 + i, size=(64 + 4 * i, 72)))
             for i in range(N_ROWS)]
    return write_manifest(root / "m.parquet", {"id": [f"r{i}" for i in range(N_ROWS)], "path": paths})


SETTINGS = {
    "prompt": ("prompt", "Describe this image.", "Name one colour."),
    "max_output_length": ("max_output_length", 8, 16),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SETTINGS))
def test_two_jobs_started_together_one_works_the_other_exits_2(case, manifest, tiny_model, tmp_path):
    key, *values = SETTINGS[case]
    out = tmp_path / "out"
    jobs = [write_job(tmp_path / f"job{k}.toml", job_sections(
        tiny_model("llava"), manifest, out, output={"rows_per_shard": 4, "chunk_rows": 2},
        generation={"max_output_length": 12, key: value})) for k, value in enumerate(values)]
    results = start_together(*(["run", str(job)] for job in jobs))

    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [(r.returncode, r.stderr[-2000:]) for r in results]
    winner = next(k for k, r in enumerate(results) if r.returncode == 0)
    loser = results[1 - winner]
    assert f"generation.{key} = {values[winner]!r}, this job has {values[1 - winner]!r}" in loser.stderr
    assert "Traceback" not in loser.stderr and f"{N_ROWS} captioned this run" in results[winner].stdout

    job = json.loads((out / "_job.json").read_text())
    assert job["config"]["generation"][key] == values[winner]
    table = ds.dataset(out / "captions").to_table()
    assert sorted(table.column("row_index").to_pylist()) == list(range(N_ROWS)), "every row exactly once"
    stamps = {json.loads(pq.read_schema(p).metadata[b"llava_batch"])["fingerprint"]
              for p in (out / "captions").glob("*.parquet")}
    assert stamps == {job["fingerprint"]}
    rows = table.to_pylist()
    if key == "prompt":
        assert all(values[winner] in r["prompt"] for r in rows)
    else:  # a row cut by the limit has exactly the winner's limit of tokens
        assert all(r["n_output_tokens"] <= values[winner] for r in rows)
        assert any(r["finish_reason"] == "length" for r in rows)
        assert all(r["n_output_tokens"] == values[winner] for r in rows if r["finish_reason"] == "length")
