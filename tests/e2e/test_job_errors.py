"""Bad configuration stops before any work: one clear line on stderr, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest


@pytest.fixture
def base(tiny_model, tmp_path):
    image = write_image(tmp_path / "a.png", seed=1)
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(image)], "id": ["x"]})
    return job_sections(tiny_model("llava"), manifest, tmp_path / "out")


CASES = {
    "unknown key": ({"generation": {"max_tokens": 5}}, "generation.max_tokens"),
    "unknown section": ({"modle": {"path": "x"}}, "[modle]"),
    "wrong type": ({"generation": {"max_batch_size": "eight"}}, "generation.max_batch_size"),
    "impossible value": ({"generation": {"max_batch_size": 0}}, "generation.max_batch_size"),
    "bad dtype": ({"model": {"dtype": "fp8"}}, "model.dtype"),
    "bad mode": ({"output": {"mode": "append"}}, "output.mode"),
    "chunk > shard": ({"output": {"rows_per_shard": 4, "chunk_rows": 8}}, "output.chunk_rows"),
    "absent device": ({"model": {"device": "cuda:7"}}, "model.device"),
    "missing model": ({"model": {"path": "/nonexistent/model"}}, "model.path"),
    "missing manifest": ({"input": {"manifest": "/nonexistent/m.parquet"}}, "input.manifest"),
    "missing column": ({"input": {"id_column": "uid"}}, "input.id_column"),
    # The slots hold the longest prompt the model's media arithmetic gives, not max_input_length: only
    # what has to be generated can outgrow them.
    "KV cache too big": ({"generation": {"max_output_length": 200_000_000}}, "max_output_length"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_job_exits_2_and_writes_nothing(case, base, tmp_path, capsys):
    change, needle = CASES[case]
    for section, values in change.items():
        base.setdefault(section, {}).update(values)
    job = write_job(tmp_path / "job.toml", base)
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_bad_override_and_missing_job_file(base, tmp_path, capsys):
    job = write_job(tmp_path / "job.toml", base)
    assert main(["run", str(job), "--set", "generation.max_batch_size"]) == 2
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert not (tmp_path / "out").exists()


def test_relative_paths_resolve_against_the_job_file(base, tmp_path):
    from pipeline.config import load_job

    (tmp_path / "jobs").mkdir()
    base["output"]["dir"] = "../out-rel"
    cfg = load_job(write_job(tmp_path / "jobs" / "job.toml", base))
    assert cfg.output.dir == str((tmp_path / "out-rel").resolve())


def test_changed_settings_refuse_to_resume_unless_overwrite(base, tmp_path, capsys):
    job = write_job(tmp_path / "job.toml", base)
    assert main(["run", str(job)]) == 0
    assert main(["run", str(job), "--set", 'generation.prompt="Something else"']) == 2
    assert "generation.prompt" in capsys.readouterr().err
    assert main(["run", str(job), "--set", 'generation.prompt="Something else"', "--set", 'output.mode="overwrite"']) == 0


def test_exit_code_2_from_a_real_process(base, tmp_path):
    base["generation"]["max_output_length"] = -1
    job = write_job(tmp_path / "job.toml", base)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "max_output_length" in proc.stderr
    assert not (tmp_path / "out").exists()
