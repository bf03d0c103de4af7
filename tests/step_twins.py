"""Shared by the TrainStep tests (tests/test_step*.py): two identical tiny models, batches for them,
and the check that two models hold the same parameters."""
from __future__ import annotations

import copy

import torch

from maefast import bench as mb

CPU = torch.device("cpu")


def twins(impl="auto", seed=0, **overrides):
    torch.manual_seed(seed)
    a = mb.build_model("tiny", impl, CPU, **overrides)
    return a, copy.deepcopy(a)


def batches(n, batch=3):
    return [torch.randn(batch, 3, 32, 32) for _ in range(n)], [torch.rand(batch, 16) for _ in range(n)]


def assert_same_params(a, b, exact=True):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), n
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)
