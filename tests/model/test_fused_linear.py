"""Fused q/k/v and gate/up projections: same outputs, no second copy of the weights, and modules
that are not plain nn.Linear (W8A16) keep their own forward. bf16 on the CPU they are packed for
oneDNN where this CPU's oneDNN packs them: bit-identical outputs either way, and the model's own
forward still runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.model import packed_linear
from pipeline.model.fused_linear import fuse, pack_single
from quant.linear import W8A16Linear

NAMES = ["q", "k", "v"]


def linears(bias: bool = False) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(32, n, bias=bias) for n in (48, 16, 16)]


def holder(mods: list[nn.Module]) -> nn.Module:
    owner = nn.Module()
    for name, m in zip(NAMES, mods, strict=False):
        setattr(owner, name, m)
    return owner


@pytest.fixture
def plain(monkeypatch):
    """Fusion without packing: what runs where oneDNN packs nothing."""
    monkeypatch.setenv(packed_linear.PACK_ENV, "0")


@torch.inference_mode()
def test_fused_matches_separate_and_shares_storage(plain):
    for bias in (False, True):
        mods = linears(bias)
        x = torch.randn(5, 7, 32)
        expected = [m(x) for m in mods]
        project = fuse(holder(mods), NAMES)
        got = project(x)
        assert [g.shape for g in got] == [e.shape for e in expected]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        # The modules now read slices of one tensor: their own forward still gives the same answer.
        storage = {m.weight.untyped_storage().data_ptr() for m in mods}
        assert len(storage) == 1
        for m, e in zip(mods, expected, strict=True):
            torch.testing.assert_close(m(x), e)


@torch.inference_mode()
def test_second_fusion_reuses_the_fused_weight(plain):
    mods = linears()
    owner = holder(mods)
    fuse(owner, NAMES)
    pointer = mods[0].weight.data_ptr()
    project = fuse(owner, NAMES)  # a second engine on the same model
    assert mods[0].weight.data_ptr() == pointer
    x = torch.randn(3, 32)
    torch.testing.assert_close(project(x)[2], mods[2](x))


@torch.inference_mode()
def test_quantized_projections_are_called_one_by_one():
    mods = [W8A16Linear.from_linear(m, torch.float32) for m in linears()]
    x = torch.randn(4, 32)
    expected = [m(x) for m in mods]
    for g, e in zip(fuse(holder(mods), NAMES)(x), expected, strict=True):
        torch.testing.assert_close(g, e)
    assert all(m.weight.dtype == torch.int8 for m in mods)


@pytest.mark.parametrize("onednn", ["as this machine has it", "absent"])
@torch.inference_mode()
def test_bf16_on_cpu_is_packed_where_onednn_packs_else_fused_and_always_bit_identical(onednn, monkeypatch):
    """What packing is must not depend on the machine running the test: where oneDNN packs bf16
    (decided at run time) the modules become packed stand-ins, elsewhere (forced here on any machine)
    they stay plain nn.Linear over one fused weight; either way the outputs are F.linear's bits."""
    if onednn == "absent":
        monkeypatch.setattr(packed_linear, "onednn_packs_bf16", lambda: False)
    packs = packed_linear.onednn_packs_bf16()
    assert packed_linear.packable([nn.Linear(4, 4).bfloat16()]) == packs
    for bias in (False, True):
        mods = [m.bfloat16() for m in linears(bias)]
        x = torch.randn(16, 1, 32).bfloat16()
        expected = [m(x) for m in mods]
        owner = holder(mods)
        project = fuse(owner, NAMES)
        for g, e in zip(project(x), expected, strict=True):
            assert torch.equal(g, e)
        stand_ins = [getattr(owner, n) for n in NAMES]
        if packs:  # the hf engine now calls stand-ins, not weights of their own
            assert all(isinstance(m, packed_linear.PackedPart) for m in stand_ins)
        else:
            assert stand_ins == mods and len({m.weight.untyped_storage().data_ptr() for m in mods}) == 1
        for n, e in zip(NAMES, expected, strict=True):
            assert torch.equal(getattr(owner, n)(x), e)
        if packs:  # a second engine on the same model reuses the packed weight
            assert fuse(owner, NAMES).__self__ is project.__self__
        single = holder(linears(bias)[:1])
        single.q = single.q.bfloat16()
        expected = single.q(x)
        pack_single(single, "q")
        assert isinstance(single.q, packed_linear.PackedLinear if packs else nn.Linear)
        assert torch.equal(single.q(x), expected)


@pytest.mark.parametrize("onednn", ["as this machine has it", "absent"])
@torch.inference_mode()
def test_fp32_is_packed_where_onednn_packs_it_and_agrees_to_rounding(onednn, monkeypatch):
    if onednn == "absent":
        monkeypatch.setattr(packed_linear, "onednn_packs_fp32", lambda: False)
    packs = packed_linear.onednn_packs_fp32()
    for bias in (False, True):
        mods = linears(bias)
        x = torch.randn(16, 1, 32)
        expected = [m(x) for m in mods]
        owner = holder(mods)
        for g, e in zip(fuse(owner, NAMES)(x), expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert all(isinstance(getattr(owner, n), packed_linear.PackedPart) == packs for n in NAMES)


def test_packing_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(packed_linear.PACK_ENV, "0")
    assert not packed_linear.packable([nn.Linear(4, 4)]) and not packed_linear.packable([nn.Linear(4, 4).bfloat16()])


def test_quantized_are_not_packed():
    assert not packed_linear.packable([W8A16Linear.from_linear(linears()[0], torch.bfloat16)])
