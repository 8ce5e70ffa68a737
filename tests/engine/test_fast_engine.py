"""The fast engine against the oracle: transformers `generate` called by hand, row by row (fp32, greedy).

Rows differ in prompt length, image aspect ratio (LLaVA-NeXT tiling) and kind (videos); slot counts
run from 1 to 16, and counts below the number of rows make finished slots refill mid-batch.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline import devices
from pipeline.config import GenerationConfig, ModelConfig
from pipeline.data.media import decode_media
from pipeline.engine import decode_graphs, make_engine
from pipeline.engine.base import Request, Shared
from pipeline.engine.fast import FastEngine
from pipeline.engine.hf import HFEngine
from pipeline.model import decoder, loader, packed_linear
from pipeline.testing.demo import synthetic_image, write_video
from tests.model.test_npu_attention import make_stub

SIZES = [(96, 72), (72, 96), (128, 48), (80, 80), (64, 112), (100, 60), (48, 128), (90, 90)]
TEXTS = ["What is in the picture?", "Describe this image in one sentence.", "caption",
         "Please write a short detailed description of what is shown in this photo, one sentence."]
MAX_NEW = 24
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(tiny_model):
    cache = {}

    def get(family: str):
        if family not in cache:
            info = loader.inspect_model(ModelConfig(path=str(tiny_model(family))))
            processor = loader.load_processor(info)
            cache[family] = (info, processor, loader.load_model(info, CPU, torch.float32))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def plain_model(tiny_model):
    """The oracle's own copy of a model: the fast engine packs the linears of the one it runs on
    (pipeline/model/packed_linear.py), and transformers must be judged unpacked, as a user runs it."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = loader.load_model(loader.inspect_model(ModelConfig(path=str(tiny_model(family)))),
                                              CPU, torch.float32)
        return cache[family]

    return get


def make_requests(info, processor, tmp_path, n_images: int = 8, n_videos: int = 0) -> list[Request]:
    reqs = []
    for i in range(n_images):
        prompt = loader.build_prompt(processor, info, TEXTS[i % len(TEXTS)], "image")
        reqs.append(Request(i, prompt, "image", image=synthetic_image(20 + i, SIZES[i % len(SIZES)])))
    for j in range(n_videos):
        path = write_video(tmp_path / f"v{j}.mp4", n_frames=6 + 3 * j, seed=5 + j)
        with open(path, "rb") as f:
            frames = decode_media(f, video_frames=4).frames
        prompt = loader.build_prompt(processor, info, TEXTS[j % len(TEXTS)], "video")
        reqs.append(Request(100 + j, prompt, "video", frames=frames))
    return reqs


def oracle(model, processor, req: Request, max_new: int = MAX_NEW) -> tuple[str, int]:
    media = {"videos": [req.frames]} if req.kind == "video" else {"images": [req.image]}
    inputs = processor(text=[req.prompt], return_tensors="pt", **media)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stop = next((i for i, t in enumerate(new) if t == processor.tokenizer.eos_token_id), None)
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new) if stop is None else stop + 1


@pytest.mark.parametrize("family,slots,refill_at", [
    ("llava", 1, None), ("llava", 3, None), ("llava", 16, None),
    ("llava_next", 2, None), ("llava_next", 4, 3), ("llava_next", 16, None),
    ("llava_next_video", 3, None), ("llava_next_video", 16, None),
])
def test_token_exact_against_generate(family, slots, refill_at, loaded, plain_model, tmp_path):
    info, processor, model = loaded(family)
    reqs = make_requests(info, processor, tmp_path, n_videos=2 if family == "llava_next_video" else 0)
    gen = GenerationConfig(max_batch_size=slots, max_output_length=MAX_NEW)
    engine = FastEngine(model, processor, gen, CPU, refill_at=refill_at)  # 3 of 4: refill in groups
    results = engine.generate(reqs)
    assert not any(isinstance(m, packed_linear.PackedLinear) for m in plain_model(family).modules())
    for req, res in zip(reqs, results, strict=True):
        caption, n_out = oracle(plain_model(family), processor, req)
        assert res.error is None
        assert (res.caption, res.n_output_tokens) == (caption, n_out), f"row {req.row_index} ({req.kind})"
    lengths = {r.n_output_tokens for r in results}
    assert len(lengths) > 2, "rows must stop at different steps for refill to be exercised"
    assert len({r.n_prompt_tokens for r in results}) > 1, "rows must have different prompt lengths"
    if slots < len(reqs):
        assert engine.stats["steps"] < sum(r.n_output_tokens for r in results)
    if 1 < slots < len(reqs):  # one slot: nothing decodes while a refill prefills
        assert engine.stats["mixed_s"] > 0, "refills must have ridden in decode steps"


