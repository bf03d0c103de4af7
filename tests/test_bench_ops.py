"""The op benchmarks' rows, checked on the CPU at their tiny sizes: each baseline computes what the official
facebookresearch/mae code computes (maefast.reference, an independent composition or the official order),
each maefast / SDPA row computes the same thing from the same inputs, the reference row is the group's
baseline, and the FLOPs a row is charged are what FlopCounterMode counts. A benchmark whose baseline drifted
from the official computation would still run and report a speed-up, against the wrong thing."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from maefast import reference as R
from maefast.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bench(monkeypatch):
    """bench(name): benchmarks/<name>.py imported fresh from the checkout, with its `run_bench` recording
    each call's fn and keywords in `.runs` instead of timing."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    names = []

    def load(name):
        sys.modules.pop(name, None)
        mod = importlib.import_module(name)
        names.append(name)
        mod.runs = []
        monkeypatch.setattr(mod, "run_bench", lambda benchmark, fn, **kw: mod.runs.append(dict(kw, fn=fn)) or {})
        return mod

    yield load
    for name in names:
        sys.modules.pop(name, None)


def _mask_from_restore(ids_restore: torch.Tensor, keep: int) -> torch.Tensor:
    """The official mask: ones with the first `keep` (shuffle order) zeroed, gathered back by ids_restore."""
    return (ids_restore >= keep).float()


# -- bench_masking ---------------------------------------------------------------------------------

def test_masking_baseline_is_the_official_order_and_the_maefast_row_computes_the_same(bench):
    bm = bench("bench_masking")
    imgs, weight, bias, pos, p, _, useful, shape = bm._setup(bm.CASES[0], CPU)
    N, L, K = shape["N"], shape["L"], shape["K"]
    assert K == int(L * (1 - bm.RATIO))  # the official len_keep
    torch.manual_seed(7)
    x, mask, ids_restore = bm._reference_composition(imgs, weight, bias, pos, p, bm.RATIO)
    torch.manual_seed(7)
    ids = R.masking_ids(N, L, bm.RATIO, noise=torch.rand(N, L))  # the noise the composition drew
    assert torch.equal(ids_restore, ids.ids_restore) and torch.equal(mask, ids.mask)
    assert_close(x, R.masked_patch_embed(imgs, ids.ids_keep, weight, bias, pos, p), name="tokens")
    x, mask, ids_restore = bm._maefast_composition(imgs, weight, bias, pos, p, bm.RATIO, "auto")
    keep = torch.argsort(ids_restore, dim=1)[:, :K]
    assert torch.equal(mask, _mask_from_restore(ids_restore, K))
    assert_close(x, R.masked_patch_embed(imgs, keep, weight, bias, pos, p), name="maefast tokens")
    # the useful FLOPs: the patch embedding of the K kept patches (the conv of all L, times K / L)
    with FlopCounterMode(display=False) as fc:
        F.conv2d(imgs, weight, bias, stride=p)
    assert useful["flops"] * L == fc.get_total_flops() * K


def test_patch_gather_moves_the_kept_pixels_twice(bench):
    """GB/s of the gather: the kept pixels read once and written once as rows, plus the int64 ids."""
    bm = bench("bench_masking")
    bm.test_patch_gather(None, CPU, bm.CASES[0], "reference")
    (run,) = bm.runs
    rows = run["fn"]()
    N, K = run["shape"]["N"], run["shape"]["K"]
    assert rows.numel() == N * K * 3 * run["shape"]["p"] ** 2
    assert run["bytes_moved"] == 2 * rows.numel() * rows.element_size() + N * K * 8 and run["baseline"]


