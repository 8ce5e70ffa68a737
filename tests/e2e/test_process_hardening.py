"""A bad job is refused before torch loads (one line, exit 2); SIGTERM stops a run cleanly (exit 143,
leases released) and the rerun is exactly once. Real `llava-batch` processes and real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.errors import ConfigError
from pipeline.model.inspect import check_safetensors
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest
from tests.executors.scaleout_common import descendants

# Runs `llava-batch ARGS` through cli.main in a fresh interpreter and reports its exit code and which
# heavy libraries it imported on the way.
PROBE = """\
import json, sys
from pipeline.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


def probe(*args: str) -> tuple[dict, list[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr.strip().splitlines()


@pytest.fixture
def job(tiny_model, tmp_path):
    """(write(sections change) -> job file, the model dir copy the job uses)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model("llava"), model)
    image = write_image(tmp_path / "a.png", seed=1)
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(image)], "id": ["x"]})

    def write(**change) -> Path:
        sections = job_sections(model, manifest, tmp_path / "out")
        for section, values in change.items():
            sections.setdefault(section, {}).update(values)
        return write_job(tmp_path / "job.toml", sections)

    return write, model


def refused_before_torch(job_file: Path, needle: str) -> str:
    result, err = probe("run", str(job_file))
    assert result == {"rc": 2, "heavy": []}, err
    assert len(err) == 1 and err[0].startswith("llava-batch: error: ") and needle in err[0], err
    assert not (job_file.parent / "out").exists()
    return err[0]


@pytest.mark.parametrize("change, needle", [
    ({"generation": {"max_tokens": 5}}, "generation.max_tokens"),
    ({"input": {"id_column": "uid"}}, "input.id_column"),
    ({"model": {"path": "/nonexistent/model"}}, "model.path"),
    ({"run": {"worker_timeout_s": 0}}, "run.worker_timeout_s"),
], ids=["bad key", "missing manifest column", "missing model dir", "worker timeout 0"])
def test_a_bad_job_is_refused_before_torch_is_imported(job, change, needle):
    write, _ = job
    refused_before_torch(write(**change), needle)


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _index_with_a_missing_file(model: Path) -> None:
    weight_map = {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


BROKEN_DIRS = {
    "no tokenizer.json": (lambda m: (m / "tokenizer.json").unlink(), "tokenizer.json"),
    "no tokenizer_config.json": (lambda m: (m / "tokenizer_config.json").unlink(), "tokenizer_config.json"),
    "no processor config": (lambda m: (m / "processor_config.json").unlink(), "preprocessor_config.json"),
    "truncated safetensors": (lambda m: _truncate(m / "model.safetensors"), "model.safetensors"),
    "index names a missing file": (_index_with_a_missing_file, "model-00002-of-00002.safetensors"),
    "config.json not JSON": (lambda m: (m / "config.json").write_text("{"), "config.json"),
}


@pytest.mark.parametrize("case", list(BROKEN_DIRS))
def test_a_broken_model_dir_is_one_line_naming_the_file_before_any_weight_loads(job, case):
    write, model = job
    breaks, needle = BROKEN_DIRS[case]
    breaks(model)
    refused_before_torch(write(), needle)


def test_a_truncated_w8a16_weight_file_is_refused_the_same_way(job, tiny_model, tmp_path):
    import quant

    write, model = job
    qdir = quant.quantize(tiny_model("llava"), tmp_path / "w8a16", backend="builtin")
    weights = next(qdir.glob("*.safetensors"))
    _truncate(weights)
    line = refused_before_torch(write(model={"path": str(qdir)}), weights.name)
    assert "truncated" in line


def test_the_header_check_reads_lengths_not_tensors(tiny_model, tmp_path):
    good = tiny_model("llava") / "model.safetensors"
    check_safetensors(good)  # the intact file passes
    data = good.read_bytes()
    cases = {
        "one byte more": data + b"\0",
        "header longer than the file": (10**9).to_bytes(8, "little") + data[8:],
        "header not JSON": data[:8] + b"\xff" * (len(data) - 8),
        "under 8 bytes": data[:5],
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=str(path).replace(".", r"\.")):
            check_safetensors(path)


# ---------------------------------------------------------------- SIGTERM

N_ROWS = 40  # 4 shards of 10 rows, chunks of 3: 16 chunks


@pytest.fixture(scope="module")
def sigterm_inputs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sigterm")
    paths = [str(write_image(root / "media" / f"{i}.png", seed=300 + i, size=(64, 72)))
             for i in range(N_ROWS)]
    manifest = write_manifest(root / "m.parquet", {"id": [f"r{i}" for i in range(N_ROWS)], "path": paths},
                              row_group_size=5)
    return root, tiny_model("llava"), manifest


def wait_for_a_chunk(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.glob("captions/*.parquet")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no chunk committed in {out}"
        time.sleep(0.02)


def row_indexes(out: Path) -> list[int]:
    return sorted(ds.dataset(out / "captions").to_table(columns=["row_index"]).column(0).to_pylist())


@pytest.mark.slow
@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]], ids=["in-process", "worker processes"])
def test_sigterm_stops_cleanly_and_the_rerun_is_exactly_once(sigterm_inputs, devices):
    root, model, manifest = sigterm_inputs
    out = root / f"out-{len(devices)}"
    job = write_job(root / f"job-{len(devices)}.toml", job_sections(
        model, manifest, out, output={"rows_per_shard": 10, "chunk_rows": 3},
        generation={"max_batch_size": 2}, run={"devices": devices}))
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_a_chunk(out, proc)
    workers = descendants(proc.pid, "pipeline.executors.worker")
    assert len(workers) == (len(devices) if len(devices) > 1 else 0)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)

    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    # A worker still loading may be cut off mid progress bar, with no newline before our line.
    lines = [line[line.index("llava-batch: "):] for line in stderr.splitlines() if "terminated" in line]
    assert lines == ["llava-batch: terminated (SIGTERM); rerun the same command to resume"], stderr
    assert stderr.rstrip().endswith(lines[0]) and not stdout
    assert not list(out.glob("_leases/*.json")), "every lease released"
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "the workers stopped with it"
    assert 0 < len(row_indexes(out)) < N_ROWS, "the signal must land mid-job for the test to mean anything"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert row_indexes(out) == list(range(N_ROWS)), "every row exactly once"