def shared_requests(info, processor, tmp_path, n_images: int, n_videos: int = 0) -> list[Request]:
    """Every media with three prompts (TEXTS[:3]), marked as sharing it, in the order a shard sends them."""
    out = []
    for base in make_requests(info, processor, tmp_path, n_images=n_images, n_videos=n_videos):
        media = {"image": base.image, "frames": base.frames}
        for j, text in enumerate(TEXTS[:3]):
            prompt = loader.build_prompt(processor, info, text, base.kind)
            out.append(Request(base.row_index * 10 + j, prompt, base.kind, **media,
                               shared=Shared(base.row_index, 3)))
    return out


@pytest.mark.parametrize("family,slots", [("llava", 4), ("llava", 16), ("llava_next", 5), ("llava_next_video", 7)])
def test_prompts_of_one_media_share_one_vision_pass_and_their_prefix(family, slots, loaded, plain_model, tmp_path):
    """Three prompts per media: the vision tower sees each media once, their common prefix (system
    text and media tokens) is prefilled once, and every caption is still transformers' own. With
    few slots groups are split across refills and ride in decode steps."""
    info, processor, model = loaded(family)
    reqs = shared_requests(info, processor, tmp_path, n_images=5, n_videos=2 if family == "llava_next_video" else 0)
    seen = []
    hook = model.model.vision_tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        engine = FastEngine(model, processor, GenerationConfig(max_batch_size=slots, max_output_length=MAX_NEW), CPU)
        results = engine.generate(reqs)
        alone = FastEngine(model, processor, GenerationConfig(max_batch_size=slots, max_output_length=MAX_NEW), CPU)
        seen_shared, seen[:] = sum(seen), []
        singles = alone.generate([replace(r, shared=None) for r in reqs[::3]])
    finally:
        hook.remove()
    assert seen_shared == sum(seen), "the vision tower must see each media once"
    assert engine.stats["media_encoded"] == len(reqs) // 3  # groups are never split with >= 3 slots
    assert engine.stats["shared_prefix_tokens"] > 0
    total = sum(r.n_prompt_tokens for r in results)
    assert engine.stats["prefill_tokens"] + engine.stats["shared_prefix_tokens"] == total
    assert [r.caption for r in results[::3]] == [r.caption for r in singles]
    for req, res in zip(reqs, results, strict=True):
        caption, n_out = oracle(plain_model(family), processor, req)
        assert res.error is None
        assert (res.caption, res.n_output_tokens) == (caption, n_out), f"request {req.row_index} ({req.kind})"
    assert len({r.caption for r in results}) > len(reqs) // 3, "prompts of one media must differ in caption"


def test_a_processor_the_preprocessing_shortcut_gets_wrong_is_run_per_prompt(loaded, plain_model, tmp_path,
                                                                           monkeypatch, caplog):
    """Checked once against the processor itself: when they differ, every prompt is preprocessed
    on its own (one warning), and captions stay transformers' own."""
    from pipeline.engine import multimodal

    info, processor, model = loaded("llava")
    reqs = shared_requests(info, processor, tmp_path, n_images=2)
    real = multimodal.encode_sharing
    monkeypatch.setattr(multimodal, "encode_sharing",
                        lambda proc, req, like: replace(real(proc, req, like), input_ids=like.input_ids))
    engine = FastEngine(model, processor, GenerationConfig(max_batch_size=6, max_output_length=MAX_NEW), CPU)
    with caplog.at_level("WARNING", logger="llava_batch"):
        results = engine.generate(reqs)
    assert sum("cannot share their preprocessing" in r.message for r in caplog.records) == 1
    assert engine.stats["media_encoded"] == len(reqs)  # no longer one pixel tensor per media
    for req, res in zip(reqs, results, strict=True):
        assert res.caption == oracle(plain_model("llava"), processor, req)[0]


