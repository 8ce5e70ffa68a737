"""Tensor parallel on the CPU: ranks are processes talking gloo (pipeline/engine/tp_group.py), each
holding its shard of the language model (pipeline/model/tensor_parallel.py). Greedy fp32 captions
at world size 2 and 4 must equal world size 1, refills, compaction and video rows included."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.model import loader
from pipeline.model.tensor_parallel import Placement, load_shard
from pipeline.testing.demo import write_image, write_video
from pipeline.testing.jobs import job_sections, write_job, write_manifest

SIZES = [(40, 30), (28, 56), (56, 56), (90, 30), (33, 47), (64, 64), (30, 90)]


def media(root: Path, videos: bool) -> Path:
    paths = [str(write_image(root / "media" / f"{i}.png", seed=40 + i, size=s)) for i, s in enumerate(SIZES)]
    if videos:
        paths += [str(write_video(root / "media" / f"v{j}.mp4", n_frames=6 + 3 * j, seed=j)) for j in range(2)]
    return write_manifest(root / "m.parquet", {"path": paths})


def run(model: Path, manifest: Path, out: Path, expect: int = 0, compile: bool = False, **run_keys) -> list[tuple]:
    # 3 slots for 7-9 rows: rows finish at different steps, so slots refill and rows move down.
    sections = job_sections(model, manifest, out, generation={"max_batch_size": 3, "compile": compile},
                            run={"progress": False, **run_keys})
    assert main(["run", str(write_job(out.with_suffix(".toml"), sections))]) == expect
    rows = ds.dataset(out / "captions").to_table().to_pylist()
    return sorted((r["row_index"], r["status"], r["caption"], r["n_output_tokens"]) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("family,worlds", [("llava", (2, 4)), ("llava_next", (2,)), ("llava_next_video", (2,))])
def test_captions_at_world_size_n_equal_world_size_1(tiny_model, tmp_path, family, worlds):
    manifest = media(tmp_path, videos=family == "llava_next_video")
    alone = run(tiny_model(family), manifest, tmp_path / "ws1")
    assert all(status == "ok" for _, status, _, _ in alone)
    assert len({n for *_, n in alone}) > 2, "rows must stop at different steps"
    for world in worlds:
        assert run(tiny_model(family), manifest, tmp_path / f"ws{world}", tensor_parallel=world) == alone, world
    # generation.compile: every rank runs the bucket-padded step (captured where the device has graphs)
    captured = run(tiny_model(family), manifest, tmp_path / "ws2-compile", tensor_parallel=2, compile=True)
    assert captured == alone


@pytest.mark.slow
def test_several_prompts_per_media_share_their_prefix_on_every_rank(tiny_model, tmp_path):
    """The rest of a prompt over its source's prefix, and the prefix copy, run on every rank: first
    in a prefill with nothing decoding, then riding in decode steps."""
    manifest = media(tmp_path, videos=False)
    prompts = {"a": "caption", "b": "What is in the picture?", "c": "Describe this image in one sentence."}

    def run_prompts(out: Path, **run_keys) -> list[tuple]:
        sections = job_sections(tiny_model("llava"), manifest, out, generation={"max_batch_size": 4, "prompts": prompts},
                                run={"progress": False, **run_keys})
        assert main(["run", str(write_job(out.with_suffix(".toml"), sections))]) == 0
        rows = ds.dataset(out / "captions").to_table().to_pylist()
        return sorted((r["row_index"], r["prompt_name"], r["status"], r["caption"]) for r in rows)

    alone = run_prompts(tmp_path / "ws1")
    assert len(alone) == 3 * len(SIZES)
    assert run_prompts(tmp_path / "ws2", tensor_parallel=2) == alone


@pytest.mark.slow
def test_two_groups_of_two_on_four_cpu_devices_equal_one_worker(tiny_model, tmp_path):
    manifest = media(tmp_path, videos=False)
    alone = run(tiny_model("llava"), manifest, tmp_path / "one")
    two = run(tiny_model("llava"), manifest, tmp_path / "two", tensor_parallel=2, devices=["cpu"] * 4)
    assert two == alone


@pytest.mark.slow
def test_a_rank_killed_mid_shard_costs_a_rerun_of_its_chunk_only(tiny_model, tmp_path, monkeypatch):
    """kill -9 of rank 1 of a group: its worker (rank 0) loses the group, the pool replaces the worker,
    and the shard resumes from its last chunk: every row exactly once, as without the kill."""
    manifest = media(tmp_path, videos=False)
    alone = run(tiny_model("llava"), manifest, tmp_path / "one")
    monkeypatch.setenv("LLAVA_BATCH_TP_KILL", f"1:12:{tmp_path / 'killed'}")
    rows = run(tiny_model("llava"), manifest, tmp_path / "tp", tensor_parallel=2, devices=["cpu"] * 4)
    assert (tmp_path / "killed").exists(), "the rank was not killed"
    assert rows == alone


@pytest.mark.parametrize("run_keys,message", [
    ({"tensor_parallel": 3}, "run.tensor_parallel must be 1, 2, 4 or 8"),
    ({"tensor_parallel": 8, "devices": ["cpu", "cpu"]}, "run.tensor_parallel = 8"),
    ({"tensor_parallel": 8, "devices": ["cpu"] * 8}, "does not divide the model's 4 attention heads"),
])
def test_what_cannot_be_sharded_is_exit_2_before_loading(tiny_model, tmp_path, capsys, run_keys, message):
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(write_image(tmp_path / "a.png", 1))]})
    sections = job_sections(tiny_model("llava"), manifest, tmp_path / "out", run=run_keys)
    assert main(["run", str(write_job(tmp_path / "job.toml", sections))]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llava-batch")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "_job.json").exists()


def test_a_rank_holds_its_share_of_the_language_model(tiny_model):
    """Each rank's language-model linears are 1/ws of the model's; the rest is replicated, and ranks
    above 0 hold no vision tower (rank 0 embeds the prompts)."""
    info = loader.inspect_model(ModelConfig(path=str(tiny_model("llava_next"))))
    cls = loader.MODEL_CLASSES[info.family]
    full = loader.load_model(info, torch.device("cpu"), torch.float32)

    def held(model, prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix) and p.device.type != "meta")

    layers = "model.language_model.layers."
    linears = sum(p.numel() for n, p in full.named_parameters() if n.startswith(layers) and n.endswith("proj.weight"))
    for world in (2, 4):
        shards = [load_shard(cls, info, torch.device("cpu"), torch.float32, Placement(r, world)) for r in range(world)]
        for rank, shard in enumerate(shards):
            mine = sum(p.numel() for n, p in shard.named_parameters() if n.startswith(layers) and n.endswith("proj.weight"))
            assert mine * world == linears
            assert held(shard, "model.vision_tower.") == (held(full, "model.vision_tower.") if rank == 0 else 0)
        # The shards together are the model: q rows and o columns laid back side by side.
        q = torch.cat([s.model.language_model.layers[0].self_attn.q_proj.weight for s in shards])
        o = torch.cat([s.model.language_model.layers[0].self_attn.o_proj.weight for s in shards], dim=1)
        assert torch.equal(q, full.model.language_model.layers[0].self_attn.q_proj.weight)
        assert torch.equal(o, full.model.language_model.layers[0].self_attn.o_proj.weight)


def test_a_missing_weight_shard_is_one_config_error(tiny_model, tmp_path, capsys):
    """A checkpoint in several safetensors files, one of them gone: exit 2, one line, before any load."""
    import shutil

    src, broken = tiny_model("llava"), tmp_path / "model"
    shutil.copytree(src, broken)
    model = loader.load_model(loader.inspect_model(ModelConfig(path=str(src))), torch.device("cpu"), torch.float32)
    for path in broken.glob("*.safetensors"):
        path.unlink()
    model.save_pretrained(broken, max_shard_size="200KB")
    shards = sorted(broken.glob("*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(write_image(tmp_path / "a.png", 1))]})
    sections = job_sections(broken, manifest, tmp_path / "out", run={"tensor_parallel": 2})
    assert main(["run", str(write_job(tmp_path / "job.toml", sections))]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llava-batch")]
    assert len(err) == 1 and shards[1].name in err[0], err


@pytest.mark.slow
def test_in_process_a_lost_rank_ends_the_run_with_one_line_and_a_rerun_finishes(tiny_model, tmp_path, monkeypatch,
                                                                                   capsys):
    """One group runs in the job's own process, which cannot replace itself: it says so and exits 1,
    and the rerun (the resume) captions what is left, every row once."""
    manifest = media(tmp_path, videos=False)
    alone = run(tiny_model("llava"), manifest, tmp_path / "one")
    monkeypatch.setenv("LLAVA_BATCH_TP_KILL", f"1:12:{tmp_path / 'killed'}")
    sections = job_sections(tiny_model("llava"), manifest, tmp_path / "tp", generation={"max_batch_size": 3},
                            run={"progress": False, "tensor_parallel": 2})
    job = write_job(tmp_path / "tp.toml", sections)
    assert main(["run", str(job)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llava-batch: error")]
    assert len(err) == 1 and "tensor parallel" in err[0] and "rerun" in err[0], err
    assert main(["run", str(job)]) == 0
    rows = ds.dataset(tmp_path / "tp" / "captions").to_table().to_pylist()
    assert sorted((r["row_index"], r["status"], r["caption"], r["n_output_tokens"]) for r in rows) == alone


@pytest.mark.slow
def test_w8a16_dirs_shard_the_same_way(tiny_model, tmp_path):
    """int8 weight rows (q/k/v, gate/up) or columns (o/down) with their per-row scales: ws 2 = ws 1."""
    w8 = tmp_path / "w8a16"
    assert main(["quantize", str(tiny_model("llava")), str(w8), "--backend", "builtin"]) == 0
    manifest = media(tmp_path, videos=False)
    alone = run(w8, manifest, tmp_path / "ws1")
    assert all(status == "ok" for _, status, _, _ in alone)
    assert run(w8, manifest, tmp_path / "ws2", tensor_parallel=2) == alone
    info = loader.inspect_model(ModelConfig(path=str(w8)))
    full = loader.load_model(info, torch.device("cpu"), torch.float32)
    shards = [load_shard(loader.MODEL_CLASSES[info.family], info, torch.device("cpu"), torch.float32,
                         Placement(r, 2)) for r in range(2)]
    down = [s.model.language_model.layers[1].mlp.down_proj for s in shards]
    assert torch.equal(torch.cat([d.weight for d in down], dim=1), full.model.language_model.layers[1].mlp.down_proj.weight)
    assert all(torch.equal(d.weight_scale, full.model.language_model.layers[1].mlp.down_proj.weight_scale) for d in down)


@pytest.mark.slow
@pytest.mark.parametrize("heads,worlds", [((8, 4), (4,)), ((8, 8), (8,))])
def test_grouped_kv_heads_and_eight_ranks(tiny_model, tmp_path, heads, worlds):
    """KV heads split with their query heads (GQA: 2 query heads a KV head), and the largest group."""
    model = tiny_model("llava", heads=heads)
    manifest = media(tmp_path, videos=False)
    alone = run(model, manifest, tmp_path / "ws1")
    for world in worlds:
        assert run(model, manifest, tmp_path / f"ws{world}", tensor_parallel=world) == alone, world
