"""A run output as the judge sees it (its job and the caption columns it needs), and two matched by id."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.config import InputConfig
from pipeline.data.output import JOB_FILE, OutputDir
from pipeline.eval import ScoreError


@dataclasses.dataclass
class Row:
    row_index: int
    caption: str
    ok: bool
    path: str | None
    kind: str | None  # the job's kind column: decode_media's hint for content it cannot sniff


@dataclasses.dataclass
class RunOutput:
    dir: Path
    job: dict
    input: InputConfig
    rows: dict  # manifest id -> Row, in row_index order

    @property
    def model(self) -> str:
        return str(self.job.get("model", ""))


def load_run(out_dir: str | Path) -> RunOutput:
    """Read _job.json and the caption columns the judge needs (never the whole caption table)."""
    out = OutputDir(out_dir)
    job = _read_job(out)
    known = {f.name for f in dataclasses.fields(InputConfig)}
    inp = InputConfig(**{k: v for k, v in job["config"].get("input", {}).items() if k in known})
    return RunOutput(out.root, job, inp, _rows(out.root, _read_captions(out, inp), inp))


def _read_job(out: OutputDir) -> dict:
    path = out.root / JOB_FILE
    try:
        job = out.read_job()
    except (OSError, ValueError) as e:
        raise ScoreError(f"{path} is unreadable: {e}") from None
    if job is None:
        raise ScoreError(f"{out.root} is not a llava-batch run output (no {JOB_FILE})")
    if not isinstance(job, dict) or job.get("version") != 1 or not isinstance(job.get("config"), dict):
        raise ScoreError(f"{path} is not a version-1 llava-batch job file")
    return job


def _read_captions(out: OutputDir, inp: InputConfig) -> pa.Table:
    d = out.root
    # Only committed chunk files: the writer's temporary files never end in .parquet.
    files = sorted(out.captions.glob("*.parquet"))
    if not files:
        raise ScoreError(f"{d} is not a llava-batch run output (no captions/*.parquet)")
    try:
        dataset = pads.dataset([str(f) for f in files], format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise ScoreError(f"{d}/captions is not a readable Parquet dataset: {e}") from None
    names = set(dataset.schema.names)
    needed = {"row_index", "caption", "status"} | ({inp.id_column} if inp.id_column else set())
    if missing := needed - names:
        raise ScoreError(f"{d}/captions lacks column(s) {', '.join(sorted(missing))}")
    optional = {c for c in (inp.path_column, inp.kind_column, "prompt_name") if c and c in names}
    return dataset.to_table(columns=sorted(needed | optional)).sort_by("row_index")


def _rows(d: Path, table: pa.Table, inp: InputConfig) -> dict:
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    path_col = inp.path_column if inp.path_column in cols else None
    kind_col = inp.kind_column if inp.kind_column in cols else None
    ids = cols[inp.id_column] if inp.id_column else cols["row_index"]
    names = cols.get("prompt_name") or []
    if any(n is not None for n in names):  # several prompts a row: a caption is (id, prompt name)
        ids = [None if i is None else f"{i}/{n or ''}" for i, n in zip(ids, names, strict=True)]
    rows: dict = {}
    for k, key in enumerate(ids):
        if key is None or key in rows:
            what = "a null" if key is None else f"a duplicate ({key!r})"
            raise ScoreError(f"{d}: {what} manifest id in column {inp.id_column or 'row_index'}; "
                             "rows are matched by id (and prompt_name), so ids must be unique")
        rows[key] = Row(
            row_index=cols["row_index"][k],
            caption=cols["caption"][k] or "",
            ok=cols["status"][k] == "ok",
            path=cols[path_col][k] if path_col else None,
            kind=cols[kind_col][k] if kind_col else None,
        )
    return rows


@dataclasses.dataclass
class Plan:
    compare: list  # ids ok in both sets (or in A, single-set mode), in A's row order
    counts: dict


def match_rows(a: RunOutput, b: RunOutput | None) -> Plan:
    if b is None:
        errored = sum(not r.ok for r in a.rows.values())
        return Plan([i for i, r in a.rows.items() if r.ok], {"a": len(a.rows), "errored": errored})
    matched = [i for i in a.rows if i in b.rows]
    if a.rows and b.rows and not matched:
        raise ScoreError(f"{a.dir} and {b.dir} share no manifest id "
                         f"(ids by {a.input.id_column or 'row_index'} vs {b.input.id_column or 'row_index'})")
    compare = [i for i in matched if a.rows[i].ok and b.rows[i].ok]
    counts = {
        "a": len(a.rows),
        "b": len(b.rows),
        "matched": len(matched),
        "only_a": len(a.rows) - len(matched),
        "only_b": len(b.rows) - len(matched),
        "errored_a": sum(not a.rows[i].ok for i in matched),
        "errored_b": sum(not b.rows[i].ok for i in matched),
        "errored": len(matched) - len(compare),
    }
    return Plan(compare, counts)
