"""The oracle: captions from `llava-batch run` equal transformers `generate` called by hand (fp32, greedy)."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest
import torch
from transformers import AutoProcessor

from pipeline.config import load_job
from pipeline.data.media import decode_media
from pipeline.job import run_job
from pipeline.model.loader import MODEL_CLASSES
from pipeline.testing.demo import write_image, write_video
from pipeline.testing.jobs import job_sections, write_job, write_manifest

SIZES = [(96, 72), (72, 96), (128, 48), (80, 80), (64, 112), (100, 60)]
MAX_NEW = 24


def reference_caption(model, processor, path, kind: str, text: str, frames: int) -> tuple[str, str]:
    """What a user gets calling transformers by hand on the same decoded media and prompt."""
    with open(path, "rb") as f:
        media = decode_media(f, video_frames=frames)
    conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    media_kw = {"videos": [media.frames]} if kind == "video" else {"images": [media.image]}
    inputs = processor(text=[prompt], return_tensors="pt", **media_kw)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return prompt, processor.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("engine", ["fast", "hf"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_next_video"])
def test_captions_match_transformers_generate(family, engine, tiny_model, tmp_path):
    model_dir = tiny_model(family)
    media = tmp_path / "media"
    paths = [write_image(media / f"img{i}.png", seed=10 + i, size=s) for i, s in enumerate(SIZES)]
    kinds = ["image"] * len(paths)
    if family == "llava_next_video":
        paths += [write_video(media / "a.mp4", n_frames=10, seed=3), write_video(media / "b.mp4", n_frames=5, seed=4)]
        kinds += ["video", "video"]
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(p) for p in paths]})
    text = "What is in the picture?"
    job = write_job(tmp_path / "job.toml", job_sections(
        model_dir, manifest, tmp_path / "out", generation={"prompt": text, "max_output_length": MAX_NEW, "engine": engine}))
    summary = run_job(load_job(job))
    assert summary.ok == len(paths) and summary.errors == 0

    rows = sorted(ds.dataset(tmp_path / "out" / "captions").to_table().to_pylist(), key=lambda r: r["row_index"])
    processor = AutoProcessor.from_pretrained(model_dir)
    model = MODEL_CLASSES[family].from_pretrained(model_dir, dtype=torch.float32).eval()
    for row, path, kind in zip(rows, paths, kinds, strict=True):
        prompt, expected = reference_caption(model, processor, path, kind, text, frames=4)
        assert row["prompt"] == prompt
        assert row["caption"] == expected, f"row {row['row_index']} ({kind})"
        if kind == "video":
            assert row["frames"] == 4
    captions = [r["caption"] for r in rows]
    assert len(set(captions)) >= len(captions) - 1, "a tiny model whose captions are all the same proves nothing"
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert any(r["finish_reason"] == "stop" for r in rows)
