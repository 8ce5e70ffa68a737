"""Every executor honours `Pool`: the driver calls the same methods whichever pool it drives."""

from __future__ import annotations

import inspect

import pytest

from pipeline.executors.local import InProcessPool
from pipeline.executors.pool import Pool
from pipeline.executors.procs import ProcPool
from pipeline.executors.ray import RayPool

METHODS = [name for name, member in vars(Pool).items()
           if inspect.isfunction(member) and not name.startswith("_")]


def test_the_protocol_names_what_the_driver_calls():
    assert set(METHODS) == {"start", "submit", "event", "serve", "close"}


@pytest.mark.parametrize("pool", [InProcessPool, ProcPool, RayPool])
def test_every_pool_has_every_method_with_its_signature(pool):
    for name in METHODS:
        want = list(inspect.signature(getattr(Pool, name)).parameters)
        assert list(inspect.signature(getattr(pool, name)).parameters) == want, f"{pool.__name__}.{name}"
