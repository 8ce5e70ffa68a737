"""The Llama-family decoder (Llama / Vicuna, Mistral, Yi) over a static KV cache, as pure functions.

Only the attention wiring is ours. Every weight is the Hugging Face module's own (RMSNorms, the rotary
embedding with the checkpoint's rope scaling, o/down projections and lm_head through their modules), so
a W8A16Linear swapped in for an nn.Linear runs here unchanged, and numerics follow transformers step
for step. The liberties: q/k/v and gate/up are each read as one matmul when they are plain
nn.Linear (pipeline/model/fused_linear.py); bf16 and fp32 linears on the CPU are packed for oneDNN
(pipeline/model/packed_linear.py: bf16 bit-identical, fp32 to rounding); on the CPU decode attention, RMSNorm and rope are our
kernels (pipeline/kernels/cpu.py, pipeline/model/layer_ops.py), on Ascend decode attention is torch_npu's
fused op (pipeline/model/npu_attention.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn

from pipeline.kernels import cpu as cpu_kernels
from pipeline.model import layer_ops, npu_attention
from pipeline.model.fused_linear import Projections, fuse, pack_single
from pipeline.model.kv_cache import KVCache, attention_dims
from pipeline.model.layer_ops import Norm


@dataclass(frozen=True)
class Block:
    """One decoder layer, with its q/k/v and gate/up projections each callable as one, and its norms."""

    layer: nn.Module
    qkv: Projections
    gate_up: Projections
    input_norm: Norm  # pipeline/model/layer_ops.py
    post_norm: Norm
    reduce: Callable[[torch.Tensor], torch.Tensor]  # sums a row-parallel output over the ranks (tensor parallel)


@dataclass(frozen=True)
class LanguageModel:
    """Handles on the modules of a LLaVA model's language model; holds no weights of its own."""

    embed: nn.Module
    layers: list[Block]
    norm: Norm
    rotary: nn.Module
    lm_head: nn.Module
    kv_heads: int  # this rank's
    head_dim: int
    sliding_window: int | None
    fused_ops: bool  # pipeline/model/layer_ops.py


SUPPORTED_TEXT_MODELS = ("llama", "mistral")


def check_supported(model: nn.Module) -> None:
    """ValueError for text models the fast engine does not run."""
    text = model.config.text_config
    if text.model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"fast engine runs {'/'.join(SUPPORTED_TEXT_MODELS)} language models, "
                         f"not {text.model_type!r}")


def language_model(model: nn.Module) -> LanguageModel:
    """The decoder of a Llava*ForConditionalGeneration, its projections fused (see fused_linear)."""
    check_supported(model)
    text = model.config.text_config
    lm = model.model.language_model
    _, kv_heads, head_dim = attention_dims(text)
    place = getattr(model, "tensor_parallel", None)  # pipeline/model/tensor_parallel.py
    world = place.world if place else 1
    kv_heads //= world
    reduce = _all_reduce if world > 1 else _identity
    fused = layer_ops.ours(model)
    blocks = []
    for layer in lm.layers:
        attn, mlp = layer.self_attn, layer.mlp
        pack_single(attn, "o_proj")
        pack_single(mlp, "down_proj")
        blocks.append(Block(layer, fuse(attn, ["q_proj", "k_proj", "v_proj"]), fuse(mlp, ["gate_proj", "up_proj"]),
                            layer_ops.norm(layer.input_layernorm, fused),
                            layer_ops.norm(layer.post_attention_layernorm, fused), reduce))
    pack_single(model, "lm_head")
    return LanguageModel(lm.embed_tokens, blocks, layer_ops.norm(lm.norm, fused), lm.rotary_emb, model.lm_head,
                         kv_heads, head_dim, getattr(text, "sliding_window", None), fused)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(x)
    return x


# attend(layer index, q, k, v, rope) -> [batch, seq, heads * head_dim]: q, k, v [batch, seq, heads,
# head_dim] as projected; rope = (cos, sin) [batch, seq, head_dim], for attend to apply (see _rotated).
Rope = tuple[torch.Tensor, torch.Tensor]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, Rope], torch.Tensor]


