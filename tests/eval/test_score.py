"""CLIP-score judge: a tiny random-weight open_clip model built from a local config JSON, run outputs
written by hand to the output-directory contract (so the judge is tested apart from the runner), and
open_clip called directly as the oracle for every per-row score."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

open_clip = pytest.importorskip("open_clip")  # the `eval` extra
torch = pytest.importorskip("torch")

from pipeline.cli import main  # noqa: E402
from pipeline.eval import ScoreError  # noqa: E402
from pipeline.eval import media_reader as media_reader_mod  # noqa: E402
from pipeline.eval.clip_score import score  # noqa: E402
from pipeline.eval.report import token_agreement  # noqa: E402

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    # vocab_size must cover open_clip's bundled BPE tokenizer.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CAPTIONS_A = ["a red dog on the grass", "two cats sleeping on a sofa", "a man riding a horse",
              "a blue sky over the sea", "a plate of food on a table", "a train at a station"]
CAPTIONS_B = ["a dog on green grass", "two cats sleeping on a sofa", "a person on a horse",
              "the sea under a blue sky", "food on a white plate", "a train"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Config JSON + .bin + .safetensors of one random model, and open_clip itself as the oracle."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("clip")
    config = d / "tiny-clip-oracle.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-oracle", pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip-oracle")
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "open_clip_model.safetensors")

    def oracle(image: Image.Image, caption: str) -> float:
        with torch.no_grad():
            i = torch.nn.functional.normalize(model.encode_image(preprocess(image)[None]), dim=-1)
            t = torch.nn.functional.normalize(model.encode_text(tokenizer([caption])), dim=-1)
        return 100.0 * max(float((i * t).sum()), 0.0)

    return SimpleNamespace(config=str(config), bin=str(d / "open_clip_pytorch_model.bin"),
                           safetensors=str(d / "open_clip_model.safetensors"), oracle=oracle)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six small noise images of different sizes, JPEG and PNG; returns (media_root, names)."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    names = []
    for k in range(6):
        name = f"img-{k}.{'jpg' if k % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (36 + 5 * k, 48, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    return root, names


def load_image(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def make_run(out: Path, manifest_rows: list[dict], results: list[dict], *, manifest: Path,
             id_column=None, bytes_column=None, media_root=None, video_frames=8) -> Path:
    """A run output as the contract defines it: _job.json + a captions dataset in two chunk files."""
    pq.write_table(pa.Table.from_pylist(manifest_rows), manifest)
    config = {
        "model": {"path": "/models/tiny", "dtype": "float32", "device": "cpu"},
        "input": {"manifest": [str(manifest)], "path_column": "path", "bytes_column": bytes_column,
                  "kind_column": None, "prompt_column": None, "id_column": id_column,
                  "media_root": str(media_root) if media_root else None, "max_image_pixels": 89_478_485},
        "generation": {"video_frames": video_frames, "prompt": "Describe."},
        "output": {"dir": str(out)},
    }
    (out / "captions").mkdir(parents=True)
    (out / "_job.json").write_text(json.dumps({
        "version": 1, "fingerprint": "test", "model": "tiny", "config": config,
        "manifest": {"files": [str(manifest)], "num_rows": len(manifest_rows)},
    }))
    rows = []
    for r in results:
        src = {k: v for k, v in manifest_rows[r["row_index"]].items() if k != bytes_column}
        ok = r.get("status", "ok") == "ok"
        rows.append({**src, "row_index": r["row_index"], "prompt_name": r.get("prompt_name"),
                     "caption": r["caption"] if ok else None,
                     "status": "ok" if ok else "error", "error": None if ok else "missing file: x",
                     "n_prompt_tokens": 5, "n_output_tokens": 4, "finish_reason": "stop", "frames": None,
                     "prompt": "Describe.", "model": "tiny"})
    table = pa.Table.from_pylist(rows)
    half = len(rows) // 2
    pq.write_table(table.slice(0, half), out / "captions" / "shard-00000-chunk-00000.parquet")
    pq.write_table(table.slice(half), out / "captions" / "shard-00000-chunk-00001.parquet")
    return out


@pytest.fixture
def ab_runs(tmp_path, images):
    """A and B over the same images, matched by a string id column; B lists the rows in another order."""
    root, names = images
    rows = [{"key": f"img-{k}", "path": n} for k, n in enumerate(names)]
    a = make_run(tmp_path / "a", rows,
                 [{"row_index": k, "caption": CAPTIONS_A[k], "status": "error" if k == 5 else "ok"}
                  for k in range(6)],
                 manifest=tmp_path / "a.parquet", id_column="key", media_root=root)
    # B's manifest is reversed and lacks img-5, so its row_index differs from A's for the same id.
    rows_b = list(reversed(rows[:5]))
    b = make_run(tmp_path / "b", rows_b,
                 [{"row_index": j, "caption": CAPTIONS_B[int(r["key"][-1])],
                   "status": "error" if r["key"] == "img-2" else "ok"} for j, r in enumerate(rows_b)],
                 manifest=tmp_path / "b.parquet", id_column="key", media_root=root)
    return a, b


def test_every_score_equals_open_clip_directly(ab_runs, images, clip, tmp_path):
    root, names = images
    report = score(*ab_runs, clip_model=clip.config, clip_weights=clip.bin, out_dir=tmp_path / "rep",
                   batch_size=3)
    table = pq.read_table(tmp_path / "rep" / "scores.parquet").to_pylist()
    assert [r["id"] for r in table] == ["img-0", "img-1", "img-3", "img-4"]
    for r in table:
        k = int(r["id"][-1])
        image = load_image(root / names[k])
        assert (r["caption_a"], r["caption_b"]) == (CAPTIONS_A[k], CAPTIONS_B[k])
        assert r["score_a"] == pytest.approx(clip.oracle(image, CAPTIONS_A[k]), abs=1e-3)
        assert r["score_b"] == pytest.approx(clip.oracle(image, CAPTIONS_B[k]), abs=1e-3)
    assert len({round(r["score_a"], 3) for r in table}) > 1 and all(r["score_a"] > 0 for r in table)

    assert report["rows"] == {"a": 6, "b": 5, "matched": 5, "only_a": 1, "only_b": 0, "errored_a": 0,
                              "errored_b": 1, "errored": 1, "media_errors": 0, "compared": 4}
    assert report["a_wins"] + report["b_wins"] + report["ties"] == 4
    assert report["score_a"]["mean"] == pytest.approx(np.mean([r["score_a"] for r in table]))
    assert 0 < report["token_agreement"] < 1 and report["exact_match_rate"] == 0.25  # one caption is equal
    on_disk = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert on_disk["verdict"] == report["verdict"] and on_disk["a_wins"] == report["a_wins"]
    md = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert md[0] == "# CLIP-score report" and md[2] == f"**Verdict:** {report['verdict']}"
    assert (tmp_path / "rep" / "score_diff_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_with_several_prompts_a_row_are_matched_by_id_and_prompt_name(images, clip, tmp_path):
    root, names = images
    rows = [{"key": f"img-{k}", "path": n} for k, n in enumerate(names[:3])]
    results = [{"row_index": k, "prompt_name": p, "caption": f"{CAPTIONS_A[k]} {p}"} for k in range(3)
               for p in ("short", "tags")]
    a = make_run(tmp_path / "a", rows, results, manifest=tmp_path / "a.parquet", id_column="key", media_root=root)
    b = make_run(tmp_path / "b", rows, [dict(r, caption=r["caption"] if r["prompt_name"] == "short" else "x")
                                        for r in results], manifest=tmp_path / "b.parquet", id_column="key",
                 media_root=root)
    report = score(a, b, clip_model=clip.config, clip_weights=clip.bin, out_dir=tmp_path / "rep")
    table = pq.read_table(tmp_path / "rep" / "scores.parquet").to_pylist()
    assert sorted(r["id"] for r in table) == sorted(f"img-{k}/{p}" for k in range(3) for p in ("short", "tags"))
    assert report["rows"]["compared"] == 6 and report["exact_match_rate"] == 0.5
    for r in table:
        k = int(r["id"].split("/")[0][-1])
        assert r["score_a"] == pytest.approx(clip.oracle(load_image(root / names[k]), r["caption_a"]), abs=1e-3)


def test_identical_captions_are_all_ties_bytes_column_and_safetensors(images, clip, tmp_path):
    root, names = images
    rows = [{"image": (root / n).read_bytes(), "note": n} for n in names[:4]]
    results = [{"row_index": k, "caption": CAPTIONS_A[k]} for k in range(4)]
    a = make_run(tmp_path / "a", rows, results, manifest=tmp_path / "m.parquet", bytes_column="image")
    b = shutil.copytree(a, tmp_path / "b")

    report = score(a, b, clip_model=clip.config, clip_weights=clip.safetensors, out_dir=tmp_path / "rep")
    assert report["rows"]["compared"] == 4 and report["ties"] == 4
    assert report["a_wins"] == report["b_wins"] == 0
    assert report["exact_match_rate"] == 1.0 and report["token_agreement"] == 1.0
    assert report["verdict"].startswith("Tie")
    # Ids are row_index when the job has no id column; bytes were re-read from the manifest.
    table = pq.read_table(tmp_path / "rep" / "scores.parquet").to_pylist()
    assert [r["id"] for r in table] == [0, 1, 2, 3]
    for k, r in enumerate(table):
        assert r["score_a"] == pytest.approx(clip.oracle(load_image(root / names[k]), CAPTIONS_A[k]), abs=1e-3)

    single = score(a, clip_model=clip.config, clip_weights=clip.bin, out_dir=tmp_path / "one")
    assert "a_wins" not in single and "score_b" not in single
    assert single["score_a"] == pytest.approx(report["score_a"])
    assert pq.read_table(tmp_path / "one" / "scores.parquet").column_names == ["id", "score_a", "caption_a"]
    assert (tmp_path / "one" / "score_hist.png").is_file()


def test_video_row_is_the_mean_over_the_sampled_frames(ab_runs, images, clip, monkeypatch, tmp_path):
    from pipeline.data.media import Media

    root, names = images
    frames = [load_image(root / n).resize((40, 30)) for n in names[:3]]
    seen = {}

    def fake_decode(fileobj, *, video_frames, max_image_pixels, kind_hint):
        seen["video_frames"] = video_frames
        return Media(kind="video", frames=np.stack([np.asarray(f) for f in frames]))

    monkeypatch.setattr(media_reader_mod, "_decode", fake_decode)
    score(ab_runs[0], clip_model=clip.config, clip_weights=clip.bin, out_dir=tmp_path / "rep", batch_size=2)
    assert seen["video_frames"] == 8  # the job's generation.video_frames
    table = pq.read_table(tmp_path / "rep" / "scores.parquet").to_pylist()
    assert len(table) == 5
    for r in table:
        caption = CAPTIONS_A[int(r["id"][-1])]
        assert r["score_a"] == pytest.approx(np.mean([clip.oracle(f, caption) for f in frames]), abs=1e-3)


def test_unreadable_media_is_counted_and_left_out(ab_runs, images, clip, tmp_path):
    a, _ = ab_runs
    job = json.loads((a / "_job.json").read_text())
    other_root = tmp_path / "moved"
    shutil.copytree(images[0], other_root)
    (other_root / images[1][0]).unlink()
    job["config"]["input"]["media_root"] = str(other_root)
    (a / "_job.json").write_text(json.dumps(job))
    report = score(a, clip_model=clip.config, clip_weights=clip.bin)
    assert report["rows"]["media_errors"] == 1 and report["rows"]["compared"] == 4
    assert "img-0" in report["media_error_examples"][0]


def _run_cli(argv):
    return main(["score", *argv])


@pytest.mark.parametrize("case", ["missing_weights", "wrong_name", "not_a_run", "no_config", "bad_weights", "hub"])
def test_clear_errors_exit_2(case, ab_runs, clip, tmp_path, capsys):
    a, b = ab_runs
    bad = tmp_path / "bad.bin"
    torch.save({"foo": torch.zeros(2)}, bad)
    model, weights, out_a = clip.config, clip.bin, str(a)
    expect = {
        "missing_weights": "no such file",
        "wrong_name": "unknown open_clip model 'ViT-H-15'",
        "not_a_run": "is not a llava-batch run output",
        "no_config": "no such open_clip config file",
        "bad_weights": "cannot load",
        "hub": "not 'hf-hub:",
    }[case]
    if case == "missing_weights":
        weights = str(tmp_path / "nope.bin")
    elif case == "wrong_name":
        model = "ViT-H-15"
    elif case == "not_a_run":
        out_a = str(tmp_path)
    elif case == "no_config":
        model = str(tmp_path / "nope.json")
    elif case == "bad_weights":
        weights = str(bad)
    else:
        model = "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    rc = _run_cli([out_a, str(b), "--clip-model", model, "--clip-weights", weights, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "r").exists()


def test_cli_prints_verdict_and_writes_report(ab_runs, clip, tmp_path, capsys):
    rc = _run_cli([*map(str, ab_runs), "--clip-model", clip.config, "--clip-weights", clip.bin,
                   "--out", str(tmp_path / "r"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "over 4 rows" in out and (tmp_path / "r" / "report.md").is_file()


def test_score_error_is_a_config_error_and_no_common_ids(ab_runs, tmp_path, images, clip):
    from pipeline.errors import ConfigError

    assert issubclass(ScoreError, ConfigError)
    root, names = images
    c = make_run(tmp_path / "c", [{"path": names[0]}], [{"row_index": 0, "caption": "x"}],
                 manifest=tmp_path / "c.parquet", media_root=root)
    with pytest.raises(ScoreError, match="share no manifest id"):
        score(ab_runs[0], c, clip_model=clip.config, clip_weights=clip.bin)


def test_token_agreement():
    assert token_agreement("a dog runs", "a dog runs") == 1.0
    assert token_agreement("a dog runs", "a dog sits") == pytest.approx(4 / 6)
    assert token_agreement("", "") == 1.0 and token_agreement("a", "") == 0.0



def test_no_comparable_rows_gives_no_verdict_not_a_crash(tmp_path):
    from pipeline.eval.report import summarize, write_report

    empty = {n: pa.array([], t) for n, t in (("id", pa.int64()), ("score_a", pa.float64()),
                                              ("caption_a", pa.string()), ("score_b", pa.float64()),
                                              ("caption_b", pa.string()))}
    counts = {"a": 2, "b": 2, "matched": 2, "only_a": 0, "only_b": 0, "errored_a": 2, "errored_b": 0,
              "errored": 2, "media_errors": 0, "compared": 0}
    report = summarize(pa.table(empty), counts, [{"dir": "a", "model": "m"}, {"dir": "b", "model": "m"}])
    write_report(report, pa.table(empty), tmp_path)
    assert report["verdict"].startswith("No verdict") and report["score_a"]["mean"] is None
    assert "| mean score | n/a | n/a |" in (tmp_path / "report.md").read_text()
