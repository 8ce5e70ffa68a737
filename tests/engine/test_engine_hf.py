"""The reference engine's row-level failure handling: long prompts and device OOM on a batch."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.engine.base import Request
from pipeline.engine.hf import HFEngine
from pipeline.model.inspect import inspect_model
from pipeline.model.loader import MODEL_CLASSES, load_processor
from pipeline.testing.demo import synthetic_image


@pytest.fixture(scope="module")
def engine_parts(tiny_model):
    path = tiny_model("llava")
    info = inspect_model(ModelConfig(path=str(path)))
    processor = load_processor(info)
    model = MODEL_CLASSES["llava"].from_pretrained(path, dtype=torch.float32).eval()
    requests = [Request(i, "USER: <image>\nDescribe. ASSISTANT:", "image", image=synthetic_image(300 + i))
                for i in range(5)]
    return model, processor, requests


def test_oom_batches_are_split_in_halves_before_rows_error(engine_parts, monkeypatch):
    model, processor, requests = engine_parts
    engine = HFEngine(model, processor, GenerationConfig(max_output_length=12), torch.device("cpu"))
    expected = [r.caption for r in engine.generate(requests)]
    real, sizes = model.generate, []

    def generate_that_fits_two(**kw):
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(**kw)

    monkeypatch.setattr(model, "generate", generate_that_fits_two)
    results = engine.generate(requests)
    assert [r.caption for r in results] == expected and all(r.error is None for r in results)
    assert sizes == [5, 2, 3, 1, 2], "5 -> 2 + 3 -> 2 + (1 + 2): halves until a batch fits"

    def generate_never_fits(**kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "generate", generate_never_fits)
    results = engine.generate(requests[:2])
    assert all(r.error.startswith("device out of memory") for r in results)


def test_rows_over_max_input_length_are_errors_the_rest_generate(engine_parts):
    model, processor, requests = engine_parts
    engine = HFEngine(model, processor, GenerationConfig(max_output_length=8, max_input_length=20),
                      torch.device("cpu"))
    long = Request(99, "USER: <image>\n" + "describe the picture " * 10 + "ASSISTANT:", "image",
                   image=requests[0].image)
    results = engine.generate([requests[0], long, requests[1]])
    assert results[1].error.startswith("prompt too long") and results[1].n_prompt_tokens > 20
    assert results[0].error is None and results[2].error is None


def test_stream_runs_batches_and_a_failing_batch_row_by_row(engine_parts, monkeypatch):
    model, processor, requests = engine_parts
    engine = HFEngine(model, processor, GenerationConfig(max_output_length=8, max_batch_size=2), torch.device("cpu"))
    expected = [engine.generate(requests[i:i + 2]) for i in range(0, 5, 2)]
    assert [res for _, res in engine.generate_stream(iter(requests))] == [r for batch in expected for r in batch]
    real = engine.generate

    def fails_with_row_2(batch):
        if any(r.row_index == 2 for r in batch):
            raise ValueError("bad pixels")
        return real(batch)

    monkeypatch.setattr(engine, "generate", fails_with_row_2)
    out = {req.row_index: res for req, res in engine.generate_stream(requests)}
    assert out[2].error == "generation failed: ValueError: bad pixels"
    assert out[3] == engine.generate([requests[3]])[0] and out[0] == expected[0][0]