@pytest.mark.parametrize("provider", ["reference", "maefast"])
def test_random_masking_rows_give_the_official_index_triple(bench, provider):
    """ids_keep (N, K), ids_restore (a permutation) and mask (0 exactly at the kept patches), K the official
    int(L * (1 - ratio)); the reference row is the group's baseline."""
    bm = bench("bench_masking")
    bm.test_random_masking(None, CPU, bm.CASES[0], provider)
    (run,) = bm.runs
    assert run["group"] == "random-masking" and run["baseline"] == (provider == "reference")
    out = run["fn"]()
    ids_keep, ids_restore, mask = (out.ids_keep, out.ids_restore, out.mask) if provider == "maefast" else out
    N, L = run["shape"]["N"], run["shape"]["L"]
    K = int(L * (1 - bm.RATIO))
    assert ids_keep.shape == (N, K) and torch.equal(torch.sort(ids_restore, 1).values, torch.arange(L).expand(N, L))
    assert torch.equal(torch.argsort(ids_restore, 1)[:, :K], ids_keep)
    assert torch.equal(mask.float(), _mask_from_restore(ids_restore, K))


def test_mask_embed_rows_baseline_and_fwd_bwd_grads(bench):
    """The reference row is each group's baseline; the fwd+bwd rows of the official composition and of
    maefast give the same patch-embedding grads for the same kept patches (ones as the upstream grad)."""
    bm = bench("bench_masking")
    for provider in ("reference", "maefast"):
        bm.test_mask_embed_fwd(None, CPU, bm.CASES[0], provider)
        bm.test_mask_embed_fwd_bwd(None, CPU, bm.CASES[0], provider)
    assert [(r["group"], r["baseline"]) for r in bm.runs] == [
        ("mask-embed-fwd", True), ("mask-embed-fwd-bwd", True), ("mask-embed-fwd", False),
        ("mask-embed-fwd-bwd", False)]
    assert all(r["shape"]["K"] == int(r["shape"]["L"] * (1 - bm.RATIO)) for r in bm.runs)
    gw, gb = bm.runs[1]["fn"]()
    # with upstream ones, the grads do not depend on which K patches were kept beyond their sum
    imgs, weight, bias, pos, p, _, _, shape = bm._setup(bm.CASES[0], CPU, requires_grad=True)
    assert_close(gb, torch.full_like(gb, shape["N"] * shape["K"]), name="bias grad")
    assert gw.shape == weight.shape and torch.isfinite(gw).all()


# -- bench_loss ------------------------------------------------------------------------------------

def _official_loss_masked(imgs, pred, ids_restore, p):
    """forward_loss (norm_pix_loss=True) of a full prediction holding pred's rows at the masked patches."""
    N, L = ids_restore.shape
    K = L - pred.shape[1]
    full = torch.zeros(N, L, pred.shape[-1], dtype=pred.dtype)
    masked = torch.argsort(ids_restore, 1)[:, K:]
    full.scatter_(1, masked.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), pred.detach())
    return R.forward_loss(imgs, full, _mask_from_restore(ids_restore, K), p, norm_pix_loss=True)


@pytest.mark.parametrize("pred_on", ["masked", "all"])
def test_loss_rows_compute_the_official_norm_pix_loss(bench, pred_on):
    bl = bench("bench_loss")
    imgs, pred, idx, p, _, fwd_bytes, bwd_bytes, shape = bl._setup(bl.CASES[0], CPU, pred_on)
    L, K = shape["L"], shape["K"]
    # GB/s: the forward reads pred and the masked patches' pixels; fwd+bwd adds writing the weighted
    # residual, reading it back and writing pred's grad (3 x pred)
    assert fwd_bytes == pred.numel() * 4 + imgs.numel() // L * (L - K) * 4
    assert bwd_bytes == fwd_bytes + 3 * pred.numel() * 4
    assert K == int(L * (1 - bl.RATIO))
    if pred_on == "masked":
        assert pred.shape[1] == L - K and torch.equal(torch.sort(idx, 1).values, torch.arange(L).expand_as(idx))
        want = _official_loss_masked(imgs, pred, idx, p)
    else:
        assert pred.shape[1] == L and set(idx.unique().tolist()) == {0.0, 1.0} and (idx.sum(1) == L - K).all()
        want = R.forward_loss(imgs, pred.detach(), idx, p, norm_pix_loss=True)
    for provider in ("reference", "maefast"):
        got = bl._loss_fn(provider, pred_on)(pred, imgs, idx, p)
        assert_close(got, want, name=f"{provider} loss")
    test = bl.test_loss_masked_fwd_bwd if pred_on == "masked" else bl.test_loss_all_fwd_bwd
    for provider in ("reference", "maefast"):
        torch.manual_seed(0)  # as benchmarks/conftest.py seeds each case: both rows get the same inputs
        test(None, CPU, bl.CASES[0], provider)
    assert [r["baseline"] for r in bl.runs] == [True, False]
    assert [r["group"] for r in bl.runs] == [f"loss-{pred_on}-fwd-bwd"] * 2
    g_ref, g_ours = (r["fn"]()[0] for r in bl.runs)
    assert_close(g_ours, g_ref, name="grad pred")


