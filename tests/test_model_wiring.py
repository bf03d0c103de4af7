"""The fast MAE model's wiring beyond the equality tests of test_model.py: what it reads from the model
(the cls token's position row, each attention's scale, each norm's eps), its options reaching every block,
an instance's forward_loss, and the mapping of its impl per op."""
import types
import warnings

import pytest
import torch

import maefast
from maefast.models import MaskedAutoencoderViT, create_model, routing
from test_model import TINY, _assert_grads_equal, _run


@pytest.mark.parametrize("what", ["cls_position", "attention_scale", "norm2_eps"])
@pytest.mark.parametrize("fused", [False, "block"])
def test_fast_path_reads_the_models_own_values(what, fused):
    """The fast path takes what the official forward reads, not what the official initialisation leaves: the
    cls token's position row (zeros after init, not in a loaded or retrained checkpoint), each
    attention's scale (qk_scale; head dim ** -0.5 by default) and each LayerNorm's eps."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, fused=fused)
    with torch.no_grad():
        if what == "cls_position":
            m.pos_embed[:, 0].normal_()
        for blk in (*m.blocks, *m.decoder_blocks):
            if what == "attention_scale":
                blk.attn.scale = 0.5
            elif what == "norm2_eps":  # each block's norms keep their own eps (the one op takes two)
                blk.norm2.eps = 1e-2
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    m.impl = "reference"
    l0, p0, _, g0 = _run(m, imgs, noise)
    m.impl = "auto"
    l1, p1, _, g1 = _run(m, imgs, noise)
    assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item())
    assert torch.allclose(p1, p0, rtol=1e-5, atol=1e-6)
    _assert_grads_equal(g1, g0)


def test_op_impl_maps_a_models_impl_per_op():
    """A model's impl as each op takes it: "cuda" stays "cuda" for the ops with a CUDA C++ kernel (the loss
    included) and is "auto" for the others; "sdpa" is the attention's alone; the rest pass as they are."""
    from maefast.models.fast import op_impl

    for op in ("masking", "patch_embed", "attention", "unshuffle", "loss"):
        assert op_impl("cuda", op) == "cuda", op
        assert op_impl("sdpa", op) == "auto", op
        for impl in ("auto", "triton", "reference"):
            assert op_impl(impl, op) == impl, (impl, op)
    for op in ("layernorm", "bias_gelu"):
        assert op_impl("cuda", op) == "auto", op


def test_fused_takes_zero_as_false():
    """check_fused's documented 0 (an int flag from a config file) is fused=False;
    1 is the removed fused=True, refused."""
    from maefast.models.fast import check_fused

    assert check_fused(0) is False and check_fused(False) is False and check_fused("block") == "block"
    assert create_model("tiny", fused=0).fused is False
    with pytest.raises(ValueError, match="fused"):
        check_fused(1)


def test_fused_and_grad_checkpointing_reach_every_block(monkeypatch):
    """The model's defaults (impl="auto", fused=False, no checkpointing), and its fused / grad_checkpointing
    settings reaching every encoder and decoder block: the loss and gradients are the same either way, so
    the calls are counted (the block op, torch's checkpoint) in one forward."""
    import maefast.models.fast as fast

    calls = {}
    for mod, name in ((maefast.ops, "vit_block"), (fast, "checkpoint")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name,
                            lambda *a, _r=real, _n=name, **k: calls.update({_n: calls[_n] + 1}) or _r(*a, **k))
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY)
    assert (m.impl, m.fused, m.grad_checkpointing) == ("auto", False, False)
    imgs, noise, n = torch.randn(2, 3, 32, 32), torch.rand(2, 16), TINY["depth"] + TINY["decoder_depth"]
    for fused, ckpt in ((False, False), ("block", False), (False, True), ("block", True)):
        m.fused, m.grad_checkpointing = fused, ckpt
        calls.update(vit_block=0, checkpoint=0)
        m(imgs, 0.75, noise, return_pred=False)
        assert calls == {"vit_block": n if fused else 0, "checkpoint": n if ckpt else 0}, (fused, ckpt)


def test_fast_forward_refuses_images_that_require_a_gradient():
    """fast_forward itself (what patch() and the probes call) refuses images that require a gradient
    under grad mode: it reads them as constants. maefast's loss op refuses them too, but the model's own
    loss_fn takes them as its target: their gradient would then silently miss the encoder's part."""
    from maefast.models.fast import fast_forward, official_view

    m = MaskedAutoencoderViT(**TINY)
    imgs, noise = torch.randn(2, 3, 32, 32, requires_grad=True), torch.rand(2, 16)
    for loss_fn in (None, m.forward_loss):
        with pytest.raises(ValueError, match="imgs"):
            fast_forward(official_view(m), imgs, 0.75, noise, loss_fn=loss_fn)
    with torch.no_grad():
        assert torch.isfinite(fast_forward(official_view(m), imgs, 0.75, noise)[0])


def test_an_instance_forward_loss_runs_on_the_fast_path():
    """forward_loss set on the instance (not the class) is the model's loss: the fast path calls it in
    place of maefast's (no SlowPathWarning), with the official value."""
    def l1_loss(self, imgs, pred, mask):
        return ((pred - self.patchify(imgs)).abs().mean(-1) * mask).sum() / mask.sum()

    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, impl="reference")
    m.forward_loss = types.MethodType(l1_loss, m)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    l0 = m(imgs, 0.75, noise)[0]
    m.impl = "auto"
    routing._WARNED.clear()  # one warning per reason and process
    with warnings.catch_warnings():
        warnings.simplefilter("error", routing.SlowPathWarning)
        l1 = m(imgs, 0.75, noise, return_pred=False)[0]
    assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item())