@pytest.mark.parametrize("shared", [False, True], ids=["rows", "prompts-of-one-media"])
def test_a_failing_mixed_step_falls_back_to_separate_prefill_and_decode(shared, loaded, tmp_path, monkeypatch):
    """The new rows then prefill on their own (row by row when they must: a prompt apart from its
    source then prefills whole), and nothing is lost."""
    info, processor, model = loaded("llava")
    reqs = (shared_requests(info, processor, tmp_path, n_images=2) if shared
            else make_requests(info, processor, tmp_path, n_images=5))
    gen = GenerationConfig(max_batch_size=2, max_output_length=MAX_NEW)
    expected = FastEngine(model, processor, gen, CPU).generate(reqs)

    def broken(*args, **kwargs):
        raise RuntimeError("device said no")

    monkeypatch.setattr(decoder, "decode_and_prefill", broken)
    engine = FastEngine(model, processor, gen, CPU, refill_at=1)
    assert engine.generate(reqs) == expected
    assert engine.stats["mixed_s"] == 0 and engine.stats["prefill_s"] > 0


def test_steps_decode_only_the_live_rows(loaded, tmp_path, monkeypatch):
    """Rows are moved down as others finish, so a step is as wide as the live rows, and the moves
    (cache entries included) change no caption."""
    info, processor, model = loaded("llava_next")
    reqs = make_requests(info, processor, tmp_path, n_images=8)
    gen = GenerationConfig(max_batch_size=4, max_output_length=MAX_NEW)
    widths, step = [], decoder.decode_step

    def recording(lm, cache, tokens, *args):
        widths.append(len(tokens))
        return step(lm, cache, tokens, *args)

    monkeypatch.setattr(decoder, "decode_step", recording)
    results = FastEngine(model, processor, gen, CPU).generate(reqs)
    assert min(widths) < 4 and max(widths) == 4
    assert results == HFEngine(model, processor, gen, CPU).generate(reqs)


def test_without_compaction_every_step_is_full_width_and_nothing_changes(loaded, tmp_path, monkeypatch):
    """Compaction only saves work: with rows left where they are, empty slots ride along unread."""
    info, processor, model = loaded("llava")
    reqs = make_requests(info, processor, tmp_path, n_images=6)
    gen = GenerationConfig(max_batch_size=4, max_output_length=MAX_NEW)
    expected = FastEngine(model, processor, gen, CPU).generate(reqs)
    widths, step = [], decoder.decode_step

    def recording(lm, cache, tokens, *args):
        widths.append(len(tokens))
        return step(lm, cache, tokens, *args)

    monkeypatch.setattr(decoder, "decode_step", recording)
    engine = FastEngine(model, processor, gen, CPU)
    engine.compact = False
    assert engine.generate(reqs) == expected and set(widths) == {4}


@pytest.mark.parametrize("family,slots", [("llava", 5), ("llava_next", 7), ("llava_next_video", 6)])
def test_steps_padded_to_buckets_give_the_same_captions(family, slots, loaded, plain_model, tmp_path, monkeypatch):
    """generation.compile: every decode step runs at its batch bucket (the CPU has no graphs, so
    the padded step runs eagerly, as a captured one would replay it), through refills and compaction."""
    info, processor, model = loaded(family)
    reqs = make_requests(info, processor, tmp_path, n_images=9, n_videos=2 if family == "llava_next_video" else 0)
    gen = GenerationConfig(max_batch_size=slots, max_output_length=MAX_NEW)
    widths, live, step = [], [], decoder.decode_step

    def recording(lm, cache, tokens, *args):
        widths.append(len(tokens))
        return step(lm, cache, tokens, *args)

    engine = FastEngine(model, processor, gen, CPU, compile=True)
    assert engine.runner.graphs.sizes == decode_graphs.buckets(slots) and not engine.runner.graphs.captured
    run = engine.runner.graphs.run
    monkeypatch.setattr(engine.runner.graphs, "run", lambda tokens, positions: live.append(len(tokens)) or
                        run(tokens, positions))
    monkeypatch.setattr(decoder, "decode_step", recording)
    results = engine.generate(reqs)
    assert set(widths) <= set(decode_graphs.buckets(slots))
    assert any(w > n for w, n in zip(widths, live, strict=True)), "some steps must have been padded"
    assert engine.stats["mixed_steps"] > 0, "refills must have come in mid-batch"
    for req, res in zip(reqs, results, strict=True):
        assert (res.caption, res.n_output_tokens) == oracle(plain_model(family), processor, req), f"row {req.row_index}"