# -- bench_unshuffle -------------------------------------------------------------------------------

def test_unshuffle_rows_compute_the_official_decoder_input(bench):
    bu = bench("bench_unshuffle")
    x, tok, ids, pos, _, _, _, shape = bu._setup(bu.CASES[0], CPU)
    assert shape["K"] == int(shape["L"] * (1 - bu.RATIO)) and x.shape[1] == 1 + shape["K"]
    want = R.unshuffle(x.detach(), tok.detach(), ids, pos)
    # spelled out: the cls token first, then each patch's visible token or the mask token, plus positions
    keep = torch.argsort(ids, 1)[:, :shape["K"]]
    assert torch.equal(want[:, 0], x[:, 0].detach() + pos[0, 0])
    n = torch.arange(x.shape[0]).unsqueeze(1)
    assert_close(want[:, 1:][n, keep], x[:, 1:].detach() + pos[0, 1:][keep], name="visible")
    for provider in ("reference", "maefast"):
        assert_close(bu._fn(provider)(x, tok, ids, pos), want, name=provider)
        torch.manual_seed(0)  # as benchmarks/conftest.py seeds each case: both rows get the same inputs
        bu.test_unshuffle_fwd_bwd(None, CPU, bu.CASES[0], provider)
    assert [r["baseline"] for r in bu.runs] == [True, False]
    (gx_ref, gt_ref), (gx, gt) = (r["fn"]() for r in bu.runs)
    assert_close(gx, gx_ref, name="grad x") and assert_close(gt, gt_ref, name="grad token")


# -- bench_fused -----------------------------------------------------------------------------------

def _fused_oracle(group, inputs):
    """The block's ops with the official ViT's LayerNorm eps (1e-6) and exact GELU."""
    op = group.split("-")[0]
    if op == "add_ln":
        x, r, w, b = inputs
        s = x + r
        return [F.layer_norm(s, (s.shape[-1],), w, b, 1e-6), s]
    if op == "ln":
        x, w, b = inputs
        return [F.layer_norm(x, (x.shape[-1],), w, b, 1e-6)]
    x, b = inputs
    return [F.gelu(x + b)]


