"""visible_attention's sequence offsets (cu_seqlens, max_seqlen) and column offsets, bad and unusual:
host offsets refused before any kernel, trusted device offsets kept in bounds with the rows they
cannot compute NaN (Triton, the reference, and on a GPU the CUDA C++ kernel), strided offsets, int64
offsets narrowed to int32 without wrapping into well-formed ones, column offsets past int32 copied
first. The cases that crashed a process before (out-of-bounds reads and writes) run in a subprocess,
so that a crash fails its test instead of the suite. The other ops' bad inputs: tests/test_validation.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from maefast import reference as R
from maefast._triton import HAS_TRITON
from maefast.ops import visible_attention
from maefast.testing import assert_close, randn

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
IMPLS = [pytest.param("triton", marks=needs_triton), "reference"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, DH = 2, 16  # attention cases: 2 heads of 16


def run_isolated(code: str, *argv: str) -> str:
    """Runs `code` (sys.argv[1:] = argv) in a fresh interpreter on this checkout (Triton interpreted
    without a GPU), so that a crash fails the calling test only; returns its stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"exit code {res.returncode} (negative: killed by that signal)\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cu", [[-4, 3, 10], [0, 1000], [0, 4, 12], [0, 7, 4, 10]],
                         ids=["negative", "beyond-tokens", "above-rows", "decreasing"])
@pytest.mark.no_triton_launch  # a refusal / meta tensors: no kernel runs
def test_attention_bad_offsets_are_refused_on_the_host(impl, cu):
    """CPU offsets are checked whether or not max_seqlen is given (free there); before, a given
    max_seqlen skipped the check and the Triton kernels read and wrote out of bounds."""
    out = run_isolated(f"""
        import torch
        from maefast.ops import visible_attention
        qkv = torch.randn(10, 3 * {H} * {DH}, requires_grad=True)
        cu = torch.tensor({cu}, dtype=torch.int32)
        for max_seqlen in (None, 10):
            try:
                visible_attention(qkv, {H}, cu_seqlens=cu, max_seqlen=max_seqlen, impl={impl!r}).sum().backward()
                print("no error")
            except ValueError as e:
                print("ValueError:", e)
    """)
    lines = out.splitlines()
    assert len(lines) == 2 and all(ln.startswith("ValueError: cu_seqlens must") for ln in lines), out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cu,max_seqlen", [([0, 40], 16), ([0, 40], 0), ([0, 30, 40], 20)],
                         ids=["below-T/B", "zero", "below-longest"])
@pytest.mark.no_triton_launch  # a refusal / meta tensors: no kernel runs
def test_attention_too_small_max_seqlen_is_refused_on_the_host(impl, cu, max_seqlen):
    qkv = randn(40, 3 * H * DH)
    with pytest.raises(ValueError, match="max_seqlen"):
        visible_attention(qkv, H, cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max_seqlen, impl=impl)


def _seq_reference(qkv, g, s, e):
    """(out, dqkv) of rows [s, e) attending among themselves, plain autograd."""
    x = qkv[s:e].detach().requires_grad_()
    out = R.attention(x.unsqueeze(0), H)[0]
    return out, torch.autograd.grad(out, x, g[s:e])[0]


ALL_NAN = ((0, 40),)


@needs_triton
@pytest.mark.parametrize("cu,max_seqlen,nan_rows,good", [
    ([0, 30, 40], 20, ((0, 30),), ((30, 40),)),
    ([0, 20, 30], 20, ((30, 40),), ((0, 20), (20, 30))),
    ([0, 10, 1000], 40, ALL_NAN, ()),
    ([-4, 3, 40], 40, ALL_NAN, ()),
    ([5, 20, 40], 20, ALL_NAN, ()),
    ([0, 25, 15, 40], 25, ALL_NAN, ()),
    ([0, 30, 20, 25, 40], 40, ALL_NAN, ()),
    ([0, 0, 0], 0, ALL_NAN, ()),
], ids=["longer-than-max_seqlen", "padding-after-the-last", "end-beyond-rows", "negative-start", "nonzero-start",
        "decreasing", "decreasing-unfused-bwd", "only-padding"])
