"""W8A16: builtin converter, on-disk layout, name schemes, refusals, W8A16Linear kernels, loading."""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import quant
from pipeline import devices
from pipeline.testing.jobs import read_tensors
from quant import names, st_io
from quant.linear import W8A16Linear
from quant.qmath import quantize_rows

LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def src(tiny_model):
    return tiny_model("llava")


@pytest.fixture(scope="module")
def qdir(src, tmp_path_factory):
    return quant.quantize(src, tmp_path_factory.mktemp("q") / "w8a16", backend="builtin")


# --- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy, hf", [
    ("language_model.model.layers.3.mlp.up_proj.weight", "model.language_model.layers.3.mlp.up_proj.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias", "model.vision_tower.encoder.layers.0.mlp.fc1.bias"),
    ("multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.weight"),
    ("image_newline", "model.image_newline"),
])
def test_name_schemes_round_trip(legacy, hf):
    assert names.to_hf(legacy) == hf and names.to_hf(hf) == hf
    assert names.to_scheme(hf, "legacy") == legacy and names.to_scheme(hf, "hf") == hf
    # transformers-5 save_pretrained drops vision_model: still the same tensor
    assert names.to_hf(legacy.replace("vision_tower.vision_model.", "vision_tower.")) == hf


# --- streaming safetensors I/O and the math --------------------------------------------------------

def test_stream_writer_blocks_read_back(tmp_path):
    a, b = torch.randn(10, 6).to(torch.bfloat16), torch.arange(7, dtype=torch.int8)
    writer = st_io.StreamWriter(tmp_path / "x.safetensors", [("a", a.dtype, a.shape), ("b", b.dtype, b.shape)])
    writer.write("a", a[:4])
    writer.write("a", a[4:])
    writer.write("b", b)
    writer.close()
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)
    info = st_io.read_header(tmp_path / "x.safetensors")["a"]
    assert torch.equal(st_io.read_rows(info, 3, 8), a[3:8])


def test_quantize_rows_symmetric_per_channel():
    w = torch.randn(32, 48)
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(w, torch.float32)
    assert q.dtype == torch.int8 and scale.shape == (32, 1)
    assert q.abs().max() <= 127 and (q[5] == 0).all()
    assert torch.allclose(scale.squeeze(1), w.abs().amax(1) / 127)
    assert ((q.float() * scale - w).abs() <= scale / 2 + 1e-7).all()  # within half a step


# --- the converter -------------------------------------------------------------------------------

def test_builtin_layout(src, qdir):
    desc = json.loads((qdir / "quant_model_description.json").read_text())
    tensors = read_tensors(qdir)
    assert desc["model_quant_type"] == "W8A16"
    assert set(desc) - {"model_quant_type", "version"} == set(tensors)  # an entry for every tensor
    quantized = {k for k, v in desc.items() if v == "W8A16" and k != "model_quant_type"}
    for name in quantized:
        assert name.startswith("model.language_model.layers.")
    weights = [k for k in quantized if k.endswith(".weight")]
    assert len(weights) == 2 * len(LM_LINEARS)  # 2 layers in the test preset
    for w in weights:
        base = w[: -len(".weight")]
        n, k = tensors[w].shape
        assert tensors[w].dtype == torch.int8
        assert tensors[base + ".weight_scale"].shape == (n, 1)
        assert not tensors[base + ".weight_offset"].any() and tensors[base + ".weight_offset"].shape == (n, 1)
    for name in ("lm_head.weight", "model.language_model.embed_tokens.weight", "model.language_model.norm.weight",
                 "model.multi_modal_projector.linear_1.weight"):
        assert desc[name] == "FLOAT" and tensors[name].is_floating_point()
    assert all(desc[k] == "FLOAT" for k in desc if k.startswith("model.vision_tower."))
    for side in ("config.json", "tokenizer.json", "processor_config.json", "generation_config.json"):
        if (src / side).exists():
            assert (qdir / side).read_bytes() == (src / side).read_bytes()
    assert quant.is_quantized(qdir) and not quant.is_quantized(src)
    assert quant.describe(qdir) == "W8A16 per-channel (builtin)"