def _layer(index: int, block: Block, x: torch.Tensor, rope: Rope, attend: Attend) -> torch.Tensor:
    layer = block.layer
    attn, mlp = layer.self_attn, layer.mlp
    shape = (*x.shape[:2], -1, attn.head_dim)
    q, k, v = (t.view(shape) for t in block.qkv(block.input_norm(x)))
    x = x + block.reduce(attn.o_proj(attend(index, q, k, v, rope)))
    gate, up = block.gate_up(block.post_norm(x))
    return x + block.reduce(mlp.down_proj(mlp.act_fn(gate) * up))  # LlamaMLP.forward, on the fused gate/up


def _run(lm: LanguageModel, x: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
    rope = lm.rotary(x, positions)
    for i, block in enumerate(lm.layers):
        x = _layer(i, block, x, rope, attend)
    return x


def _rotated(lm: LanguageModel, q, k, v, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[batch, seq, heads, head_dim] as projected -> [batch, heads, seq, head_dim], rope applied."""
    q, k = layer_ops.rotate(q, k, *rope, lm.fused_ops)
    return q, k, v.transpose(1, 2)


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]."""
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _sdpa(q, k, v, mask, scale: float, causal: bool = False) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def prefill_mask(length: int, sliding_window: int | None, device) -> torch.Tensor | None:
    """None means plain causal (SDPA's fused path); a sliding window needs the explicit mask."""
    if not sliding_window or sliding_window >= length:
        return None
    i = torch.arange(length, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)


def decode_mask(positions: torch.Tensor, window: int, sliding_window: int | None) -> torch.Tensor:
    """[slots, 1, 1, window]: each slot sees its own cache positions 0..position (and its window)."""
    j = torch.arange(window, device=positions.device)[None, :]
    pos = positions[:, None]
    mask = j <= pos
    if sliding_window:
        mask &= j > pos - sliding_window
    return mask[:, None, None, :]


def prefill(lm: LanguageModel, cache: KVCache, embeds: torch.Tensor, lengths: torch.Tensor,
            slots: torch.Tensor) -> torch.Tensor:
    """Run right-padded prompts [n, seq, hidden] into cache `slots` [n]; logits of each last token [n, vocab].

    Right padding is exact under a causal mask: real tokens never see the pads after them, and
    the pads' cache entries lie beyond each row's length, where decode masks them out.
    """
    seq = embeds.shape[1]
    positions = torch.arange(seq, device=embeds.device)[None, :]
    mask = prefill_mask(seq, lm.sliding_window, embeds.device)

    def attend(i, q, k, v, rope):
        q, k, v = _rotated(lm, q, k, v, rope)
        cache.write_prefill(i, slots, k, v)
        scale = lm.layers[i].layer.self_attn.scaling
        return _merge_heads(_sdpa(q, k, v, mask, scale, causal=mask is None))

    x = _run(lm, embeds, positions, attend)
    last = x[torch.arange(x.shape[0], device=x.device), lengths - 1]
    return lm.lm_head(lm.norm(last))


def decode_step(lm: LanguageModel, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                window: int, lengths: list[int] | None = None) -> torch.Tensor:
    """One token for each of the first n slots: tokens, positions [n] -> logits [n, vocab].

    Eager callers pass the live rows only (the engine keeps them in slots [0, n)), and may pass
    `lengths`, the positions + 1 as host ints, for the npu attention op; captured graphs
    (pipeline/engine/decode_graphs.py) the slots of a batch bucket, the free ones among them
    computing garbage that nobody reads, and no host values.
    """
    x = lm.embed(tokens[:, None])
    x = _run(lm, x, positions[:, None], _step_attention(lm, cache, positions, window, lengths))
    return lm.lm_head(lm.norm(x[:, 0]))


def _step_attention(lm: LanguageModel, cache: KVCache, positions: torch.Tensor, window: int,
                    host_lengths: list[int] | None) -> Attend:
    """attend() for a decode step: each slot writes its token at its position, then reads its own
    positions. On the CPU with our kernel (pipeline/kernels/cpu.py) each slot reads up to its own
    length; on Ascend the fused inference attention op does (pipeline/model/npu_attention.py), given
    host lengths, else under a mask; otherwise SDPA reads the first `window` positions of every slot
    under a mask."""
    def scale(i: int) -> float:
        return lm.layers[i].layer.self_attn.scaling

    if cache.attention == "kernel":
        lengths = positions + 1
        return lambda i, q, k, v, rope: _attend_kernel(cache, i, q, k, v, rope, lengths, lm.sliding_window,
                                                       scale(i))
    if cache.attention == "npu":
        # Host lengths bound what is read; the mask is needed without them, or for a sliding window.
        full = None if host_lengths and not lm.sliding_window else npu_attention.npu_mask(
            decode_mask(positions, cache.max_len, lm.sliding_window))
        return lambda i, q, k, v, rope: _merge_heads(
            _attend_npu(cache, i, *_rotated(lm, q, k, v, rope), positions, host_lengths, full, scale(i)))
    mask = decode_mask(positions, window, lm.sliding_window)
    return lambda i, q, k, v, rope: _merge_heads(
        _attend_step(cache, i, *_rotated(lm, q, k, v, rope), positions, window, mask, scale(i)))


def _attend_step(cache: KVCache, layer: int, q, k, v, positions: torch.Tensor, window: int, mask,
                 scale: float) -> torch.Tensor:
    """Write one token per slot into the cache, then attend over the window."""
    cache.write_step(layer, positions, k, v)
    keys, values = cache.view(layer, window, positions.shape[0])
    # The cache may be wider than the model (fp32 on CPU, see devices.kv_cache_dtype).
    return _sdpa(q.to(keys.dtype), keys, values, mask, scale).to(q.dtype)


def _attend_npu(cache: KVCache, layer: int, q, k, v, positions: torch.Tensor, lengths: list[int] | None,
                mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Write one token per slot into the cache, then the npu op over each slot's whole cache."""
    cache.write_step(layer, positions, k, v)
    keys, values = cache.layer(layer)
    n = positions.shape[0]
    return npu_attention.decode_attention(q, keys[:n], values[:n], scale=scale, lengths=lengths, mask=mask)


def _attend_kernel(cache: KVCache, layer: int, q, k, v, rope: Rope, lengths: torch.Tensor,
                   sliding_window: int | None, scale: float) -> torch.Tensor:
    """rope, the cache write and attention of a decode step in one call of our CPU kernel."""
    keys, values = cache.layer(layer)
    return cpu_kernels.decode_attention(q, k, v, keys, values, lengths, sliding_window, scale, rope)


def decode_and_prefill(lm: LanguageModel, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                       window: int, prompts: list[torch.Tensor], slots: torch.Tensor,
                       host_lengths: list[int] | None = None,
                       prefixes: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_step` for the first n slots (n may be 0) and the prefill of `prompts` ([n_i, hidden]
    each) into free `slots` (any index), in one pass over the weights.

    The prompts' tokens ride in the decode step's matmuls (M = slots + prompt tokens) instead of a
    pass of their own, so a freed slot can be refilled at once instead of waiting for company.
    Tokens are packed as [tokens, 1, hidden]: only attention tells decode rows from prompt rows.

    `prefixes[r] = (source slot, offset)` with offset > 0 makes prompt r the rest of a prompt whose
    first `offset` tokens are in the cache at the source slot (several prompts of one media share
    their image tokens): its tokens sit at positions offset.., attend to the source's first `offset`
    positions and to themselves, and go to its own slot from position offset on; the caller copies
    the prefix over afterwards (KVCache.move). A source may be a prompt of this same call: whole
    prompts write each layer's cache before the rest read it.
    Returns (decode logits [n, vocab], last-token logits of each prompt [len(prompts), vocab]).
    """
    n = tokens.shape[0]
    lengths = [p.shape[0] for p in prompts]
    offsets = [off for _, off in prefixes] if prefixes else [0] * len(prompts)
    starts = [n + sum(lengths[:r]) for r in range(len(prompts))]
    device = tokens.device
    x = torch.cat([lm.embed(tokens), *prompts])[:, None]
    pos = torch.cat([positions, *(torch.arange(off, off + m, device=device) for off, m in zip(offsets, lengths,
                                                                                               strict=True))])
    step_attend = _step_attention(lm, cache, positions, window, host_lengths) if n else None
    prompt_masks = {m: prefill_mask(m, lm.sliding_window, device) for m in set(lengths)}
    calls, order = _prompt_calls(lengths, offsets, prefixes, slots, device)

    def attend(i, q, k, v, rope):  # q, k, v [tokens, 1, heads, head_dim]
        scale = lm.layers[i].layer.self_attn.scaling
        # Idle slots write garbage at position 0 here; the prompt written next overwrites its slot's.
        out = [step_attend(i, q[:n], k[:n], v[:n], (rope[0][:n], rope[1][:n]))] if n else []
        q, k, v = _rotated(lm, q[n:], k[n:], v[n:], (rope[0][n:], rope[1][n:]))  # [tokens - n, heads, 1, head_dim]
        pieces = []
        for call in calls:
            qr, kr, vr = (t[call.rows].reshape(call.count, call.length, t.shape[1], -1).transpose(1, 2)
                          for t in (q, k, v))
            if call.offset:
                att = _attend_rests(cache, i, qr, kr, vr, call, lm.sliding_window, scale)
            else:
                cache.write_prefill(i, call.slots, kr, vr)
                mask = prompt_masks[call.length]
                att = _sdpa(qr, kr, vr, mask, scale, causal=mask is None)
            pieces.append(att.transpose(1, 2).reshape(call.count * call.length, 1, -1))
        packed = torch.cat(pieces)
        return torch.cat(out + [packed if order is None else packed[order]])

    x = _run(lm, x, pos[:, None], attend)[:, 0]
    last = torch.tensor([s + m - 1 for s, m in zip(starts, lengths, strict=True)], device=device)
    logits = lm.lm_head(lm.norm(torch.cat([x[:n], x[last]])))
    return logits[:n], logits[n:]


@dataclass(frozen=True)
class _PromptCall:
    """One attention call a layer makes for `count` prompts of `length` tokens each, from position
    `offset` on: whole prompts (offset 0), or rests over their `sources`' first `offset` positions."""

    rows: slice | torch.Tensor  # their tokens among the packed prompt tokens, prompt after prompt
    count: int
    length: int
    offset: int
    slots: torch.Tensor  # [count]: where their keys and values go
    sources: torch.Tensor | None  # [count]: rests only


def _prompt_calls(lengths: list[int], offsets: list[int], prefixes: list[tuple[int, int]] | None,
                  slots: torch.Tensor, device) -> tuple[list[_PromptCall], torch.Tensor | None]:
    """The prompts' attention calls: those of one (offset, length) together, whole prompts first
    (a rest's source may be one of them); and the permutation putting the calls' outputs back in
    token order (None when they already are)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for r in sorted(range(len(lengths)), key=lambda r: offsets[r] > 0):
        groups.setdefault((offsets[r], lengths[r]), []).append(r)
    first = [sum(lengths[:r]) for r in range(len(lengths))]
    calls, rows = [], []
    for (offset, length), members in groups.items():
        tokens = [t for r in members for t in range(first[r], first[r] + length)]
        contiguous = tokens == list(range(tokens[0], tokens[0] + len(tokens)))
        index = torch.tensor(members, device=device)
        sources = torch.tensor([prefixes[r][0] for r in members], device=device) if offset else None
        calls.append(_PromptCall(slice(tokens[0], tokens[-1] + 1) if contiguous else torch.tensor(tokens, device=device),
                                 len(members), length, offset, slots[index], sources))
        rows += tokens
    if rows == sorted(rows):
        return calls, None
    return calls, torch.argsort(torch.tensor(rows, device=device))


def _attend_rests(cache: KVCache, layer: int, q, k, v, call: _PromptCall, sliding_window: int | None,
                  scale: float) -> torch.Tensor:
    """Rests of prompts (q, k, v [count, heads, m, head_dim] at positions offset..) over their
    sources' first `offset` cache positions and themselves, causally; their k, v go to their slots."""
    m, offset = call.length, call.offset
    cache.write_at(layer, call.slots, offset, k, v)
    keys, values = cache.layer(layer)
    # The cache may be wider than the model (fp32 on CPU); the prefix was written from q's dtype.
    keys = torch.cat([keys[call.sources, :, :offset].to(q.dtype), k], dim=2)
    values = torch.cat([values[call.sources, :, :offset].to(q.dtype), v], dim=2)
    i = torch.arange(offset, offset + m, device=q.device)[:, None]
    j = torch.arange(offset + m, device=q.device)[None, :]
    mask = j <= i
    if sliding_window:
        mask &= j > i - sliding_window
    return _sdpa(q, keys, values, mask, scale)