def test_attention_device_offsets_stay_in_bounds_and_bad_offsets_come_out_nan(cu, max_seqlen, nan_rows, good,
                                                                               tmp_path):
    """The on-device contract, through the custom op (which, like a GPU run given max_seqlen, does
    not read the offsets on the host): no access leaves the tensors; a sequence longer than
    max_seqlen comes out NaN (output, logsumexp and gradient) and the others exact; rows after the
    last offset (padding) are NaN; offsets that do not start at 0, decrease or end beyond the rows
    make every row NaN, since sequences they make overlap would race on shared rows. max_seqlen
    <= 32 runs the fused backward, 40 the two-kernel one. Before: rows left as zeros, out-of-bounds
    accesses (hence the subprocess), and for decreasing offsets rows written twice, no NaN."""
    path = str(tmp_path / "res.pt")
    run_isolated(f"""
        import sys, torch
        from maefast.ops import attention as attn_mod
        torch.manual_seed(0)
        qkv = torch.randn(1, 40, 3 * {H} * {DH}, requires_grad=True)
        cu = torch.tensor({cu}, dtype=torch.int32)
        out, lse = attn_mod._visible_attention(qkv, {H}, cu, {max_seqlen}, None, "triton")
        g = torch.randn_like(out)
        dqkv, = torch.autograd.grad(out, qkv, g)
        torch.save(dict(qkv=qkv.detach()[0], out=out.detach()[0], lse=lse[0], g=g[0], dqkv=dqkv[0]), sys.argv[1])
    """, path)
    r = torch.load(path)
    for s, e in nan_rows:
        assert r["out"][s:e].isnan().all() and r["lse"][:, s:e].isnan().all() and r["dqkv"][s:e].isnan().all()
    for a, b in good:  # the well-formed sequences: exact
        out, dq = _seq_reference(r["qkv"], r["g"], a, b)
        assert_close(r["out"][a:b], out, torch.float32, name="out")
        assert_close(r["dqkv"][a:b], dq, torch.float32, name="dqkv")
        assert not r["lse"][:, a:b].isnan().any()


@pytest.mark.parametrize("cu,max_seqlen,nan_rows,good", [
    ([0, 30, 40], 20, ((0, 30),), ((30, 40),)),
    ([0, 20, 30], 20, ((30, 40),), ((0, 20), (20, 30))),
    ([0, 10, 1000], 40, ALL_NAN, ()),
    ([5, 20, 40], 20, ALL_NAN, ()),
    ([0, 25, 15, 40], 25, ALL_NAN, ()),
    ([0, 0, 0], 0, ALL_NAN, ()),
], ids=["longer-than-max_seqlen", "padding-after-the-last", "end-beyond-rows", "nonzero-start", "decreasing",
        "only-padding"])
def test_reference_attention_keeps_the_device_offsets_contract(cu, max_seqlen, nan_rows, good):
    """The reference backend (what "auto" takes on a GPU for a head dim or dtype the kernels refuse) under
    the kernels' contract for trusted offsets: NaN rows where they are, the well-formed sequences exact
    (before: a RuntimeError from a size mismatch or a negative repeat count)."""
    from maefast.ops import attention as attn_mod

    torch.manual_seed(0)
    qkv = torch.randn(1, 40, 3 * H * DH, requires_grad=True)
    out, lse = attn_mod._visible_attention(qkv, H, torch.tensor(cu, dtype=torch.int32), max_seqlen, None,
                                           "reference")
    g = torch.randn_like(out)
    dqkv, = torch.autograd.grad(out, qkv, g)
    for s, e in nan_rows:
        assert out[0, s:e].isnan().all() and lse[0, :, s:e].isnan().all() and dqkv[0, s:e].isnan().all()
    for a, b in good:
        want, dq = _seq_reference(qkv.detach()[0], g[0], a, b)
        assert_close(out[0, a:b], want, torch.float32, name="out")
        assert_close(dqkv[0, a:b], dq, torch.float32, name="dqkv")
        assert not lse[0, :, a:b].isnan().any()


