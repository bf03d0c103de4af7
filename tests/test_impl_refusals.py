"""An explicit backend that cannot take an input says why (ValueError naming the op and the reason),
and the checks that coverage showed no test reaching (2026-12-05) give their own message, not an
error from deeper down. tests/test_validation.py holds the rest of the argument checks."""
from __future__ import annotations

import pytest
import torch

from maefast import ops
from maefast._triton import triton_usable
from maefast.ops.masking import KERNEL_MAX_PATCHES

needs_triton = pytest.mark.skipif(not triton_usable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0],
                                  reason="needs triton (interpreted on a CPU)")


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _imgs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)  # 4 patches of 16
    return (x * 255).round().to(torch.uint8).to(_dev()) if dtype == torch.uint8 else x.to(_dev(), dtype)


def _ids():
    return torch.tensor([[0], [3]], device=_dev())


def _w(dtype=torch.float32):
    return torch.randn(8, 3, 16, 16, device=_dev(), dtype=dtype)


TRITON_REFUSES = [
    ("random_masking: more patches than the kernels hold",
     lambda: ops.random_masking(2, KERNEL_MAX_PATCHES + 1, 0.75, seed=1, device=_dev(), impl="triton"),
     rf"impl='triton' is not available for maefast.ops.random_masking: num_patches={KERNEL_MAX_PATCHES + 1} exceeds"),
    ("visible_attention: float64",
     lambda: ops.visible_attention(torch.randn(1, 4, 96, dtype=torch.float64, device=_dev()), 2, impl="triton"),
     r"impl='triton' cannot run this input: the Triton kernels take float32/float16/bfloat16, got torch.float64"),
    ("visible_attention: head dim 8",
     lambda: ops.visible_attention(torch.randn(1, 4, 48, device=_dev()), 2, impl="triton"),
     r"impl='triton' cannot run this input: head dim 8 is not supported by the Triton kernels"),
    ("masked_patch_embed: float64",
     lambda: ops.masked_patch_embed(_imgs(torch.float64), _ids(), _w(torch.float64), None, None, 16, impl="triton"),
     r"impl='triton' is not available for maefast.ops.masked_patch_embed: dtype torch.float64"),
    ("masked_patch_embed: a float64 pos_embed",
     lambda: ops.masked_patch_embed(_imgs(), _ids(), _w(), None, torch.zeros(1, 5, 8, dtype=torch.float64,
                                                                            device=_dev()), 16, impl="triton"),
     r"impl='triton' is not available for maefast.ops.masked_patch_embed: pos_embed dtype torch.float64"),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_REFUSES, ids=lambda c: c[0])
def test_explicit_triton_says_why_it_cannot_run(case):
    _, call, match = case
    with pytest.raises(ValueError, match=match):
        call()


ARGUMENT_CHECKS = [  # (what, call(impl), exception, message)
    ("patch embedding: uint8 images with an integer weight",
     lambda impl: ops.masked_patch_embed(_imgs(torch.uint8), _ids(), _w().to(torch.int32), None, None, 16, impl=impl),
     TypeError, r"weight must be a floating point tensor, got torch.int32"),
    ("patch embedding: bias dtype other than the weight's",
     lambda impl: ops.masked_patch_embed(_imgs(), _ids(), _w(), torch.zeros(8, dtype=torch.float16, device=_dev()),
                                         None, 16, impl=impl),
     TypeError, r"bias dtype torch.float16 must match weight dtype torch.float32"),
    ("patch embedding: an integer pos_embed",
     lambda impl: ops.masked_patch_embed(_imgs(), _ids(), _w(), None,
                                         torch.zeros(1, 5, 8, dtype=torch.int32, device=_dev()), 16, impl=impl),
     TypeError, r"pos_embed must be a floating point tensor, got torch.int32"),
    ("patch embedding: images that require a gradient",
     lambda impl: ops.masked_patch_embed(_imgs().requires_grad_(True), _ids(), _w(), None, None, 16, impl=impl),
     ValueError, r"imgs must not require grad"),
    ("loss: integer images",
     lambda impl: ops.norm_pix_loss(torch.randn(2, 4, 768, device=_dev()), _imgs().to(torch.int32),
                                    torch.ones(2, 4, device=_dev()), 16, impl=impl),
     TypeError, r"imgs must be a floating point tensor or uint8"),
    ("un-shuffle: zero-width tokens",
     lambda impl: ops.unshuffle(torch.randn(2, 1, 0, device=_dev()), torch.randn(0, device=_dev()),
                                torch.zeros(2, 3, dtype=torch.long, device=_dev()), None, impl=impl),
     ValueError, r"x_vis \(N, 1\+K, Dd\) and ids_restore \(N, L\) must be non-empty, got x_vis \(2, 1, 0\)"),
    ("un-shuffle: an empty batch",
     lambda impl: ops.unshuffle(torch.randn(0, 2, 4, device=_dev()), torch.randn(4, device=_dev()),
                                torch.zeros(0, 3, dtype=torch.long, device=_dev()), None, impl=impl),
     ValueError, r"must be non-empty, got x_vis \(0, 2, 4\)"),
]


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", ARGUMENT_CHECKS, ids=lambda c: c[0])
@pytest.mark.no_triton_launch  # a refusal / meta tensors: no kernel runs
def test_argument_checks_name_the_argument(case, impl):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):  # the checks run before any backend is chosen
        call(impl)


@needs_triton
def test_random_masking_kernels_take_exactly_kernel_max_patches():
    """The patch limit is inclusive: KERNEL_MAX_PATCHES itself runs the kernels (explicitly, and under auto
    on a GPU); one more is refused (above). Resolved without a launch: 4096 interpreted patches take minutes."""
    from maefast.ops.masking import _resolve

    dev = _dev()
    assert _resolve("triton", dev, KERNEL_MAX_PATCHES, None) == "triton"
    assert _resolve("triton", dev, KERNEL_MAX_PATCHES, torch.empty(1, 1, dtype=torch.float64)) == "triton"
    if dev.type == "cuda":
        assert _resolve("auto", dev, KERNEL_MAX_PATCHES, None) != "reference"
        assert _resolve("auto", dev, KERNEL_MAX_PATCHES + 1, None) == "reference"