def test_settings_set_after_construction_are_checked_per_call():
    """`model.fused = ...` (how tests and maefast.patch switch a built model) is checked on every call as
    the constructor checks it: a typo or the removed fused=True ran the unfused blocks without a word."""
    m = MaskedAutoencoderViT(**TINY)
    imgs = torch.randn(2, 3, 32, 32)
    for attr, value, match in (("fused", "blocks", "fused must be False or 'block'"),
                               ("fused", True, "fused=True .* was removed"),
                               ("impl", "Triton", "impl must be one of"),
                               ("grad_checkpointing", "yes", "grad_checkpointing must be True or False")):
        m2 = MaskedAutoencoderViT(**TINY)
        setattr(m2, attr, value)
        with pytest.raises((TypeError, ValueError), match=match):
            m2(imgs, seed=0)
    m.impl, m.fused = "sdpa", "block"  # the constructor's refusal of the pair, not unfused SDPA blocks
    with pytest.raises(ValueError, match="impl='sdpa'.*needs fused=False"):
        m(imgs, seed=0)


@pytest.mark.parametrize("fused", [False, "block"])
@pytest.mark.parametrize("norm", ["no_bias", "no_affine"])
def test_layer_norms_without_weight_or_bias(norm, fused):
    """A norm_layer whose LayerNorms have no bias (bias=False) or no weight and bias (elementwise_affine=False):
    the official initialisation assumed both and raised AttributeError ('NoneType' object has no attribute
    'fill_') in the constructor; now built, with the official loss and gradients on the fast path (the
    block op, which takes affine norms only, leaves such blocks to torch's layers)."""
    from functools import partial

    layer = partial(torch.nn.LayerNorm, eps=1e-6, **({"bias": False} if norm == "no_bias" else
                                                    {"elementwise_affine": False}))
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, norm_layer=layer, norm_pix_loss=True, fused=fused)
    m.impl = "reference"
    assert all(n.bias is None for n in m.modules() if isinstance(n, torch.nn.LayerNorm))
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    l0, _, _, g0 = _run(m, imgs, noise)
    m.impl = "auto"
    l1, _, _, g1 = _run(m, imgs, noise, return_pred=False)
    assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item())
    _assert_grads_equal(g1, g0)


def test_fused_blocks_cast_to_another_dtype_run_as_the_officials_do(monkeypatch):
    """Outside autocast, decoder blocks cast to bf16 under an fp32 stream: the official blocks (and the
    unfused fast ones) raise; fused="block" gave a result (the op casts the weights to the stream's dtype).
    Now that block runs op by op too, raising as the official does; a whole bf16 model keeps the op."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, fused="block")
    m.decoder_blocks.to(torch.bfloat16)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    for impl in ("reference", "auto"):
        m.impl = impl
        with pytest.raises(RuntimeError):
            m(imgs, 0.75, noise)
    m.to(torch.bfloat16)
    calls, real = [], maefast.ops.vit_block
    monkeypatch.setattr(maefast.ops, "vit_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    m(imgs.bfloat16(), 0.75, noise)
    assert len(calls) == len(m.blocks) + len(m.decoder_blocks)


class _LoRAConv(torch.nn.Module):
    """A LoRA-style adapter of the patch projection: its own fp32 factors registered before the base conv (a
    zero update, so it computes the base conv's result)."""

    def __init__(self, base: torch.nn.Conv2d, rank: int = 2):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_channels * base.kernel_size[0] * base.kernel_size[1]))
        self.B = torch.nn.Parameter(torch.zeros(base.out_channels, rank))
        self.base = base

    def forward(self, x):
        y = self.base(x)
        delta = torch.nn.functional.conv2d(x.float(), (self.B @ self.A).view_as(self.base.weight).float(),
                                           stride=self.base.stride)
        return y + delta.to(y.dtype)


@pytest.mark.parametrize("wrap", ["sequential", "lora-bf16"])
@pytest.mark.parametrize("uint8", [False, True])
def test_a_wrapped_patch_projection_runs_the_original_forward(uint8, wrap, monkeypatch):
    """A patch projection wrapped in a module without a .weight of its own (an nn.Sequential; a LoRA-style adapter
    with fp32 factors on a bf16 model): the fast path declines it (it reads a Conv2d's weight) and the original
    forward computes what the plain model's official forward does, the images checked against and cast to the
    wrapped Conv2d's weight (before 2026-12-07 the input check read proj.weight: an AttributeError)."""
    monkeypatch.setattr(routing, "_WARNED", set())  # one warning per reason and process: this test's own
    torch.manual_seed(0)
    dtype = torch.bfloat16 if wrap == "lora-bf16" else torch.float32
    plain = MaskedAutoencoderViT(**TINY, impl="reference").to(dtype)
    wrapped = MaskedAutoencoderViT(**TINY).to(dtype)
    wrapped.load_state_dict(plain.state_dict())
    proj = wrapped.patch_embed.proj
    wrapped.patch_embed.proj = torch.nn.Sequential(proj) if wrap == "sequential" else _LoRAConv(proj)
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8) if uint8 else torch.randn(2, 3, 32, 32, dtype=dtype)
    noise = torch.rand(2, 16)
    with pytest.warns(routing.SlowPathWarning, match="patch_embed"):
        loss, pred, mask = wrapped(imgs, noise=noise)
    loss0, pred0, mask0 = plain(imgs, noise=noise)
    assert torch.equal(loss, loss0) and torch.equal(pred, pred0) and torch.equal(mask, mask0)
    if not uint8:
        with pytest.raises(TypeError, match="patch embedding weight"):
            wrapped(imgs.double(), noise=noise)