@pytest.mark.parametrize("impl", [pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("cu,max_seqlen", [([0, 25, 15, 40], 25), ([5, 20, 40], 25), ([0, 20, 50], 25),
                                           ([0, 30, 40], 20), ([0, 36, 40], 20), ([0, 20, 30], 20)],
                         ids=["decreasing", "nonzero-start", "end-beyond-rows", "longer-than-max_seqlen",
                              "longer-than-the-padded-length", "padding-after-the-last"])
def test_cuda_kernel_keeps_the_device_offsets_contract(cu, max_seqlen, impl, device):
    """The CUDA C++ forward on trusted offsets (the op called directly, as a GPU caller's device offsets
    with max_seqlen: no host check), on a card or under the CPU emulation: its per-sequence poison and
    its block vote over the whole offset array put NaN exactly where the reference's contract does (out
    and lse), every other row as the reference. (A negative start, which the kernel clamps, is left to
    the subprocess test above: a regression there would write outside the tensors.)"""
    qkv = randn(1, 40, 3 * H * 32, dtype=torch.float16, device=device)
    offsets = torch.tensor(cu, dtype=torch.int32, device=device)
    got = torch.ops.maefast.visible_attention(qkv, H, offsets, max_seqlen, None, impl)
    want = torch.ops.maefast.visible_attention(qkv, H, offsets, max_seqlen, None, "reference")
    for name, g, w, dtype in zip(("out", "lse"), got, want, (torch.float16, torch.float32)):
        assert torch.equal(g.isnan(), w.isnan()), f"{cu} max_seqlen={max_seqlen}: NaN rows of {name} differ"
        ok = ~w.isnan()
        assert_close(g[ok], w[ok], dtype, scale=100 if name == "lse" else 1, name=f"{cu} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_strided_cu_seqlens(impl):
    """A strided view is read through its strides, not as contiguous memory (before: the Triton
    kernels read [0, 7, 4] instead of [0, 4, 10], 1.66 off, forward and backward)."""
    cu = torch.tensor([0, 7, 4, 7, 10], dtype=torch.int32)[::2]
    qkv = randn(10, 3 * H * DH).requires_grad_()
    g = randn(10, H * DH)
    out = visible_attention(qkv, H, cu_seqlens=cu, max_seqlen=6, impl=impl)
    dq, = torch.autograd.grad(out, qkv, g)
    for a, b in ((0, 4), (4, 10)):
        ref_out, ref_dq = _seq_reference(qkv, g, a, b)
        assert_close(out[a:b], ref_out, torch.float32, name="out")
        assert_close(dq[a:b], ref_dq, torch.float32, name="dqkv")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_attention_too_small_max_seqlen_gives_nan_rows(impl):
    dtype = torch.float16
    qkv = randn(40, 3 * H * 32, dtype=dtype, device="cuda")
    cu = torch.tensor([0, 30, 40], dtype=torch.int32, device="cuda")
    out = visible_attention(qkv, H, cu_seqlens=cu, max_seqlen=20, impl=impl)  # trusted: no sync
    assert out[:30].isnan().all()
    ref = R.attention(qkv[30:].unsqueeze(0).float(), H)[0]
    assert_close(out[30:], ref.to(dtype), dtype, name="good sequence")
    strided = torch.tensor([0, 7, 4, 7, 10, 0, 40], dtype=torch.int32, device="cuda")[::2]  # [0, 4, 10, 40]
    got = visible_attention(qkv, H, cu_seqlens=strided, max_seqlen=30, impl=impl)
    want = visible_attention(qkv, H, cu_seqlens=strided.contiguous(), impl="reference")
    assert_close(got, want, dtype, name="strided cu_seqlens")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("cu", [[0, 25, 15, 40], [5, 20, 40], [0, 20, 50]],
                         ids=["decreasing", "nonzero-start", "end-beyond-rows"])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_gpu_attention_malformed_offsets_make_every_row_nan(impl, cu, cu_dtype):
    """Trusted device offsets that break the contract poison every sequence (forward; the gradient
    through the Triton backward for both impls): decreasing ones make well-formed neighbours
    overlap, which before raced on rows 15-24 with no NaN anywhere."""
    qkv = randn(40, 3 * H * 32, dtype=torch.float16, device="cuda").requires_grad_()
    out = visible_attention(qkv, H, cu_seqlens=torch.tensor(cu, dtype=cu_dtype, device="cuda"), max_seqlen=25,
                            impl=impl)  # trusted: no sync
    assert out.isnan().all()
    dqkv, = torch.autograd.grad(out, qkv, torch.randn_like(out))
    assert dqkv.isnan().all()
    padded = visible_attention(qkv, H, cu_seqlens=torch.tensor([0, 20, 30], dtype=cu_dtype, device="cuda"),
                               max_seqlen=20, impl=impl)
    assert padded[30:].isnan().all() and not padded[:30].isnan().any()


def _malformed(cu: list[int], total: int) -> bool:
    """The kernels' contract check (kernels/attention.py `_offsets_malformed`, csrc/attention.cu)."""
    return cu[0] != 0 or cu[-1] > total or any(b < a for a, b in zip(cu[:-1], cu[1:]))


def test_int64_offsets_reach_the_cuda_kernel_as_int32_without_wrapping_into_well_formed_ones():
    from maefast.ops.attention import int32_offsets

    total = 100
    wrapping = torch.tensor([0, 2 ** 32 + 50], dtype=torch.int64)  # a plain int32 cast gives [0, 50]
    assert _malformed(wrapping.tolist(), total) and not _malformed(wrapping.to(torch.int32).tolist(), total)
    assert _malformed(int32_offsets(wrapping, total).tolist(), total)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(2, 7, (1,), generator=g))
        big = torch.randint(-2 ** 40, 2 ** 40, (n,), generator=g)
        small = torch.randint(-3, total + 4, (n,), generator=g)
        cu = torch.where(torch.rand(n, generator=g) < 0.3, big, small).sort().values
        if torch.rand(1, generator=g) < 0.5:  # unsorted too
            cu = cu[torch.randperm(n, generator=g)]
        got = int32_offsets(cu, total)
        assert got.dtype == torch.int32 and got.is_contiguous()
        assert _malformed(got.tolist(), total) == _malformed(cu.tolist(), total), cu.tolist()
    ok = torch.tensor([0, 3, 3, 50, total], dtype=torch.int64)
    assert int32_offsets(ok, total).tolist() == ok.tolist()
    assert int32_offsets(ok.to(torch.int32)[::1], total).tolist() == ok.tolist()


@needs_triton
def test_attention_kernels_never_compute_column_offsets_past_int32():
    """The Triton attention's per-head column offsets are int32 (H*Dh x the last-dim stride): a view
    whose last dim is strided that far is copied contiguous first (meta tensors: no memory needed)."""
    from maefast.kernels.attention import int32_columns

    big = torch.empty(0, device="meta").as_strided((2, 3, 3 * 1280), (1, 2, 2 ** 20))  # 3840 * 2**20 >= 2**31
    fixed = int32_columns(big)
    assert fixed.is_contiguous() and fixed.shape == big.shape
    small = torch.empty(0, device="meta").as_strided((2, 3, 3 * 1280), (1, 2, 2 ** 18))  # 3840 * 2**18 < 2**31
    assert int32_columns(small) is small
    qkv = randn(2, 5, 3 * 2 * 16)
    assert int32_columns(qkv) is qkv


@needs_triton
def test_attention_launchers_pass_every_strided_operand_through_int32_columns(monkeypatch):
    """With every operand taken as overflowing, the launchers hand the kernels contiguous copies (same
    results) and refuse a caller's dqkv, without copying it."""
    import maefast.kernels.attention as A

    qkv = randn(2, 9, 2 * 3 * 2 * 16)[..., ::2]  # last-dim stride 2
    ref_out, ref_lse = A.attention_fwd(qkv, 2, 0.25)
    dout = randn(2, 9, 2 * 2 * 16)[..., ::2]
    ref_dqkv = A.attention_bwd(dout, qkv, ref_out, ref_lse, 2, 0.25)
    seen = []
    real = A.int32_columns
    monkeypatch.setattr(A, "_columns_overflow", lambda t: True)
    monkeypatch.setattr(A, "int32_columns", lambda t: seen.append(t.stride(-1)) or real(t))
    out, lse = A.attention_fwd(qkv, 2, 0.25)
    dqkv = A.attention_bwd(dout, qkv, out, lse, 2, 0.25)
    assert seen == [2, 2, 2, 1]  # qkv; then dout, qkv, out
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse) and torch.equal(dqkv, ref_dqkv)
    with pytest.raises(ValueError, match="dqkv: its last-dim stride"):
        A.attention_bwd(dout, qkv, out, lse, 2, 0.25, dqkv=torch.empty_like(qkv))


# -- the kernels' own offsets check at its edges, in the forward and in each backward ----------------------

@needs_triton
@pytest.mark.parametrize("cu,max_seqlen", [([0, 10, 41], 40), ([0, 30, 20], 30)],
                         ids=["end-one-beyond-rows", "last-pair-decreasing"])
def test_attention_malformed_offsets_at_the_edges_of_the_check_make_every_row_nan(cu, max_seqlen):
    """`_offsets_malformed` at its edges: an end one row beyond T, a decrease in the last pair. Neither makes
    sequences overlap, so the rows that look well-formed would otherwise come out finite and wrong."""
    from maefast.ops import attention as attn_mod

    qkv = randn(1, 40, 3 * H * DH).requires_grad_()
    out, lse = attn_mod._visible_attention(qkv, H, torch.tensor(cu, dtype=torch.int32), max_seqlen, None, "triton")
    dqkv, = torch.autograd.grad(out, qkv, randn(*out.shape))
    assert out.isnan().all() and lse.isnan().all() and dqkv.isnan().all()


@needs_triton
def test_attention_offsets_check_reads_past_the_first_64_offsets():
    """The check reads the B+1 offsets in chunks of 64 pairs: with 65 sequences, a decrease in the 65th pair
    (alone in the second chunk, overlapping nothing) makes every row NaN too, as one in the first does."""
    from maefast.kernels.attention import attention_fwd

    cu = torch.tensor(list(range(64)) + [65, 64], dtype=torch.int32)  # 65 sequences of 65 rows
    out, lse = attention_fwd(randn(1, 65, 3 * DH), 1, DH ** -0.5, cu, 2)
    assert out.isnan().all() and lse.isnan().all()


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-kernel"])
def test_attention_backward_poisons_bad_offsets_itself(fused):
    """The backward kernels check the offsets on their own, not only through the forward's NaN: given a
    finite out and logsumexp (those of other offsets, or a forward that did not check), malformed offsets
    still make the whole gradient NaN and a sequence longer than max_seqlen its own rows."""
    from maefast.kernels.attention import attention_bwd, attention_fwd

    qkv, dout = randn(1, 20, 3 * H * DH), randn(1, 20, H * DH)
    out, lse = attention_fwd(qkv, H, DH ** -0.5, torch.tensor([0, 8, 20], dtype=torch.int32), 12)
    assert not out.isnan().any() and not lse.isnan().any()
    for cu, max_seqlen, nan_rows in (([3, 8, 20], 12, (0, 20)), ([0, 8, 21], 12, (0, 20)), ([0, 8, 20], 10, (8, 18))):
        dqkv = attention_bwd(dout, qkv, out, lse, H, DH ** -0.5, torch.tensor(cu, dtype=torch.int32), max_seqlen,
                             fused=fused)
        s, e = nan_rows
        assert dqkv[0, s:e].isnan().all() and not dqkv[0, :s].isnan().any(), (cu, max_seqlen)
