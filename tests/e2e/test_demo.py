"""The embedded demo (`make run`) runs, and its second run does no work."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.cli import main
from pipeline.testing.demo import build_demo

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_then_resumes_with_no_work(tmp_path, capsys):
    (tmp_path / "jobs").mkdir()
    job = shutil.copy(REPO / "jobs" / "demo.toml", tmp_path / "jobs" / "demo.toml")
    build_demo(tmp_path / "demo")
    assert main(["run", str(job)]) == 0
    first = capsys.readouterr()
    assert "6 rows: 6 ok, 0 errors; 6 captioned this run" in first.out
    assert main(["run", str(job)]) == 0
    second = capsys.readouterr()
    assert "all 6 rows already done" in second.err
    assert "0 captioned this run" in second.out
    assert main(["status", str(tmp_path / "demo" / "out")]) == 0
    assert "6/6 rows done (6 ok, 0 errors); 1/1 shards complete" in capsys.readouterr().out
