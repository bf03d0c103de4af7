"""maefast's ops under torch.func transforms (grad, vmap, jvp; per-sample gradients of a model) and under
forward-mode AD, eagerly and inside torch.compile.

Neither the kernels (they read raw storage: no tangent, no batched tensor) nor the custom ops' registered
autograd (no jvp; functorch needs new-style autograd.Functions) serve a transform, so while one is active
every op runs its reference implementation as plain torch ops (maefast/ops/_dispatch.py, `_composite`).
Before, a model on a GPU (or any triton/auto impl) failed under torch.func.grad and vmap, forward-mode AD
dropped the tangent of a Triton op silently, and through the dispatcher (torch.compile's route) torch.func.jvp
returned a zero tangent, silently.

Oracles: gradients against the op's own hand-written backward (the usual reverse mode); a jvp by the
dot-product identity <u, J t> = <J^T u, t> with the same backward; vmap against a loop."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import maefast.ops as ops
from maefast.models import mae_vit_tiny_test
from maefast.ops._dispatch import eager_dispatch
from maefast.testing import assert_close, assert_grad_close, tol
from test_block import NAMES, _block
from test_dispatch import CASES as _DISPATCH_CASES
from test_dispatch import _case_tensors as _dispatch_case

IMPLS = ["reference", "triton"]
ROUTES = ["direct", "custom_op"]
CASES = _DISPATCH_CASES + ["vit_block", "masked_prediction_loss"]


def _case(name, device, dtype=torch.float32):
    """(fn(*leaves, impl) -> output or tuple of outputs, leaves) for op case `name`."""
    if name == "vit_block":
        blk = _block(32, 2, device)
        params = dict(blk.named_parameters())
        leaves = [torch.randn(2, 5, 32, device=device)] + [params[n].detach() for n in NAMES]
        fn = lambda x, *w, impl: ops.vit_block(x, *w, num_heads=2, impl=impl)  # noqa: E731
        return (lambda *a: fn(*a[:-1], impl=a[-1])), [t.to(dtype) for t in leaves]
    if name == "masked_prediction_loss":
        g = torch.Generator().manual_seed(2)
        _, ids_restore, _ = ops.random_masking(2, 4, 0.5, seed=3, device=device, impl="reference")
        imgs = torch.randn(2, 3, 16, 16, generator=g).to(device, dtype)
        leaves = [torch.randn(2, 5, 24, generator=g), torch.randn(192, 24, generator=g) * 0.2,
                  torch.randn(192, generator=g) * 0.1]
        fn = lambda x, w, b, impl: ops.masked_prediction_loss(x, w, b, imgs, ids_restore, 2, 8,  # noqa: E731
                                                              return_pred=True, impl=impl)
        return fn, [t.to(device, dtype) for t in leaves]
    fn, leaves = _dispatch_case(name, device)
    return fn, [t.to(dtype) for t in leaves]


def _outs(out) -> list:
    return list(out) if isinstance(out, tuple) else [out]


def _vjp(fn, leaves, us, impl):
    """J^T u for each output's u by the op's own backward (reverse mode, no transform)."""
    ls = [t.detach().clone().requires_grad_() for t in leaves]
    outs = _outs(fn(*ls, impl))
    loss = sum((o.float() * u).sum() for o, u in zip(outs, us) if o.requires_grad)
    return torch.autograd.grad(loss, ls)


def _weights(outs, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(o.device) for o in outs]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_grad_transform_matches_the_backward(name, impl, route, device):
    fn, leaves = _case(name, device)
    with eager_dispatch(route):
        us = _weights(_outs(fn(*leaves, impl)))
        expected = _vjp(fn, leaves, us, impl)
        got = torch.func.grad(lambda *ls: sum((o.float() * u).sum() for o, u in zip(_outs(fn(*ls, impl)), us)),
                              argnums=tuple(range(len(leaves))))(*leaves)
    for i, (a, e) in enumerate(zip(got, expected)):
        if e.abs().max() > 0:
            assert_grad_close(a, e, name=f"{name} d leaf {i}")
        else:
            assert torch.equal(a, e), f"{name} d leaf {i}"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_batched_gradients_are_a_loop_of_backwards(name, impl, route, device):
    """torch.autograd.grad(is_grads_batched=True), what jacobian/hessian(vectorize=True) run: vmap over the
    backward. The kernels' backward read the batched gradients' storage (NotImplementedError), and the
    references' backwards of attention, unshuffle and the patch embedding used ops vmap has no rule for."""
    fn, leaves = _case(name, device)
    ls = [t.detach().clone().requires_grad_() for t in leaves]
    with eager_dispatch(route):
        outs = _outs(fn(*ls, impl))
        per_seed = [_weights(outs, seed=s) for s in (5, 6, 7)]
        us = [torch.stack([w[i] for w in per_seed]) for i in range(len(outs))]  # (3, *out.shape) per output
        diff = [(o, u.to(o.dtype)) for o, u in zip(outs, us) if o.requires_grad]
        got = torch.autograd.grad([o for o, _ in diff], ls, [u for _, u in diff], is_grads_batched=True,
                                  allow_unused=True)
        for k in range(3):
            want = _vjp(fn, leaves, [u[k] for u in us], impl)
            for i, (a, e) in enumerate(zip(got, want)):
                assert a is not None, f"{name} d leaf {i}"
                assert_grad_close(a[k], e, name=f"{name} d leaf {i}, gradient {k}")


