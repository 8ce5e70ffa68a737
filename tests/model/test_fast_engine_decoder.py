"""The decoder functions against the transformers language model on configs the tiny models lack:
grouped-query attention, rope scaling, Mistral's sliding window, a long and a short row together;
our CPU kernels (decode attention, RMSNorm, rope) and torch's SDPA with transformers'
modules (what accelerators run)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
)

from pipeline import devices
from pipeline.kernels import cpu as cpu_kernels
from pipeline.model import decoder
from pipeline.model.kv_cache import KVCache, window_for
from tests.model.test_npu_attention import make_stub

TEXT = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama-gqa-linear-rope": LlamaConfig(**TEXT, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 10000.0}),
    "llama-llama3-rope": LlamaConfig(**TEXT, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral-sliding": MistralConfig(**TEXT, sliding_window=6),
}


@pytest.fixture(params=["ours", "torch", "npu"])
def kernels(request, monkeypatch):
    """Our CPU kernels, torch's ops, or Ascend's decode attention (a stub of the op's contract)."""
    if request.param == "ours":
        assert cpu_kernels.available(), "our CPU kernels did not build"
    else:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    if request.param == "npu":
        monkeypatch.setattr(devices, "torch_npu", lambda: make_stub())
        made = KVCache.__post_init__

        def npu_cache(self):
            made(self)
            self.attention = "npu"

        monkeypatch.setattr(KVCache, "__post_init__", npu_cache)
    return request.param


def build(text_config) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    config = LlavaConfig(text_config=text_config, vision_config=vision, image_token_index=3)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # default init is too flat to separate positions; widen it
        for p in model.model.language_model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    return model


def reference_logits(model, embeds: torch.Tensor) -> torch.Tensor:
    """Logits at every position of one unpadded row, by the transformers language model."""
    out = model.model.language_model(inputs_embeds=embeds[None]).last_hidden_state
    return model.lm_head(out)[0]


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.inference_mode()
def test_prefill_and_decode_match_transformers(name, kernels):
    model = build(CONFIGS[name])
    lengths, steps = [11, 4], 9
    full = [torch.randn(n + steps, TEXT["hidden_size"]) for n in lengths]
    expected = [reference_logits(model, x) for x in full]  # before the decoder packs the linears
    lm = decoder.language_model(model)
    cache = KVCache.allocate(len(lm.layers), 3, lm.kv_heads, 40, lm.head_dim, torch.float32, torch.device("cpu"))
    # Prefill both rows (right padded) into slots 2 and 0; slot 1 stays idle.
    prompts = torch.nn.utils.rnn.pad_sequence([x[:n] for x, n in zip(full, lengths, strict=True)], batch_first=True)
    logits = decoder.prefill(lm, cache, prompts, torch.tensor(lengths), torch.tensor([2, 0]))
    for i, n in enumerate(lengths):
        torch.testing.assert_close(logits[i], expected[i][n - 1], rtol=1e-4, atol=1e-4)
    # Decode: feed each row's own next input embedding through the embedding table's place.
    for t in range(steps):
        pos = torch.tensor([lengths[1] + t, 0, lengths[0] + t])
        rows = {2: full[0][lengths[0] + t], 0: full[1][lengths[1] + t]}
        embed = lm.embed
        table = torch.zeros(3, TEXT["hidden_size"])
        for slot, x in rows.items():
            table[slot] = x
        object.__setattr__(lm, "embed", lambda ids, table=table: table[:, None])  # inject the embeddings
        # Host lengths every other step: the npu op's eager mode, then its captured (mask) mode.
        host = (pos + 1).tolist() if t % 2 else None
        out = decoder.decode_step(lm, cache, torch.zeros(3, dtype=torch.long), pos, window_for(int(pos.max()), 40),
                                  host)
        object.__setattr__(lm, "embed", embed)
        torch.testing.assert_close(out[2], expected[0][lengths[0] + t], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[0], expected[1][lengths[1] + t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.inference_mode()
def test_decode_with_prompts_riding_along_matches_separate_passes(name, kernels):
    """decode_and_prefill = decode_step for the live slots + prefill of the new rows, cache included;
    prompts of one length share their attention call."""
    model = build(CONFIGS[name])
    lm = decoder.language_model(model)
    torch.manual_seed(1)
    apart = KVCache.allocate(len(lm.layers), 6, lm.kv_heads, 48, lm.head_dim, torch.float32, torch.device("cpu"))
    apart.data.normal_()
    mixed = KVCache(apart.data.clone())
    tokens, positions = torch.randint(0, TEXT["vocab_size"], (6,)), torch.tensor([9, 0, 14, 3, 0, 0])
    prompts = [torch.randn(m, TEXT["hidden_size"]) for m in (7, 7, 12)]
    free, live = [1, 5, 4], [0, 2, 3]
    window = window_for(int(positions.max()), 48)
    step = decoder.decode_step(lm, apart, tokens, positions, window)
    first = torch.cat([decoder.prefill(lm, apart, p[None], torch.tensor([len(p)]), torch.tensor([s]))
                       for p, s in zip(prompts, free, strict=True)])
    step_mixed, first_mixed = decoder.decode_and_prefill(lm, mixed, tokens, positions, window, prompts,
                                                         torch.tensor(free))
    torch.testing.assert_close(step_mixed[live], step[live], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first_mixed, first, rtol=1e-4, atol=1e-4)
    for slot, n in [(0, 10), (2, 15), (3, 4), (1, 7), (5, 7), (4, 12)]:  # what later steps will read
        torch.testing.assert_close(mixed.data[:, :, slot, :, :n], apart.data[:, :, slot, :, :n])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("decoding", [True, False], ids=["with-decode-rows", "prompts-only"])
@torch.inference_mode()
def test_rest_of_a_prompt_over_a_shared_prefix_equals_the_whole_prompt(name, decoding, kernels):
    """Prompts of one media share their first tokens: the rest of a prompt run over the source slot's
    prefix (in the same call as the source, or after it), then the prefix copied over, gives the
    logits and cache of prefilling the whole prompt."""
    model = build(CONFIGS[name])
    lm = decoder.language_model(model)
    torch.manual_seed(2)
    hidden = TEXT["hidden_size"]
    a, a2 = torch.randn(12, hidden), torch.randn(12, hidden)
    b = torch.cat([a[:8], torch.randn(5, hidden)])  # shares 8 tokens with a (past mistral's window of 6)
    c = torch.cat([a[:8], torch.randn(3, hidden)])
    b2 = torch.cat([a2[:8], torch.randn(5, hidden)])  # a rest of b's shape over another source: one call
    ref = KVCache.allocate(len(lm.layers), 8, lm.kv_heads, 48, lm.head_dim, torch.float32, torch.device("cpu"))
    ref.data.normal_()
    cache = KVCache(ref.data.clone())
    whole = [decoder.prefill(lm, ref, p[None], torch.tensor([len(p)]), torch.tensor([s]))[0]
             for p, s in ((a, 1), (b, 4), (c, 5), (a2, 6), (b2, 7))]
    tokens = torch.randint(0, TEXT["vocab_size"], (3,) if decoding else (0,))
    positions = torch.tensor([9, 0, 14])[:len(tokens)]
    window = window_for(14, 48)
    _, first = decoder.decode_and_prefill(lm, cache, tokens, positions, window, [a, b[8:], c[8:], a2, b2[8:]],
                                          torch.tensor([1, 4, 5, 6, 7]),
                                          prefixes=[(-1, 0), (1, 8), (1, 8), (-1, 0), (6, 8)])
    for src, dst in ((1, 4), (1, 5), (6, 7)):
        cache.move(src, dst, 8)
    for got, want in zip(first, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for slot, n in ((1, 12), (4, 13), (5, 11), (6, 12), (7, 13)):
        torch.testing.assert_close(cache.data[:, :, slot, :, :n], ref.data[:, :, slot, :, :n], rtol=1e-5, atol=1e-5)
    # the source already in the cache, from an earlier step (the decode rows above wrote inside its prefix)
    _, later = decoder.decode_and_prefill(lm, cache, tokens[:0], positions[:0], window, [c[8:]],
                                          torch.tensor([3]), prefixes=[(4, 8)])
    torch.testing.assert_close(later[0], whole[2], rtol=1e-4, atol=1e-4)


def test_other_text_models_are_refused():
    from transformers import Qwen2Config

    model = build(Qwen2Config(**TEXT))
    with pytest.raises(ValueError, match="qwen2"):
        decoder.language_model(model)
