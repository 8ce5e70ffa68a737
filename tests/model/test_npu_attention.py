"""Decode attention through torch_npu.npu_fused_infer_attention_score, against a stub of its contract.

The stub implements the op's documented call contract (Ascend/op-plugin
docs/context/torch_npu-npu_fused_infer_attention_score.md, op_plugin_functions.yaml) in plain torch
for the one-token-query (IncreFlashAttention) branch with input_layout "BNSD": it refuses the calls
the op refuses or would answer wrongly, and computes what the op computes. One liberty: it takes fp32
(the op wants fp16/bf16) so the numerics can be checked tightly; `strict=True` takes that back.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from pipeline import devices
from pipeline.model.decoder import decode_mask
from pipeline.model.npu_attention import decode_attention, npu_mask

INT_MAX = 2147483647
# Every keyword of the op (op-plugin master), with its default. Those outside _MODELLED must stay
# at their default: the stub does not model quantization, paged attention, prefixes, rope splits.
OP_DEFAULTS = {
    **dict.fromkeys(
        ["pse_shift", "atten_mask", "actual_seq_lengths", "actual_seq_lengths_kv", "dequant_scale1",
         "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2", "antiquant_scale",
         "antiquant_offset", "key_antiquant_scale", "key_antiquant_offset", "value_antiquant_scale",
         "value_antiquant_offset", "block_table", "query_padding_size", "kv_padding_size",
         "key_shared_prefix", "value_shared_prefix", "actual_shared_prefix_len", "query_rope",
         "key_rope", "key_rope_antiquant_scale"]),
    "num_heads": 1, "scale": 1.0, "pre_tokens": INT_MAX, "next_tokens": INT_MAX, "input_layout": "BSH",
    "num_key_value_heads": 0, "sparse_mode": 0, "inner_precise": 0, "block_size": 0, "antiquant_mode": 0,
    "key_antiquant_mode": 0, "value_antiquant_mode": 0, "softmax_lse_flag": False,
}
_MODELLED = {"atten_mask", "actual_seq_lengths_kv", "num_heads", "scale", "input_layout",
             "num_key_value_heads", "inner_precise", "softmax_lse_flag"}


class ContractError(ValueError):
    """A call the real op would refuse, or answer with something other than attention."""


def _refuse(ok: bool, why: str) -> None:
    if not ok:
        raise ContractError(why)


def _is_int(x) -> bool:
    return type(x) is int


def fused_infer_attention_score(query, key, value, *, strict: bool = False, **kwargs):
    """The op for query S = 1, layout BNSD: (attention_out [B, N, 1, D], softmax_lse)."""
    unknown = set(kwargs) - set(OP_DEFAULTS)
    if unknown:  # what the torch_npu binding does with a misspelt keyword (e.g. scale_value)
        raise TypeError(f"npu_fused_infer_attention_score() got unexpected keyword(s) {sorted(unknown)}")
    a = {**OP_DEFAULTS, **kwargs}
    for name in set(OP_DEFAULTS) - _MODELLED:
        if a[name] != OP_DEFAULTS[name]:
            # actual_seq_lengths, pre/next_tokens, sparse_mode do nothing for S = 1 (BNSD): passing them
            # means the caller expects an effect the op will not have.
            raise ContractError(f"{name} is not modelled / has no effect for a one-token query")

    _refuse(a["input_layout"] == "BNSD", f"stub models input_layout 'BNSD' only, got {a['input_layout']!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _refuse(isinstance(t, torch.Tensor) and t.dim() == 4, f"{name} must be a 4-D tensor (BNSD)")
        _refuse(t.is_contiguous(), f"{name} must be contiguous")
    b, n, s_q, d = query.shape
    _refuse(s_q == 1, "stub models the IncreFlashAttention branch (query S = 1) only")
    _refuse(key.shape == value.shape, "key and value shapes must match")
    _, n_kv, s_kv, d_kv = key.shape
    _refuse(key.shape[0] == b and d_kv == d, f"key {tuple(key.shape)} does not fit query {tuple(query.shape)}")
    _refuse(b <= 65536 and n <= 256 and s_kv <= 262144 and d <= 512, "B/N/S/D beyond the op's limits")

    dtypes = (torch.float16, torch.bfloat16) if strict else (torch.float16, torch.bfloat16, torch.float32)
    _refuse(query.dtype in dtypes, f"query dtype {query.dtype} not supported")
    _refuse(key.dtype == value.dtype == query.dtype, "key/value dtype must be query's (no antiquant here)")

    heads, kv_heads = a["num_heads"], a["num_key_value_heads"] or a["num_heads"]
    _refuse(_is_int(heads) and heads == n, f"num_heads={heads!r} but query has N={n} (BNSD)")
    _refuse(_is_int(kv_heads) and kv_heads == n_kv, f"num_key_value_heads={a['num_key_value_heads']!r} "
            f"but key has N={n_kv} (0 means num_heads)")
    _refuse(heads % kv_heads == 0 and heads // kv_heads <= 64, "num_heads must be a multiple of kv heads, <= 64x")
    scale = a["scale"]
    _refuse(isinstance(scale, (int, float)) and not isinstance(scale, bool), "scale must be a float")
    _refuse(a["inner_precise"] in (0, 1), "inner_precise must be 0 or 1 for a one-token query")

    valid = torch.ones(b, 1, 1, s_kv, dtype=torch.bool)
    lengths = a["actual_seq_lengths_kv"]
    if lengths is not None:
        _refuse(isinstance(lengths, (list, tuple)) and all(_is_int(x) for x in lengths),
                f"actual_seq_lengths_kv must be a host list of ints, got {type(lengths).__name__}")
        _refuse(len(lengths) == 1 or len(lengths) >= b, "actual_seq_lengths_kv: 1 or >= B entries")
        lengths = list(lengths) * b if len(lengths) == 1 else list(lengths[:b])
        _refuse(all(0 <= x <= s_kv for x in lengths), f"actual_seq_lengths_kv beyond S_kv={s_kv}")
        valid &= (torch.arange(s_kv) < torch.tensor(lengths)[:, None])[:, None, None, :]
    mask = a["atten_mask"]
    if mask is not None:
        _refuse(isinstance(mask, torch.Tensor) and mask.dtype in (torch.bool, torch.int8, torch.uint8),
                f"atten_mask must be bool/int8/uint8 (1 = masked out), got {getattr(mask, 'dtype', mask)}")
        _refuse(mask.is_contiguous(), "atten_mask must be contiguous")
        aligned = {s_kv, -(-s_kv // 16) * 16, -(-s_kv // 32) * 32}
        _refuse(tuple(mask.shape[:-1]) in ((b,), (b, 1), (b, 1, 1)) and mask.shape[-1] in aligned,
                f"atten_mask for S = 1 must be [B, S_kv], [B, 1, S_kv] or [B, 1, 1, S_kv], got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            _refuse(bool(((mask == 0) | (mask == 1)).all()), "an int atten_mask holds 0 and 1 only")
        valid &= ~mask.bool().reshape(b, 1, 1, -1)[..., :s_kv]
    # A row with nothing to attend to: the op's output is undefined there (no row-invalid
    # correction for S = 1). An SDPA-convention mask passed as is usually ends up here or wrong.
    _refuse(bool(valid.any(-1).all()), "a slot has no position left to attend to")

    compute = torch.float32 if query.dtype != torch.float64 else query.dtype
    k = key.to(compute).repeat_interleave(heads // kv_heads, dim=1)  # q head h reads kv head h // group
    v = value.to(compute).repeat_interleave(heads // kv_heads, dim=1)
    scores = (query.to(compute) @ k.transpose(-1, -2)) * scale  # [B, N, 1, S_kv]
    scores = scores.masked_fill(~valid, float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v).to(query.dtype)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True) if a["softmax_lse_flag"] else torch.zeros(1)
    return out, lse


def make_stub(strict: bool = False, calls: list | None = None):
    def op(query, key, value, **kwargs):
        if calls is not None:
            calls.append(kwargs)
        return fused_infer_attention_score(query, key, value, strict=strict, **kwargs)
    return types.SimpleNamespace(npu_fused_infer_attention_score=op)


@pytest.fixture
def stub(monkeypatch):
    calls = []
    monkeypatch.setattr(devices, "torch_npu", lambda: make_stub(calls=calls))  # devices.py hands torch_npu out
    return calls


# --- a layer's cache, the way the decoder holds it ---------------------------------------------

LAYERS, SLOTS, MAX_LEN, HEAD_DIM = 2, 6, 40, 16
POSITIONS = [0, 5, 17, 39]  # the first 4 slots; the last one writes at the cache's end


def _case(heads: int, kv_heads: int, dtype=torch.float32, seed: int = 0):
    """(q, cache data [layers, 2, slots, kv_heads, max_len, head_dim], positions): stale garbage, large,
    past each slot's length, so that any leak shows."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(LAYERS, 2, SLOTS, kv_heads, MAX_LEN, HEAD_DIM, generator=g)
    for slot, pos in enumerate(POSITIONS):
        data[:, :, slot, :, pos + 1:] = 1e3 * torch.randn(LAYERS, 2, kv_heads, MAX_LEN - pos - 1, HEAD_DIM,
                                                          generator=g)
    q = torch.randn(len(POSITIONS), heads, 1, HEAD_DIM, generator=g)
    return q.to(dtype), data.to(dtype), torch.tensor(POSITIONS)