@pytest.mark.parametrize("group", ["add_ln-fwdbwd", "ln-fwdbwd", "bias_gelu-fwdbwd"])
def test_fused_rows_compute_the_blocks_ops(bench, group):
    """eager (the baseline), triton (the custom ops) and triton-raw (the launchers) give the forward of the
    official ops and, with the same upstream grads, their input grads (small shapes: Triton interpreted)."""
    bf = bench("bench_fused")
    inputs, grads, _, _ = bf._case(group, 6, 64, "tiny-enc", CPU, torch.float32)
    if "ln" in group:  # activations of variance ~1e-6, where LayerNorm's eps weighs as much as the variance
        inputs = [t.detach().mul(1e-3).requires_grad_() if t.dim() == 2 else t for t in inputs]
    want = _fused_oracle(group, inputs)
    want_g = torch.autograd.grad(want, inputs, grads)
    for provider in ("eager", "triton"):
        out = bf._fn(group, provider)(*inputs)
        out = list(out) if isinstance(out, tuple) else [out]
        for o, w in zip(out, want):
            assert_close(o, w, name=f"{provider} out")
        for g, w in zip(torch.autograd.grad(out, inputs, grads), want_g):
            assert_close(g, w, name=f"{provider} grad")
    raw = bf._raw(group)(inputs, grads)  # (dx, then the parameters' grads): add_ln's dr is its dx
    assert len(raw) == (3 if "ln" in group else 2)
    for g, w in zip(raw, (want_g[0],) + want_g[len(want_g) - len(raw) + 1:]):
        assert_close(g, w, name="raw grad")
    fwd = bf._raw(group.replace("fwdbwd", "fwd"))(inputs, None)
    assert_close(fwd if torch.is_tensor(fwd) else fwd[0], want[0], name="raw out")


@pytest.mark.parametrize("provider", ["triton"])
@pytest.mark.parametrize("group", ["add_ln-fwd", "ln-fwdbwd", "bias_gelu-fwd"])
def test_fused_triton_rows_run_triton(bench, group, provider):
    """The triton row times maefast's Triton kernels, not a fallback (tests/conftest.py fails a test
    parametrized "triton" that launches none)."""
    bf = bench("bench_fused")
    inputs, grads, _, _ = bf._case(group, 4, 64, "tiny-enc", CPU, torch.float32)
    out = bf._fn(group, provider)(*inputs)
    if grads is not None:
        torch.autograd.grad(out, inputs, grads)


def test_fused_rows_baseline_is_eager_and_gelu_runs_at_the_mlp_width(bench):
    """The eager composition is each group's baseline; bias+GELU runs on fc1's output: 4x the width in an
    encoder (mlp_ratio 4), 2048 = 4 x 512 in the official decoder; LayerNorm at the width itself."""
    bf = bench("bench_fused")
    widths = [bf._case(g, 2, 32, name, CPU, torch.float32)[3]["width"]
              for g, name in (("bias_gelu-fwd", "x-enc"), ("bias_gelu-fwd", "x-dec"), ("ln-fwdbwd", "x-enc"))]
    assert widths == [128, 2048, 32]
    for provider in ("eager", "triton"):
        bf.test_fused(None, CPU, bf.CASES[0], "bias_gelu-fwd", provider)
    assert [r["baseline"] for r in bf.runs] == [True, False] and bf.runs[0]["group"] == "bias_gelu-fwd"


# -- bench_attention -------------------------------------------------------------------------------

def _packed(qkv_grads_or_out, H):
    """An SDPA row's (N, H, L, Dh) output, or its (dq, dk, dv), in the packed layout of the official rows."""
    if isinstance(qkv_grads_or_out, torch.Tensor):
        return qkv_grads_or_out.transpose(1, 2).flatten(2)
    return torch.stack([g.transpose(1, 2) for g in qkv_grads_or_out], 2).flatten(2)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_attention_rows_compute_the_official_attention(bench, mode):
    """official (the baseline), SDPA's math backend on the strided q/k/v views with dO as proj hands it, and
    interpreted Triton: the same attention, with the official scale Dh^-0.5, from the same packed qkv."""
    ba = bench("bench_attention")
    case = ba.CASES[0]
    N, L, H, D = case["N"], case["L"], case["H"], case["D"]
    qkv = torch.randn(N, L, 3 * H * D, requires_grad=mode == "fwdbwd")
    dout = torch.randn(N, L, H * D)
    want = R.attention(qkv.detach(), H)  # default scale: head_dim ** -0.5
    if mode == "fwdbwd":
        x = qkv.detach().requires_grad_()
        want = torch.autograd.grad(R.attention(x, H), x, dout)[0]
    for provider in ba.CPU_PROVIDERS:
        fn, _ = ba._make(provider, mode, qkv, H, dout)
        got = fn()
        got = _packed(got, H) if provider.startswith("sdpa") else got
        assert_close(got, want, torch.float32, name=provider, scale=10)
    for provider in ba.CPU_PROVIDERS:
        ba._run_case(None, CPU, case, provider, mode)
    assert [r["baseline"] for r in ba.runs] == [p == "official" for p in ba.CPU_PROVIDERS]
    assert {r["group"] for r in ba.runs} == {f"attention-{mode}"}
    with FlopCounterMode(display=False) as fc:  # QK^T and PV of the official forward
        R.attention(qkv.detach(), H)
    assert ba.runs[0]["flops"] == fc.get_total_flops() * (1.0 if mode == "fwd" else 3.5)  # 3.5: nominal fwd+bwd