def test_lm_weight_bytes_about_half_of_bf16(qdir):
    """int8 weights are exactly half of bf16; scale + offset add 2 values per output row, i.e.
    2 * itemsize / k relative (< 1% from k = 512 on; the bench preset figure is in bench_w8a16)."""
    tensors, desc = read_tensors(qdir), quant.read_description(qdir)
    weights = [k for k, v in desc.items() if v == "W8A16" and k.endswith(".weight")]
    int8_bytes = sum(tensors[k].numel() for k in weights)
    assert int8_bytes == 0.5 * sum(tensors[k].numel() * 2 for k in weights)
    for k in weights:
        n, kk = tensors[k].shape
        extra = sum(tensors[k[: -len("weight")] + s].numel() for s in ("weight_scale", "weight_offset"))
        assert extra == 2 * n  # [n, 1] each: per-channel


def test_legacy_names_and_sharding(src, qdir, tmp_path):
    dst = quant.quantize(src, tmp_path / "legacy", backend="builtin", names="legacy", max_shard_bytes=64 << 10)
    index = json.loads((dst / "quant_model_weight_w8a16.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    legacy = read_tensors(dst)
    assert set(index["weight_map"]) == set(legacy)
    assert "language_model.model.layers.0.self_attn.q_proj.weight_scale" in legacy
    assert "language_model.lm_head.weight" in legacy
    assert any(k.startswith("vision_tower.vision_model.") for k in legacy)
    hf = read_tensors(qdir)
    assert {names.to_hf(k) for k in legacy} == set(hf)
    assert all(torch.equal(t, hf[names.to_hf(k)]) for k, t in legacy.items())


def test_refusals(src, qdir, tmp_path):
    with pytest.raises(quant.QuantError, match="already quantized"):
        quant.quantize(qdir, tmp_path / "again", backend="builtin")
    with pytest.raises(quant.QuantError, match="source"):
        quant.quantize(src, src, backend="builtin")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(quant.QuantError, match="not empty"):
        quant.quantize(src, busy, backend="builtin")
    assert (busy / "keep.txt").exists()
    quant.quantize(src, busy, backend="builtin", overwrite=True)
    assert quant.is_quantized(busy) and not (busy / "keep.txt").exists()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    save_file({"w": torch.zeros(2)}, str(bert / "model.safetensors"))
    with pytest.raises(quant.QuantError, match="unsupported model family"):
        quant.quantize(bert, tmp_path / "b2", backend="builtin")
    with pytest.raises(quant.QuantError, match="backend"):
        quant.quantize(src, tmp_path / "x", backend="gptq")
    with pytest.raises(quant.QuantError, match="names"):
        quant.quantize(src, tmp_path / "x", backend="builtin", names="v4")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_unknown_quant_type_refused(qdir, tmp_path):
    w8a8 = tmp_path / "w8a8"
    shutil.copytree(qdir, w8a8)
    desc = json.loads((w8a8 / "quant_model_description.json").read_text())
    desc["model_quant_type"] = "W8A8"
    (w8a8 / "quant_model_description.json").write_text(json.dumps(desc))
    from transformers import LlavaForConditionalGeneration

    with pytest.raises(quant.QuantError, match="W8A8"):
        quant.load_quantized_model(LlavaForConditionalGeneration, w8a8, device=torch.device("cpu"),
                                   dtype=torch.float32)


# --- W8A16Linear kernels -------------------------------------------------------------------------

def _reference(lin: W8A16Linear, x):
    scale, offset = lin.weight_scale.float(), lin.weight_offset.float()
    if lin.group_size:
        scale = scale.repeat_interleave(lin.group_size, 1)[:, : lin.in_features]
        offset = offset.repeat_interleave(lin.group_size, 1)[:, : lin.in_features]
    w = (lin.weight.float() - offset) * scale
    return x.float() @ w.T + (0 if lin.bias is None else lin.bias.float())


@pytest.mark.parametrize("dtype, k, kernel", [
    (torch.float32, 64, "int8pack"), (torch.bfloat16, 64, "int8pack"), (torch.float16, 100, "int8pack"),
    (torch.bfloat16, 100, "dequant"),  # bf16 int8pack_mm segfaults on CPU unless k % 16 == 0
])
def test_linear_cpu_kernels(dtype, k, kernel):
    torch.manual_seed(0)
    lin = W8A16Linear.from_linear(nn.Linear(k, 24, bias=True), dtype=dtype)
    assert lin.kernel == "int8pack" and lin.weight.dtype == torch.int8
    x = torch.randn(2, 3, k, dtype=dtype)
    took = lin._int8pack_ok(x.reshape(-1, k))
    assert ("int8pack" if took else "dequant") == kernel
    y = lin(x)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    torch.testing.assert_close(y.float(), _reference(lin, x), rtol=2e-2, atol=2e-2)


def test_linear_per_group_and_asymmetric_dequant():
    torch.manual_seed(0)
    lin = W8A16Linear(40, 8, group_size=16, dtype=torch.float32)  # 3 groups, the last one short
    lin.weight.copy_(torch.randint(-128, 128, (8, 40), dtype=torch.int8))
    lin.weight_scale.copy_(torch.rand(8, 3) / 50)
    lin.weight_offset.copy_(torch.randint(-3, 4, (8, 3)).float())
    lin.finalize()
    assert lin.kernel == "dequant"
    x = torch.randn(5, 40)
    torch.testing.assert_close(lin(x), _reference(lin, x), rtol=1e-4, atol=1e-4)


def test_linear_npu_call_contract(monkeypatch):
    """On NPU the CANN kernel computes x @ ((w + offset) * scale) with w [k, n]: check what we pass."""
    calls = {}

    def npu_weight_quant_batchmatmul(x, weight, scale, offset=None, antiquant_group_size=0):
        calls.update(weight_shape=tuple(weight.shape), group=antiquant_group_size)
        w = weight.float() + (0 if offset is None else offset.float())
        return (x.float() @ (w * scale.float())).to(x.dtype)

    stub = types.SimpleNamespace(npu_weight_quant_batchmatmul=npu_weight_quant_batchmatmul)
    monkeypatch.setattr(devices, "torch_npu", lambda: stub)  # devices.py is where torch_npu comes from
    lin = W8A16Linear(32, 8, dtype=torch.float32)
    lin.weight.copy_(torch.randint(-128, 128, (8, 32), dtype=torch.int8))
    lin.weight_scale.copy_(torch.rand(8, 1) / 50)
    lin.weight_offset.copy_(torch.full((8, 1), 2.0))
    lin.finalize(device_type="npu")
    x = torch.randn(3, 32)
    torch.testing.assert_close(lin(x), _reference(lin, x), rtol=1e-4, atol=1e-4)
    assert calls == {"weight_shape": (32, 8), "group": 0}


# --- loading -------------------------------------------------------------------------------------

def test_load_quantized_model_close_to_float(src, qdir):
    from transformers import LlavaForConditionalGeneration

    ids = torch.randint(6, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        for dtype in (torch.float32, torch.bfloat16):
            model = quant.load_quantized_model(LlavaForConditionalGeneration, qdir,
                                               device=torch.device("cpu"), dtype=dtype)
            qlin = [m for m in model.modules() if isinstance(m, W8A16Linear)]
            assert len(qlin) == 2 * len(LM_LINEARS) and all(m.weight.dtype == torch.int8 for m in qlin)
            assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == dtype
            got = model(input_ids=ids).logits.float()
            assert ((got - want).norm() / want.norm()).item() <= 0.03
