"""Device seeds: masking that a CUDA graph can replay with a fresh mask (the captured training step
itself: tests/test_step.py)."""
import os

import pytest
import torch

from maefast import ops


def test_device_seed_kernel_path_is_bit_exact_with_int_seed():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel runs on the CPU only under TRITON_INTERPRET=1")
    from maefast.kernels.masking import random_masking_triton

    for seed in (0, 1, 2**31 + 7, 2**62 + 11):
        a = random_masking_triton(3, 50, 12, None, seed, 17, torch.device("cpu"))
        b = random_masking_triton(3, 50, 12, None, 0, 17, torch.device("cpu"),
                                  seed_tensor=torch.tensor([seed], dtype=torch.int64))
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_seed_tensor_validation():
    with pytest.raises(ValueError, match="1-element int64 tensor"):
        ops.random_masking(2, 16, 0.75, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1-element int64 tensor"):
        ops.random_masking(2, 16, 0.75, seed=torch.tensor([1], dtype=torch.int32))
    a = ops.random_masking(2, 16, 0.75, seed=torch.tensor([5]))
    b = ops.random_masking(2, 16, 0.75, seed=5)
    assert torch.equal(a.ids_keep, b.ids_keep)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda", "reference"])
def test_gpu_device_seed_equals_int_seed(impl):
    dev = torch.device("cuda")
    for seed in (3, 2**40 + 5):
        a = ops.random_masking(4, 196, 0.75, seed=seed, offset=7, device=dev, impl=impl)
        b = ops.random_masking(4, 196, 0.75, seed=torch.tensor([seed], device=dev), offset=7, device=dev, impl=impl)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_masking_in_a_cuda_graph_draws_fresh_masks(impl):
    dev = torch.device("cuda")
    seed = torch.tensor([10], device=dev)
    ops.random_masking(2, 64, 0.75, seed=seed, device=dev, impl=impl)  # compile before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        seed.add_(1)
        out = ops.random_masking(2, 64, 0.75, seed=seed, device=dev, impl=impl)
    for expect_seed in (11, 12):  # capture records the add_ without running it
        g.replay()
        ref = ops.random_masking(2, 64, 0.75, seed=expect_seed, device=dev, impl=impl)
        assert torch.equal(out.ids_keep, ref.ids_keep) and torch.equal(out.mask, ref.mask)