@pytest.mark.parametrize("provider", ["triton"])
def test_attention_triton_row_runs_triton(bench, provider):
    """The attention rows' maefast provider launches maefast's Triton kernels (see the fused rows' twin)."""
    ba = bench("bench_attention")
    N, L, H, D = 1, 50, 1, 64
    fn, _ = ba._make(provider, "fwd", torch.randn(N, L, 3 * H * D), H, torch.randn(N, L, H * D))
    assert fn().shape == (N, L, H * D)


def test_maefast_attention_rows_get_their_ratio_to_the_best_sdpa_backend(bench):
    """After the module, each maefast row's speedup_vs_best_sdpa is the fastest SDPA backend's time / its own
    (the issue's target), not its ratio to itself or to the official baseline; SDPA rows get none."""
    ba = bench("bench_attention")
    rows = [dict(group="attention-fwd", shape_key="k", provider=p, time_ms=t, cuda_graph=False)
            for p, t in (("official", 20.0), ("sdpa-math", 10.0), ("sdpa-flash", 3.0), ("triton", 2.0))]
    ba.RESULTS.extend(rows)
    try:
        summaries = ba._summaries.__wrapped__()
        next(summaries)
        next(summaries, None)
    finally:
        del ba.RESULTS[-len(rows):]
    assert rows[3]["speedup_vs_best_sdpa"] == pytest.approx(1.5) and rows[3]["best_sdpa_provider"] == "sdpa-flash"
    assert not any("speedup_vs_best_sdpa" in r for r in rows[:3])


# -- bench_block -----------------------------------------------------------------------------------

def test_block_rows_are_the_same_block_three_ways_with_the_official_eps(bench):
    """official, ops and block rows: one pre-norm ViT block (qkv bias, LayerNorm eps 1e-6 as the official
    factories pass it), so loaded with the same weights they give the same output; only the block row is
    the fused op; the FLOPs charged are FlopCounterMode's count of the official block's forward + backward."""
    bb = bench("bench_block")
    name, n, t, d, h = bb.CASES[0]
    blocks = {p: bb._make(p, d, h, CPU) for p in bb.PROVIDERS}
    ref = blocks["official"]
    assert ref.attn.qkv.bias is not None and ref.norm1.eps == ref.norm2.eps == 1e-6
    assert [bool(blocks[p].fused) for p in ("ops", "block")] == [False, True]
    x = torch.randn(n, t, d)
    want = ref(x)
    for p in ("ops", "block"):
        blocks[p].load_state_dict(ref.state_dict())
        assert_close(blocks[p](x), want, name=p)
    for p in bb.PROVIDERS:
        bb.test_block_fwd_bwd(None, CPU, bb.CASES[0], p)
    assert [r["baseline"] for r in bb.runs] == [p == "official" for p in bb.PROVIDERS]
    x.requires_grad_()
    with FlopCounterMode(display=False) as fc:  # the row's grads: of x and of every parameter
        ref(x).backward(torch.randn(n, t, d))
    assert bb.runs[0]["flops"] == fc.get_total_flops()
    assert len(bb.runs[0]["fn"]()) == 1 + len(list(ref.parameters()))
