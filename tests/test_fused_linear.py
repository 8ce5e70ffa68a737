"""Fused q/k/v and gate/up projections: same outputs, no second copy of the weights, and modules
that are not plain nn.Linear (W8A16) keep their own forward."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.fused_linear import fuse
from quant.linear import W8A16Linear


def linears(bias: bool = False) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(32, n, bias=bias) for n in (48, 16, 16)]


@torch.inference_mode()
def test_fused_matches_separate_and_shares_storage():
    for bias in (False, True):
        mods = linears(bias)
        x = torch.randn(5, 7, 32)
        expected = [m(x) for m in mods]
        project = fuse(mods)
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
def test_second_fusion_reuses_the_fused_weight():
    mods = linears()
    fuse(mods)
    pointer = mods[0].weight.data_ptr()
    project = fuse(mods)  # a second engine on the same model
    assert mods[0].weight.data_ptr() == pointer
    x = torch.randn(3, 32)
    torch.testing.assert_close(project(x)[2], mods[2](x))


@torch.inference_mode()
def test_quantized_projections_are_called_one_by_one():
    mods = [W8A16Linear.from_linear(m, torch.float32) for m in linears()]
    x = torch.randn(4, 32)
    expected = [m(x) for m in mods]
    for g, e in zip(fuse(mods)(x), expected, strict=True):
        torch.testing.assert_close(g, e)
    assert all(m.weight.dtype == torch.int8 for m in mods)