def _sdpa(q, keys, values, sdpa_mask, scale):
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=sdpa_mask, scale=scale,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def _run(mode: str, q, keys, values, positions, sliding_window, scale):
    sdpa_mask = decode_mask(positions, keys.shape[2], sliding_window)
    if mode == "eager":
        lengths = [p + 1 for p in positions.tolist()]
        mask = npu_mask(sdpa_mask) if sliding_window else None
        return decode_attention(q, keys, values, scale=scale, lengths=lengths, mask=mask)
    return decode_attention(q, keys, values, scale=scale, mask=npu_mask(sdpa_mask))


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("sliding_window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("mode", ["eager", "captured"])
def test_matches_sdpa(stub, mode, heads, kv_heads, sliding_window):
    q, data, positions = _case(heads, kv_heads)
    layer, scale = 1, HEAD_DIM ** -0.5
    keys, values = data[layer, 0, :len(POSITIONS)], data[layer, 1, :len(POSITIONS)]
    want = _sdpa(q, keys, values, decode_mask(positions, MAX_LEN, sliding_window), scale)
    got = _run(mode, q, keys, values, positions, sliding_window, scale)
    assert got.shape == (len(POSITIONS), heads, 1, HEAD_DIM) and got.dtype == q.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # The garbage past each slot's length does not leak in: other garbage, the same answer, exactly.
    data2 = data.clone()
    for slot, pos in enumerate(POSITIONS):
        data2[:, :, slot, :, pos + 1:] = -data2[:, :, slot, :, pos + 1:] * 7
    again = _run(mode, q, data2[layer, 0, :len(POSITIONS)], data2[layer, 1, :len(POSITIONS)], positions,
                 sliding_window, scale)
    assert torch.equal(again, got)


@pytest.mark.parametrize("mode", ["eager", "captured"])
def test_the_call_made(stub, mode):
    """What reaches the op: BNSD, both head counts, host int lengths only when eager, never a
    window as pre_tokens (it does nothing for S = 1)."""
    q, data, positions = _case(8, 2)
    _run(mode, q, data[0, 0, :4], data[0, 1, :4], positions, None, 0.25)
    (call,) = stub
    assert call["input_layout"] == "BNSD" and call["num_heads"] == 8 and call["num_key_value_heads"] == 2
    assert call["scale"] == 0.25 and "pre_tokens" not in call and "next_tokens" not in call
    if mode == "eager":
        assert call["actual_seq_lengths_kv"] == [1, 6, 18, 40] and call["atten_mask"] is None
    else:
        assert call["actual_seq_lengths_kv"] is None
        assert call["atten_mask"].dtype == torch.bool and call["atten_mask"].shape == (4, 1, 1, MAX_LEN)


@pytest.mark.parametrize("q_dtype, cache_dtype", [(torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
def test_half_precision_under_the_strict_contract(monkeypatch, q_dtype, cache_dtype):
    """The real op takes fp16/bf16 only: q is cast to the cache's dtype, the answer back to q's."""
    monkeypatch.setattr(devices, "torch_npu", lambda: make_stub(strict=True))
    q, data, positions = _case(8, 2)
    keys, values = data[0, 0, :4], data[0, 1, :4]
    want = _sdpa(q, keys, values, decode_mask(positions, MAX_LEN, None), HEAD_DIM ** -0.5)
    keys, values = keys.to(cache_dtype), values.to(cache_dtype)
    got = decode_attention(q.to(q_dtype), keys, values, scale=HEAD_DIM ** -0.5,
                           lengths=[p + 1 for p in POSITIONS])
    assert got.dtype == q_dtype
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_npu_mask_is_the_inverse_convention():
    sdpa_mask = decode_mask(torch.tensor(POSITIONS), MAX_LEN, 7)
    mask = npu_mask(sdpa_mask)
    assert mask.dtype == torch.bool and mask.is_contiguous() and torch.equal(mask, ~sdpa_mask)
    with pytest.raises(ValueError, match="bool"):
        npu_mask(sdpa_mask.float())


# --- the stub is no rubber stamp ----------------------------------------------------------------

def _good_call():
    q, data, positions = _case(8, 2)
    keys, values = data[0, 0, :4], data[0, 1, :4]
    kwargs = dict(actual_seq_lengths_kv=[p + 1 for p in POSITIONS], num_heads=8, num_key_value_heads=2,
                  input_layout="BNSD", scale=0.25)
    return q, keys, values, kwargs


def _sdpa_convention_mask():
    return decode_mask(torch.tensor(POSITIONS), MAX_LEN, None)  # True = attend: the wrong way round


@pytest.mark.parametrize("change, error", [
    (lambda q, k, v, kw: kw.update(input_layout="BSH"), ContractError),
    (lambda q, k, v, kw: kw.pop("num_heads"), ContractError),
    (lambda q, k, v, kw: kw.pop("num_key_value_heads"), ContractError),  # GQA: 0 would mean 8 kv heads
    (lambda q, k, v, kw: kw.update(scale_value=0.25), TypeError),  # not the keyword's name
    (lambda q, k, v, kw: kw.update(actual_seq_lengths_kv=torch.tensor([1, 6, 18, 40])), ContractError),
    (lambda q, k, v, kw: kw.update(actual_seq_lengths_kv=[1, 6, 18, 41]), ContractError),
    (lambda q, k, v, kw: kw.update(actual_seq_lengths=[1, 1, 1, 1]), ContractError),  # the query's: no effect
    (lambda q, k, v, kw: kw.update(pre_tokens=7), ContractError),  # no effect for S = 1: no window
    (lambda q, k, v, kw: kw.update(atten_mask=torch.zeros(4, 1, 1, MAX_LEN)), ContractError),  # float
    (lambda q, k, v, kw: kw.update(atten_mask=torch.zeros(4, 8, 1, MAX_LEN, dtype=torch.bool)), ContractError),
    (lambda q, k, v, kw: kw.update(atten_mask=_sdpa_convention_mask()), ContractError),  # slot 3: all masked
], ids=["layout", "no-num_heads", "no-kv-heads", "scale_value", "tensor-lengths", "length>S", "q-lengths",
        "pre_tokens", "float-mask", "mask-shape", "sdpa-mask"])
def test_stub_refuses_a_wrong_call(change, error):
    q, keys, values, kwargs = _good_call()
    fused_infer_attention_score(q, keys, values, **kwargs)  # the call as it should be goes through
    change(q, keys, values, kwargs)
    with pytest.raises(error):
        fused_infer_attention_score(q, keys, values, **kwargs)


def test_stub_refuses_bad_tensors():
    q, keys, values, kwargs = _good_call()
    window = keys[:, :, :32]  # a window of the cache: not contiguous
    with pytest.raises(ContractError, match="contiguous"):
        fused_infer_attention_score(q, window, values[:, :, :32], **kwargs)
    with pytest.raises(ContractError, match="dtype"):
        fused_infer_attention_score(q, keys.half(), values.half(), **kwargs)
    with pytest.raises(ContractError, match="dtype"):
        fused_infer_attention_score(q, keys, values, strict=True, **kwargs)  # fp32: the real op's refusal


def test_stub_answers_an_sdpa_convention_mask_wrongly():
    """Where the unconverted mask leaves something to attend to, the answer is not attention."""
    q, keys, values, kwargs = _good_call()
    del kwargs["actual_seq_lengths_kv"]
    positions = torch.tensor([0, 5, 17, 30])
    sdpa_mask = decode_mask(positions, MAX_LEN, None)
    out, _ = fused_infer_attention_score(q, keys, values, atten_mask=sdpa_mask, **kwargs)
    want = _sdpa(q, keys, values, sdpa_mask, 0.25)
    assert not torch.allclose(out, want, atol=1e-2)


# --- decode_attention's own refusals ------------------------------------------------------------

def test_refuses_calls_that_would_read_stale_positions_or_copy_the_cache(stub):
    q, data, _ = _case(8, 2)
    keys, values = data[0, 0, :4], data[0, 1, :4]
    lengths = [p + 1 for p in POSITIONS]
    with pytest.raises(ValueError, match="lengths .* or a mask"):
        decode_attention(q, keys, values, scale=0.25)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(q, keys[:, :, :32], values[:, :, :32], scale=0.25, lengths=[1, 6, 18, 32])
    with pytest.raises(ValueError, match="host list"):
        decode_attention(q, keys, values, scale=0.25, lengths=torch.tensor(lengths))
    with pytest.raises(ValueError, match="host list"):
        decode_attention(q, keys, values, scale=0.25, lengths=lengths[:3])
    with pytest.raises(ValueError, match=r"\[1, 40\]"):
        decode_attention(q, keys, values, scale=0.25, lengths=[0, 6, 18, 40])
    with pytest.raises(ValueError, match="npu_mask"):  # an SDPA mask [n, 1, 1, S] of another width
        decode_attention(q, keys, values, scale=0.25, mask=torch.zeros(4, 1, 1, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv heads"):  # 6 query heads over 4 kv heads
        kv = torch.randn(4, 4, MAX_LEN, HEAD_DIM)
        decode_attention(torch.randn(4, 6, 1, HEAD_DIM), kv, kv, scale=0.25, lengths=lengths)
    assert stub == []  # none of these reached the op


def test_host_lengths_refused_while_compiling(stub, monkeypatch):
    q, data, _ = _case(8, 2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="baked"):
        decode_attention(q, data[0, 0, :4], data[0, 1, :4], scale=0.25, lengths=[1, 6, 18, 40])


def test_no_torch_npu_no_call():
    """Off Ascend (this host), npu_ops() says so instead of failing somewhere inside."""
    q, data, _ = _case(4, 4)
    if devices.torch_npu() is not None:
        pytest.skip("this host has torch_npu")
    with pytest.raises(RuntimeError, match="torch_npu"):
        decode_attention(q, data[0, 0, :4], data[0, 1, :4], scale=0.25, lengths=[1, 6, 18, 40])