def _dot_identity(fn, leaves, tangents, primal_outs, jt, impl):
    """<u, J t> = <J^T u, t> for fresh u; J^T u from the op's backward."""
    us = _weights(primal_outs)
    ref = _vjp(fn, leaves, us, impl)
    lhs = sum((u * j.float()).sum() for o, u, j in zip(primal_outs, us, jt) if o.is_floating_point())
    rhs = sum((g * t).sum() for g, t in zip(ref, tangents))
    mag = sum((g * t).abs().sum() for g, t in zip(ref, tangents))
    assert abs(lhs - rhs) <= tol(torch.float32)["atol"] * mag, (lhs.item(), rhs.item(), mag.item())


@pytest.mark.parametrize("mode", ["torch.func.jvp", "forward_ad"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_jvp_is_the_transpose_of_the_backward(name, impl, route, mode, device):
    fn, leaves = _case(name, device)
    g = torch.Generator().manual_seed(7)
    tangents = [torch.randn(t.shape, generator=g).to(device) for t in leaves]
    with eager_dispatch(route):
        plain = _outs(fn(*leaves, impl))
        if mode == "torch.func.jvp":
            outs, jt = torch.func.jvp(lambda *ls: tuple(_outs(fn(*ls, impl))), tuple(leaves), tuple(tangents))
        else:
            with fwAD.dual_level():
                duals = _outs(fn(*[fwAD.make_dual(t, d) for t, d in zip(leaves, tangents)], impl))
                outs, jt = zip(*[fwAD.unpack_dual(o) for o in duals])
        assert all(j is not None for j in jt), "a tangent was dropped"
    for o, p in zip(outs, plain):  # the primal is the op's value (reference math: the table's tolerance)
        assert_close(o, p, name=f"{name} primal")
    _dot_identity(fn, leaves, tangents, plain, jt, impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_vmap_is_a_loop(name, impl, dtype, device):
    if name == "masked_patch_embed" and dtype != torch.float32:
        pytest.skip("the case's images are fp32, which a 16-bit weight refuses outside autocast")
    fn, leaves = _case(name, device, dtype)
    xs = torch.stack([leaves[0], -0.5 * leaves[0], leaves[0].flip(-1)])
    got = _outs(torch.func.vmap(lambda x: fn(x, *leaves[1:], impl))(xs))
    loop = [_outs(fn(x, *leaves[1:], impl)) for x in xs]
    for k, v in enumerate(got):
        assert_close(v, torch.stack([o[k] for o in loop]), dtype, name=f"{name} output {k}")


def test_random_masking_under_vmap_ranks_each_noise_row(device):
    noise = torch.rand(3, 2, 16, device=device)
    got = torch.func.vmap(lambda n: tuple(ops.random_masking(2, 16, 0.75, noise=n)))(noise)
    for i in range(3):
        for a, e in zip(got, ops.random_masking(2, 16, 0.75, noise=noise[i], impl="reference")):
            assert torch.equal(a[i], e)


def _model(impl, fused, device):
    torch.manual_seed(0)
    m = mae_vit_tiny_test(impl=impl, fused=fused).to(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    noise = torch.rand(2, m.pos_embed.shape[1] - 1, device=device)
    return m, imgs, noise


@pytest.mark.parametrize("fused", [False, "block"])
@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_model_per_sample_grads_and_jvp(impl, fused, device):
    """torch.func over a whole model: functional_call + grad (the batch's gradient, as backward gives it),
    vmap(grad) (per-sample gradients: each the gradient of that sample alone) and jvp (by the dot identity)."""
    m, imgs, noise = _model(impl, fused, device)
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}

    def loss(p, x, n):
        return torch.func.functional_call(m, p, (x,), {"mask_ratio": 0.75, "noise": n})[0]

    m.zero_grad()
    m(imgs, mask_ratio=0.75, noise=noise)[0].backward()
    expected = {k: v.grad for k, v in m.named_parameters() if v.requires_grad}
    got = torch.func.grad(loss)(params, imgs, noise)
    for k in params:
        assert_grad_close(got[k], expected[k], name=k)

    per_sample = torch.func.vmap(torch.func.grad(lambda p, x, n: loss(p, x[None], n[None])),
                                 in_dims=(None, 0, 0))(params, imgs, noise)
    for i in range(2):
        m.zero_grad()
        m(imgs[i:i + 1], mask_ratio=0.75, noise=noise[i:i + 1])[0].backward()
        for k, v in m.named_parameters():
            if v.requires_grad:
                assert_grad_close(per_sample[k][i], v.grad, name=f"sample {i} {k}")

    g = torch.Generator().manual_seed(3)
    tangents = {k: torch.randn(v.shape, generator=g).to(device) for k, v in params.items()}
    _, jt = torch.func.jvp(lambda p: loss(p, imgs, noise), (params,), (tangents,))
    rhs = sum((expected[k] * tangents[k]).sum() for k in params)
    mag = sum((expected[k] * tangents[k]).abs().sum() for k in params)
    assert abs(jt - rhs) <= tol(torch.float32)["atol"] * mag


@pytest.mark.parametrize("impl", IMPLS)
def test_transforms_inside_torch_compile(impl, device):
    """torch.compile of a function applying a transform: Dynamo traces the ops under the transform, where
    the custom op would give jvp a zero tangent (silently) and grad a tracing error."""
    fn, (x, w, b) = _case("layer_norm", device)
    t = torch.randn_like(x)
    f = lambda x: fn(x, w, b, impl)  # noqa: E731
    us = _weights([f(x)])
    (ref_g,) = _vjp(lambda x, impl: fn(x, w, b, impl), [x], us, impl)
    torch._dynamo.reset()
    jvp = torch.compile(lambda x, t: torch.func.jvp(f, (x,), (t,)), fullgraph=True, backend="eager")
    grad = torch.compile(torch.func.grad(lambda x: (f(x) * us[0]).sum()), fullgraph=True, backend="eager")
    y, jt = jvp(x, t)
    _dot_identity(lambda x, impl: fn(x, w, b, impl), [x], [t], [y], [jt], impl)
    assert_grad_close(grad(x), ref_g)


@pytest.mark.no_triton_launch  # under a transform every impl runs the reference math: nothing launches
@pytest.mark.parametrize("impl", IMPLS)
def test_hessian_is_exact_under_transforms(impl, device):
    """The kernels' backwards are first order only (create_graph=True raises: test_dispatch); under
    torch.func the reference math is differentiated by torch itself, to any order."""
    x = torch.randn(3, 8, device=device)
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    u = torch.randn(3, 8, device=device)
    got = torch.func.hessian(lambda x: (ops.layer_norm(x, w, b, impl=impl) * u).sum())(x)
    expected = torch.func.hessian(lambda x: (torch.nn.functional.layer_norm(x, (8,), w, b, 1e-6) * u).sum())(x)
    assert_grad_close(got, expected)


def test_index_values_are_checked_under_transforms_unless_batched():
    """A CPU index tensor's values are checked as outside a transform (under grad, jvp, and vmap of other
    arguments); only one vmap batches has no single value to read, and goes unchecked."""
    x, tok, pos = torch.randn(2, 3, 16), torch.randn(1, 1, 16), torch.randn(1, 5, 16)
    bad = torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]])

    def f(x, ids):
        return ops.unshuffle(x, tok, ids, pos).sum()

    with pytest.raises(ValueError, match="ids_restore must hold a permutation"):
        torch.func.grad(f)(x, bad)
    with pytest.raises(ValueError, match="ids_restore must hold a permutation"):
        torch.func.vmap(torch.func.grad(lambda x: f(x, bad)))(torch.stack([x, x]))
    good = torch.tensor([[3, 0, 1, 2], [0, 1, 2, 3]])
    got = torch.func.vmap(lambda ids: f(x, ids))(torch.stack([good, good.flip(0)]))
    assert_close(got, torch.stack([f(x, good), f(x, good.flip(0))]))