@pytest.mark.parametrize("compile", [False, True])
def test_decode_attention_through_the_npu_op_contract(compile, loaded, plain_model, tmp_path, monkeypatch):
    """The decode path Ascend takes (pipeline/model/npu_attention.py), the op a stub of its documented
    contract: host lengths when eager, the mask in the steps a graph would replay (padded to buckets)."""
    calls = []
    monkeypatch.setattr(devices, "torch_npu", lambda: make_stub(calls=calls))
    info, processor, model = loaded("llava_next")
    reqs = make_requests(info, processor, tmp_path, n_images=6)
    engine = FastEngine(model, processor, GenerationConfig(max_batch_size=3, max_output_length=MAX_NEW), CPU,
                        compile=compile)
    engine.cache.attention = "npu"
    results = engine.generate(reqs)
    host = [c["actual_seq_lengths_kv"] is not None for c in calls]
    # Eager steps (refill steps too, under compile) pass host lengths; the bucket steps a mask.
    assert calls and (not all(host) if compile else all(host))
    for req, res in zip(reqs, results, strict=True):
        assert (res.caption, res.n_output_tokens) == oracle(plain_model("llava_next"), processor, req)


def test_buckets():
    assert decode_graphs.buckets(1) == [1]
    assert decode_graphs.buckets(8) == [1, 2, 4, 8]
    assert decode_graphs.buckets(12) == [1, 2, 4, 8, 12]
    assert decode_graphs.buckets(209) == [1, 2, 4, 8, 16, 32, 64, 128, 209]
    assert [decode_graphs.bucket_for(n, [1, 2, 4, 8, 12]) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]


def test_sixteen_rows_sixteen_slots_match_hf_engine(loaded, tmp_path):
    """A full-width batch: the batched HF engine (left padded) and the fast engine agree."""
    info, processor, model = loaded("llava_next")
    reqs = make_requests(info, processor, tmp_path, n_images=16)
    gen = GenerationConfig(max_batch_size=16, max_output_length=MAX_NEW)
    assert FastEngine(model, processor, gen, CPU).generate(reqs) == HFEngine(model, processor, gen, CPU).generate(reqs)


def test_stream_yields_in_completion_order_from_a_lazy_iterator(loaded, tmp_path):
    info, processor, model = loaded("llava")
    reqs = make_requests(info, processor, tmp_path)
    engine = FastEngine(model, processor, GenerationConfig(max_batch_size=3, max_output_length=MAX_NEW), CPU)
    pulled = []

    def lazy():
        for r in reqs:
            pulled.append(r.row_index)
            yield r

    out = list(engine.generate_stream(lazy()))
    assert sorted(r.row_index for r, _ in out) == [r.row_index for r in reqs]
    expected = dict(zip([r.row_index for r in reqs], engine.generate(reqs), strict=True))
    assert all(res == expected[req.row_index] for req, res in out)
    order = [r.row_index for r, _ in out]
    assert order != sorted(order), "short captions should overtake long ones"


def test_upstream_error_propagates(loaded, tmp_path):
    info, processor, model = loaded("llava")
    reqs = make_requests(info, processor, tmp_path, n_images=2)
    engine = FastEngine(model, processor, GenerationConfig(max_batch_size=2, max_output_length=4), CPU)

    def broken():
        yield reqs[0]
        raise RuntimeError("manifest went away")

    with pytest.raises(RuntimeError, match="manifest went away"):
        list(engine.generate_stream(broken()))


def test_row_errors_do_not_stop_the_others(loaded, tmp_path):
    info, processor, model = loaded("llava")
    reqs = make_requests(info, processor, tmp_path, n_images=3)
    n_prompt = FastEngine(model, processor, GenerationConfig(max_output_length=1), CPU).generate(reqs[:1])[0]
    assert n_prompt.n_output_tokens == 1 and n_prompt.finish_reason in ("length", "stop")
    too_long = Request(7, reqs[0].prompt + " caption" * 50, "image", image=reqs[0].image)
    broken = Request(8, reqs[0].prompt, "image", image=None)
    gen = GenerationConfig(max_batch_size=2, max_output_length=8, max_input_length=n_prompt.n_prompt_tokens + 10)
    results = FastEngine(model, processor, gen, CPU).generate([reqs[1], too_long, broken, reqs[2]])
    assert results[1].error.startswith("prompt too long")
    assert results[2].error
    assert results[0].caption is not None and results[3].caption is not None


