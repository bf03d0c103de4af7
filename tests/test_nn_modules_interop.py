"""maefast.nn's modules as PyTorch users hold them: arguments that are not tensors, qk_scale of numpy and tensor
types, index tensors made under inference_mode (tests of test_nn_block.py's modules, split out for its length)."""
from __future__ import annotations

import pytest
import torch

from maefast.nn import Attention, Block, NormPixLoss, Unshuffle
from maefast.testing import assert_close, randn
from test_dropout import TimmBlock

D, H = 32, 2  # as test_nn_block.py's


@pytest.mark.parametrize("arg", ["x_vis", "mask_token", "pos_embed"])
def test_unshuffle_names_an_argument_that_is_not_a_tensor(arg):
    """None (or another non-tensor) for a tensor argument raises the op's TypeError naming it; before, the
    module read its dtype first (AttributeError: 'NoneType' object has no attribute 'dtype')."""
    n, L, keep = 2, 4, 2
    args = dict(x_vis=randn(n, 1 + keep, D), mask_token=randn(1, 1, D), pos_embed=randn(1, 1 + L, D))
    args[arg] = None
    ids = torch.stack([torch.randperm(L) for _ in range(n)])
    with pytest.raises(TypeError, match=f"{arg} must be a torch.Tensor"):
        Unshuffle()(args["x_vis"], args["mask_token"], ids, args["pos_embed"])


@pytest.mark.parametrize("fused", [False, True])
def test_attention_and_block_refuse_a_non_tensor_with_a_type_error(fused):
    """x=None raises a TypeError, as timm's modules (their first layer's); before, Attention and the fused
    Block read x.dim() / x.dtype first (AttributeError)."""
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        Attention(D, 2)(None)
    with pytest.raises(TypeError, match="must be Tensor"):
        Block(D, 2, fused=fused)(None)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_qk_scale_of_any_number_type_as_timms(kind, fused):
    """timm multiplies by whatever number qk_scale is (a numpy float32, a 0-d tensor); the ops take a float:
    before, such a scale raised 'scale must be a float or None' at the first forward."""
    import numpy as np

    qk_scale = np.float32(0.3) if kind == "numpy" else torch.tensor(0.3)
    torch.manual_seed(0)
    timm = TimmBlock(D, H, qkv_bias=True, qk_scale=qk_scale)
    ours = Block(D, H, qkv_bias=True, qk_scale=qk_scale, fused=fused)
    ours.load_state_dict(timm.state_dict())
    x = randn(2, 5, D)
    assert_close(ours(x), timm(x), name=f"block with a {kind} qk_scale")
    assert isinstance(ours.attn.scale, float)
    with pytest.raises(TypeError, match="qk_scale must be a number"):
        Attention(D, H, qk_scale="0.3")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_index_tensors_made_under_inference_mode_train(impl):
    """ids_restore, a loss mask and cu_seqlens made under torch.inference_mode (a data pipeline, say) train as
    normal tensors do (the official decoder's gather saves none of them): the ops save a copy. Before, backward
    raised 'Inference tensors cannot be saved for backward'."""
    from maefast.nn import NormPixLoss
    from maefast.ops import random_masking

    if impl == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    n, L, p, dh = 2, 8, 4, 64
    with torch.inference_mode():
        ids = random_masking(n, L, 0.5, seed=1)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    made = {"inference": (ids.ids_restore, ids.mask, cu)}
    made["normal"] = tuple(t.clone() for t in made["inference"])  # clone(): normal tensors
    imgs, token, pos = randn(n, 3, 8, 16), randn(1, 1, D), randn(1, 1 + L, D)
    attn, loss, unshuffle = Attention(dh, 4, impl=impl), NormPixLoss(p, norm_pix_loss=True, impl=impl), Unshuffle(impl)
    calls = {"unshuffle": (randn(n, 1 + L // 2, D), lambda t, ir, m, c: unshuffle(t, token, ir, pos)),
             "loss": (randn(n, L, p * p * 3), lambda t, ir, m, c: loss(imgs, t, m)),
             "loss masked": (randn(n, L // 2, p * p * 3), lambda t, ir, m, c: loss(imgs, t, ir, "masked")),
             "attention": (randn(7, dh), lambda t, ir, m, c: attn(t, c, 4))}
    for name, (x, fn) in calls.items():
        grads = {}
        for kind, args in made.items():
            t = x.clone().requires_grad_()
            grads[kind] = torch.autograd.grad(fn(t, *args).square().sum(), t)[0]
        assert torch.equal(grads["inference"], grads["normal"]), name


@pytest.mark.no_triton_launch
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_an_explicit_kernel_backend_a_module_cannot_serve_is_refused(impl):
    """impl="triton"/"cuda" named by the user: a module whose inputs need what no kernel does raised only where the
    kernel could not run (eval mode, a CPU without the interpreter) and elsewhere ran PyTorch in silence (attention
    dropout in training: SDPA; float64: the official ops). Now each says why, as an op's explicit request does."""
    x = randn(2, 5, D)
    attn = Attention(D, H, qkv_bias=True, attn_drop=0.1, impl=impl).train()
    with pytest.raises(ValueError, match=rf"impl='{impl}': attn_drop \(p=0.1\) in training mode needs dropout on the"):
        attn(x)
    attn.eval().attn_drop.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(ValueError, match=rf"impl='{impl}': hooks on attn_drop need the attention probabilities"):
        attn(x)
    n, L, keep = 2, 16, 4
    ids = torch.stack([torch.randperm(L) for _ in range(n)])
    with pytest.raises(ValueError, match=f"impl='{impl}' is not available for maefast.nn.Unshuffle on float64"):
        Unshuffle(impl=impl)(randn(n, 1 + keep, D).double(), randn(1, 1, D).double(), ids, randn(1, 1 + L, D).double())
    imgs, pred, mask = randn(2, 3, 16, 16).double(), randn(2, 16, 48).double(), (torch.rand(2, 16) < 0.75).double()
    with pytest.raises(ValueError, match=f"impl='{impl}' is not available for maefast.nn.NormPixLoss on float64"):
        NormPixLoss(4, impl=impl)(imgs, pred, mask)
    for auto in ("auto", "reference"):  # these fall back, as documented
        assert NormPixLoss(4, impl=auto)(imgs, pred, mask).dtype == torch.float64
