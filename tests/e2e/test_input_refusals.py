"""Inputs that would quietly ruin every row are refused before any work: one line naming the
column or the setting, exit 2, nothing written (so the corrected run is the first one)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.cli import main
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest

STRUCT = pa.array([{"data": b"x"}], type=pa.struct([("data", pa.binary())]))

# name: (manifest columns, [input] settings, what the one line must say)
CASES = {
    "int path column": ({"path": [1]}, {}, "input.path_column: column 'path' has type int64"),
    "binary path column": ({"path": [b"img0.png"]}, {}, "input.path_column: column 'path' has type binary"),
    "int prompt column": ({"path": ["a.png"], "p": [7]}, {"prompt_column": "p"},
                          "input.prompt_column: column 'p' has type int64"),
    "bool kind column": ({"path": ["a.png"], "k": [True]}, {"kind_column": "k"},
                         "input.kind_column: column 'k' has type bool"),
    "list id column": ({"path": ["a.png"], "id": [[1, 2]]}, {"id_column": "id"},
                       "input.id_column: column 'id' has type list<"),
    "string bytes column": ({"raw": ["not bytes"]}, {"bytes_column": "raw"},
                            "input.bytes_column: 'raw' has type string"),
    "struct without bytes": ({"image": STRUCT}, {"bytes_column": "image"},
                             "input.bytes_column: 'image' has type struct"),
    "media_root not found": ({"path": ["a.png"]}, {"media_root": "/nonexistent/media"},
                             "input.media_root: not found: /nonexistent/media"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_before_any_work(case, tiny_model, tmp_path, capsys):
    columns, settings, needle = CASES[case]
    manifest = write_manifest(tmp_path / "m.parquet", columns)
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava"), manifest, tmp_path / "out",
                                                        input=settings))
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_media_root_that_is_a_file_is_refused_and_the_corrected_run_works(tiny_model, tmp_path, capsys):
    write_image(tmp_path / "media" / "a.png", seed=1)
    (tmp_path / "media.txt").write_text("not a folder")
    manifest = write_manifest(tmp_path / "m.parquet", {"path": ["a.png"]})
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava"), manifest, tmp_path / "out",
                                                        input={"media_root": "media.txt"}))
    assert main(["run", str(job)]) == 2
    assert f"input.media_root: not a directory: {tmp_path / 'media.txt'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["run", str(job), "--set", "input.media_root=media"]) == 0
    assert "1 rows: 1 ok, 0 errors" in capsys.readouterr().out


@pytest.mark.parametrize("value", [0, -1.5, "inf"])
def test_decode_timeout_must_be_a_positive_number_of_seconds(value, tiny_model, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", {"path": ["a.png"]})
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava"), manifest, tmp_path / "out"))
    assert main(["run", str(job), "--set", f"run.decode_timeout_s={value}"]) == 2
    assert "run.decode_timeout_s must be > 0" in capsys.readouterr().err
