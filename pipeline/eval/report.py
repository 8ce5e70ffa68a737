"""Numbers and files of a CLIP-score report: report.json, report.md, scores.parquet and a histogram PNG.

Kept apart from pipeline/eval/clip_score.py so the summary is plain arithmetic over the per-row score table,
testable without open_clip.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Score differences this small are fp32 noise (1e-6 in cosine), not a better caption.
TIE_TOLERANCE = 1e-4
TOP_DIFFERENCES = 5

TOKEN_AGREEMENT_DOC = (
    "difflib.SequenceMatcher(autojunk=False) ratio over the two captions' whitespace-separated tokens "
    "(case-sensitive): 2 * matching tokens / (tokens in A + tokens in B); 1.0 when both are empty"
)


def token_agreement(a: str, b: str) -> float:
    ta, tb = a.split(), b.split()
    if not ta and not tb:
        return 1.0
    return difflib.SequenceMatcher(None, ta, tb, autojunk=False).ratio()


def _stats(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"mean": None, "median": None, "std": None}
    return {"mean": float(x.mean()), "median": float(np.median(x)), "std": float(x.std())}


def summarize(table: pa.Table, counts: dict, runs: list[dict]) -> dict:
    """The report dict; `table` has id, score_a, caption_a (+ score_b, caption_b for two sets)."""
    a = np.asarray(table.column("score_a").to_pylist(), dtype=np.float64)
    report: dict = {"version": 1, "a": runs[0], "rows": counts, "score_a": _stats(a)}
    if len(runs) == 2:
        b = np.asarray(table.column("score_b").to_pylist(), dtype=np.float64)
        d = a - b
        ca, cb = table.column("caption_a").to_pylist(), table.column("caption_b").to_pylist()
        n = len(ca)
        top = np.argsort(-np.abs(d), kind="stable")[:TOP_DIFFERENCES]
        ids = table.column("id").to_pylist()
        report.update(
            b=runs[1],
            score_b=_stats(b),
            score_diff=_stats(d),
            a_wins=int((d > TIE_TOLERANCE).sum()),
            b_wins=int((d < -TIE_TOLERANCE).sum()),
            ties=int((np.abs(d) <= TIE_TOLERANCE).sum()),
            tie_tolerance=TIE_TOLERANCE,
            exact_match_rate=(sum(x == y for x, y in zip(ca, cb, strict=True)) / n) if n else None,
            token_agreement=(sum(map(token_agreement, ca, cb)) / n) if n else None,
            largest_differences=[
                {"id": ids[k], "score_a": float(a[k]), "score_b": float(b[k]), "caption_a": ca[k], "caption_b": cb[k]}
                for k in top
            ],
        )
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict) -> str:
    n = report["rows"]["compared"]
    ma = report["score_a"]["mean"]
    if "b" not in report:
        if not n:
            return "No score: no row of A is ok and readable."
        return f"Mean CLIP score of A: {ma:.2f} over {n} rows."
    if not n:
        return "No verdict: no row is ok in both A and B and readable."
    mb = report["score_b"]["mean"]
    per_row = f"per row A wins {report['a_wins']}, B wins {report['b_wins']}, ties {report['ties']}"
    if abs(ma - mb) <= TIE_TOLERANCE:
        return f"Tie: A and B have the same mean CLIP score ({ma:.2f}) over {n} rows; {per_row}."
    winner = "A" if ma > mb else "B"
    return (f"{winner} wins: mean CLIP score {ma:.2f} (A) vs {mb:.2f} (B), {ma - mb:+.2f} points (A - B) "
            f"over {n} rows; {per_row}.")


def _fmt(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_markdown(report: dict) -> str:
    two = "b" in report
    sets = ["a", "b"] if two else ["a"]
    r = report["rows"]
    lines = ["# CLIP-score report", "", f"**Verdict:** {report['verdict']}", ""]
    lines += ["| | " + " | ".join(s.upper() for s in sets) + " |", "|---|" + "---|" * len(sets)]
    lines.append("| run | " + " | ".join(f"`{report[s]['dir']}`" for s in sets) + " |")
    lines.append("| model | " + " | ".join(f"`{report[s]['model']}`" for s in sets) + " |")
    for stat in ("mean", "median", "std"):
        lines.append(f"| {stat} score | " + " | ".join(_fmt(report[f"score_{s}"][stat]) for s in sets) + " |")
    lines.append("| rows in output | " + " | ".join(str(r[s]) for s in sets) + " |")
    lines.append("")
    if two:
        lines += [
            f"- Rows compared: {r['compared']} of {r['matched']} matched by manifest id "
            f"(left out: errored in A {r['errored_a']}, errored in B {r['errored_b']}, "
            f"media unreadable {r['media_errors']}; only in A {r['only_a']}, only in B {r['only_b']}).",
            f"- Per row: A wins {report['a_wins']}, B wins {report['b_wins']}, ties {report['ties']} "
            f"(|score A - score B| <= {report['tie_tolerance']}).",
            f"- Exact caption match rate: {_fmt(report['exact_match_rate'], '.3f')}; "
            f"mean token-level agreement: {_fmt(report['token_agreement'], '.3f')}.",
        ]
    else:
        lines.append(f"- Rows scored: {r['compared']} of {r['a']} (left out: errored {r['errored']}, "
                     f"media unreadable {r['media_errors']}).")
    for msg in report.get("media_error_examples", []):
        lines.append(f"- media error: {msg}")
    if two and report["largest_differences"]:
        lines += ["", "## Largest differences", "", "| id | score A | score B | caption A | caption B |",
                  "|---|---|---|---|---|"]
        for row in report["largest_differences"]:
            ca, cb = (row[k].replace("|", "\\|").replace("\n", " ") for k in ("caption_a", "caption_b"))
            lines.append(f"| {row['id']} | {row['score_a']:.2f} | {row['score_b']:.2f} | {ca} | {cb} |")
    lines += [
        "", "## How these numbers are computed", "",
        f"- CLIP model `{report.get('clip_model')}`, weights `{report.get('clip_weights')}`, "
        f"device `{report.get('device')}`.",
        "- Per-row score = 100 * max(cos(image embedding, caption embedding), 0), with L2-normalised fp32 "
        "open_clip embeddings, open_clip's eval preprocessing and tokenizer (captions are truncated to the "
        "model's context length). A video row scores the mean over the frames the job sampled. "
        "Images come from run A's job (its path column and media_root, or its bytes column).",
        "- Rows are matched by manifest id (the job's id_column, else row_index; with several prompts a row, "
        "id/prompt_name); rows that errored in either "
        "set or whose media cannot be read now are counted above and left out of every number.",
        "- std is the population standard deviation. The higher mean score wins (MindIE's llava judge).",
    ]
    if two:
        lines += [
            "- Exact caption match: the two caption strings are identical.",
            f"- Token-level agreement: {TOKEN_AGREEMENT_DOC}; averaged over the compared rows.",
        ]
    return "\n".join(lines) + "\n"


def _histogram(report: dict, table: pa.Table, path: Path) -> None:
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    a = np.asarray(table.column("score_a").to_pylist(), dtype=np.float64)
    if "b" in report:
        x = a - np.asarray(table.column("score_b").to_pylist(), dtype=np.float64)
        ax.set_xlabel("CLIP score A - CLIP score B (per row)")
        ax.axvline(0.0, color="black", linewidth=1)
    else:
        x = a
        ax.set_xlabel("CLIP score A (per row)")
    ax.hist(x, bins=min(50, max(10, x.size // 4)))
    ax.set_ylabel("rows")
    ax.set_title(report["verdict"] if len(report["verdict"]) < 90 else report["verdict"][:87] + "...", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(report: dict, table: pa.Table, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report["histogram"] = "score_diff_hist.png" if "b" in report else "score_hist.png"
    pq.write_table(table, out_dir / "scores.parquet")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    _histogram(report, table, out_dir / report["histogram"])