def test_ignore_eos_runs_every_row_to_the_length(loaded, tmp_path):
    info, processor, model = loaded("llava")
    reqs = make_requests(info, processor, tmp_path, n_images=4)
    engine = FastEngine(model, processor, GenerationConfig(max_batch_size=4, max_output_length=30), CPU,
                        ignore_eos=True)
    engine.generate(reqs)
    assert engine.stats["generated_tokens"] == 4 * 30


def test_sampling_is_per_row_so_slot_count_does_not_change_it(loaded, tmp_path):
    info, processor, model = loaded("llava")
    reqs = make_requests(info, processor, tmp_path, n_images=5)
    gen = dict(max_output_length=12, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    one = FastEngine(model, processor, GenerationConfig(max_batch_size=1, **gen), CPU).generate(reqs)
    four = FastEngine(model, processor, GenerationConfig(max_batch_size=4, **gen), CPU).generate(reqs)
    assert one == four
    greedy = FastEngine(model, processor, GenerationConfig(max_batch_size=4, max_output_length=12), CPU)
    assert greedy.generate(reqs) != one


def test_make_engine_picks_fast_and_keeps_hf(loaded):
    info, processor, model = loaded("llava")
    assert isinstance(make_engine(model, processor, GenerationConfig(), CPU), FastEngine)
    assert isinstance(make_engine(model, processor, GenerationConfig(engine="hf"), CPU), HFEngine)


def test_w8a16_model_matches_hf_engine(tiny_model, tmp_path):
    """W8A16Linear drop-ins run inside the fast decoder unchanged: same captions as the HF engine."""
    quant = pytest.importorskip("quant")
    from quant.linear import W8A16Linear

    qdir = quant.quantize(tiny_model("llava_next"), tmp_path / "w8a16", backend="builtin")
    info = loader.inspect_model(ModelConfig(path=str(qdir)))
    processor = loader.load_processor(info)
    model = loader.load_model(info, CPU, torch.float32)
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, W8A16Linear)
    reqs = make_requests(info, processor, tmp_path, n_images=6)
    gen = GenerationConfig(max_batch_size=3, max_output_length=MAX_NEW)
    fast = FastEngine(model, processor, gen, CPU).generate(reqs)
    assert fast == [HFEngine(model, processor, gen, CPU).generate([r])[0] for r in reqs]
    assert len({r.caption for r in fast}) > 3


def test_bf16_runs_packed_with_a_bf16_cache_and_agrees_mostly(tiny_model, tmp_path):
    """bf16 is not held to token-exactness (rounding differs from padded batches), only to sense.
    On the CPU its linears are packed where this CPU's oneDNN packs bf16 (else plain), and the cache
    is bf16 (our decode kernel reads it)."""
    info = loader.inspect_model(ModelConfig(path=str(tiny_model("llava"))))
    processor = loader.load_processor(info)
    model = loader.load_model(info, CPU, torch.bfloat16)
    reqs = make_requests(info, processor, tmp_path, n_images=8)
    gen = GenerationConfig(max_batch_size=3, max_output_length=MAX_NEW)
    engine = FastEngine(model, processor, gen, CPU)
    assert engine.cache.data.dtype == torch.bfloat16
    assert isinstance(model.lm_head, packed_linear.PackedLinear) == packed_linear.onednn_packs(torch.bfloat16)
    fast = engine.generate(reqs)
    hf = [HFEngine(model, processor, gen, CPU).generate([r])[0] for r in reqs]
    assert all(r.error is None for r in fast)
    assert sum(a.caption.split()[:3] == b.caption.split()[:3] for a, b in zip(fast, hf, strict=True)) >= 6


def test_a_refused_graph_capture_falls_back_to_eager(loaded, tmp_path, monkeypatch, caplog):
    """A device whose graph runtime raises at capture still captions every row, eagerly, saying why."""
    from pipeline.engine import runner

    def refused(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "DecodeGraphs", refused)
    info, processor, model = loaded("llava")
    reqs = make_requests(info, processor, tmp_path, n_images=4)
    gen = GenerationConfig(max_batch_size=2, max_output_length=MAX_NEW)
    engine = FastEngine(model, processor, gen, CPU, compile=True)
    assert engine.runner.graphs is None and "graph capture failed" in caplog.text
    assert engine.generate(reqs) == FastEngine(model, processor, gen, CPU).generate(reqs)
