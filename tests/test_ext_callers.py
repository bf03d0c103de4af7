"""Every Python call into maefast._C against the real bindings, on a machine without a GPU.

The bindings take raw pointers, sizes and strides as ints, so a missing, extra or swapped argument is
silent memory corruption on a card. Here each caller in maefast/ops runs on CPU tensors with shapes whose
sizes all differ (non-square images, non-contiguous views): pybind checks the count and types, the C++
host checks check the sizes, each value must land on the parameter that names it, and the call stops at
the launch, which fails without a GPU (a CudaError). Where a GPU is present the launch would read CPU
pointers: skipped there, where the `cuda` tests run the kernels themselves (here: strided views through the
C++ attention, which the other attention tests give it contiguous).
"""
import contextlib
import importlib
import re

import pytest
import torch

from maefast import _cpp_lib

C = _cpp_lib.get_C()

# The parameters of the bindings that have no py::arg names (csrc/unshuffle.cu, csrc/loss.cu), in order.
_LOSS = ["pred", "img", "wt", "OUT", "N", "L", "GW", "K", "M", "C", "p", "spn", "spr", "spe", "sin", "sic", "sih",
         "siw", "swn", "swl", "norm", "pred_masked", "pred_dtype", "img_dtype", "px_scale", "px_offset", "stream"]
_POSITIONAL = {
    "unshuffle_fwd": ["x", "tok", "ids", "pos", "out", "N", "L", "K", "D", "sxn", "sxk", "sxd", "sin", "sil", "spt",
                      "spd", "dtype", "stream"],
    "unshuffle_bwd": ["g", "ids", "gx", "tok_part", "pos_part", "N", "L", "K", "D", "n_per", "chunks", "sgn", "sgt",
                      "sgd", "sin", "sil", "need_pos", "dtype", "stream"],
    "norm_pix_loss_fwd": _LOSS,
    "norm_pix_loss_bwd": _LOSS[:3] + ["scale"] + _LOSS[3:],
}


def _params(name: str) -> list[str]:
    """The binding's parameter names: from pybind's signature where it has names, else `_POSITIONAL`."""
    head = getattr(C, name).__doc__.split("\n", 1)[0]
    names = re.findall(r"[(,]\s*(\w+):", head[head.index("("):])
    if names and names[0] == "arg0":
        assert len(names) == len(_POSITIONAL[name]), f"{name}: csrc has {len(names)} parameters, the test names " \
                                                     f"{len(_POSITIONAL[name])}"
        return _POSITIONAL[name]
    return names


@pytest.fixture
def calls(monkeypatch):
    """Routes every maefast._C function through a recorder ({name: {param: value}}, the last call of each)
    that then calls the real binding; CUDA device and stream lookups become no-ops for CPU tensors."""
    if C is None or C.device_count() > 0:
        pytest.skip("needs maefast._C built and no GPU (the launch would read CPU pointers)")
    seen = {}

    def recorder(name):
        real = getattr(C, name)

        def f(*args, **kwargs):
            bound = dict(zip(_params(name), args), **kwargs)
            seen[name] = bound
            with pytest.raises(C.CudaError):  # got past pybind and the host checks: the launch fails here
                real(*args, **kwargs)
        return f

    proxy = type("Proxy", (), {})()
    for attr in dir(C):
        if not attr.startswith("_"):
            value = getattr(C, attr)
            setattr(proxy, attr, recorder(attr) if callable(value) and not isinstance(value, type) else value)
    monkeypatch.setattr(_cpp_lib, "_C", proxy)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    for mod in ("masking", "unshuffle", "patch_embed", "loss", "attention"):
        m = importlib.import_module(f"maefast.ops.{mod}")
        monkeypatch.setattr(m, "stream_of", lambda t: 12345, raising=False)
        monkeypatch.setattr(m, "device_guard", lambda t: contextlib.nullcontext(), raising=False)
    return seen


def _check(got: dict, **want):
    for k, v in want.items():
        assert got[k] == v, f"{k}: the caller passed {got[k]!r}, expected {v!r}"


def test_masking_caller_fits_the_binding(calls):
    from maefast.ops.masking import _cuda

    _cuda(3, 49, 12, None, 5, 7, torch.device("cpu"), 0)
    _check(calls["random_masking"], noise=0, noise_kind=0, seed=5, offset=7, batch=3, num_patches=49, len_keep=12,
           stream=12345, seed_ptr=0)
    noise = torch.rand(49, 3, dtype=torch.float64).t()  # strides (1, 3)
    _cuda(3, 49, 12, noise, 0, 0, torch.device("cpu"))
    _check(calls["random_masking"], noise=noise.data_ptr(), stride_n=1, stride_l=3, noise_kind=2)


def test_unshuffle_callers_fit_the_bindings(calls):
    from maefast.ops.unshuffle import _bwd_cuda, _fwd_cuda

    n, K, L, D = 2, 5, 16, 24
    x = torch.randn(n, D, K + 1).transpose(1, 2)  # strides (D*(K+1), 1, K+1)
    ids = torch.stack([torch.randperm(L) for _ in range(n)])
    tok, pos = torch.randn(1, 1, D), torch.randn(1, L + 1, D)
    _fwd_cuda(x, tok, ids, pos)
    _check(calls["unshuffle_fwd"], x=x.data_ptr(), tok=tok.data_ptr(), ids=ids.data_ptr(), pos=pos.data_ptr(), N=n,
           L=L, K=K, D=D, sxn=D * (K + 1), sxk=1, sxd=K + 1, sin=L, sil=1, spt=D, spd=1, dtype=0, stream=12345)
    g = torch.randn(n, L + 1, D, dtype=torch.bfloat16)
    _bwd_cuda(g, ids, K, True, torch.bfloat16)
    _check(calls["unshuffle_bwd"], g=g.data_ptr(), N=n, L=L, K=K, D=D, n_per=1, chunks=2, sgn=(L + 1) * D, sgt=D,
           sgd=1, need_pos=True, dtype=2)


def test_patch_gather_callers_fit_the_bindings(calls):
    from maefast.ops._pixels import pixel_affine
    from maefast.ops.patch_embed import _rows_cuda

    p, h, w = 4, 3, 5
    imgs = torch.randn(2, 3, h * p, w * p, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    ids = torch.tensor([[0, 14, 7, 3], [1, 2, 3, 9]])
    _rows_cuda(imgs, ids, p)
    _check(calls["patch_gather"], imgs=imgs.data_ptr(), stride_n=imgs.stride(0), stride_c=1, stride_h=imgs.stride(2),
           stride_w=3, ids_keep=ids.data_ptr(), batch=2, len_keep=4, channels=3, patch_size=p, grid_h=h, grid_w=w,
           elem_size=2, nan_bits=0x7E00, stream=12345)
    u8 = torch.randint(0, 256, (2, 3, h * p, w * p), dtype=torch.uint8)
    scale, offset = pixel_affine(((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    _rows_cuda(u8, ids, p, torch.bfloat16, (scale, offset))
    _check(calls["patch_gather_normalize"], stride_n=3 * h * p * w * p, stride_c=h * p * w * p, stride_h=w * p,
           stride_w=1, batch=2, len_keep=4, channels=3, patch_size=p, grid_h=h, grid_w=w, scale=scale,
           offset=offset, out_dtype=2)


@pytest.mark.parametrize("pred_masked", [False, True])
def test_loss_callers_fit_the_bindings(calls, pred_masked):
    from maefast.ops.loss import _cuda_call

    n, c, p, h, w = 2, 3, 4, 3, 5
    L, P = h * w, p * p * c
    imgs = torch.randn(n, c, h * p, w * p)
    M = 11 if pred_masked else L
    pred = torch.randn(n, P, M, dtype=torch.float16).transpose(1, 2)  # strides (P*M, 1, M)
    wt = torch.stack([torch.randperm(L) for _ in range(n)]) if pred_masked else torch.ones(n, L)
    _cuda_call(True, pred, imgs, wt, p, True, pred_masked, None)
    _cuda_call(False, pred, imgs, wt, p, True, pred_masked, None, torch.ones(()))
    for name in ("norm_pix_loss_fwd", "norm_pix_loss_bwd"):
        _check(calls[name], pred=pred.data_ptr(), img=imgs.data_ptr(), N=n, L=L, GW=w, K=L - M if pred_masked else 0,
               M=M, C=c, p=p, spn=P * M, spr=1, spe=M, sin=c * L * p * p, sic=L * p * p, sih=w * p, siw=1, swn=L,
               swl=1, norm=True, pred_masked=pred_masked, pred_dtype=1, img_dtype=0, stream=12345)


@pytest.mark.parametrize("varlen", [False, True])
def test_attention_caller_fits_the_binding(calls, varlen):
    from maefast.ops.attention import _cuda_fwd

    H, dh, L = 3, 80, 50
    if varlen:
        qkv = torch.randn(1, L, 3 * H * dh, dtype=torch.bfloat16)
        _cuda_fwd(qkv, H, 0.5, torch.tensor([0, 20, 45, 50]), 25)
    else:
        qkv = torch.randn(L, 2, 3 * H * dh, dtype=torch.bfloat16).transpose(0, 1)  # strides (W, 2W, 1)
        _cuda_fwd(qkv, H, 0.5, None, L)
    W = 3 * H * dh
    _check(calls["attention_fwd"], qkv=qkv.data_ptr(), num_seqs=3 if varlen else 2, num_heads=H, head_dim=dh,
           seqlen=25 if varlen else L, total_rows=L, stride_qkv_b=L * W if varlen else W,
           stride_qkv_l=W if varlen else 2 * W, stride_out_b=L * H * dh, stride_out_l=H * dh, stride_lse_b=H * L,
           stride_lse_h=L, scale=0.5, bf16=True, stream=12345)
    assert (calls["attention_fwd"]["cu_seqlens"] != 0) == varlen


def test_empty_sizes_return_before_the_pointer_checks():
    """N = 0 or K = 0: the bindings return before checking pointers (the caching allocator gives an empty
    tensor none) and launch nothing, so this runs anywhere; it also fails for a maefast._C built from older
    sources than csrc (rebuild: python csrc/build.py --inplace)."""
    if C is None:
        pytest.skip("maefast._C is not built here")
    C.random_masking(0, 0, 0, 0, 1, 0, 0, 16, 4, 0, 0, 0, 0)
    for n, k in ((0, 4), (2, 0)):
        C.patch_gather(0, 768, 256, 16, 1, 0, n, k, 3, 4, 4, 4, 2, 0x7E00, 0, 0)
        C.patch_gather_normalize(0, 768, 256, 16, 1, 0, n, k, 3, 4, 4, 4, [1.0] * 3, [0.0] * 3, 2, 0, 0)
    with pytest.raises(ValueError, match="null"):
        C.random_masking(0, 0, 0, 0, 1, 0, 1, 16, 4, 0, 0, 0, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_cuda_attention_reads_strided_qkv_in_place(dtype):
    """The CUDA C++ forward reads qkv through its batch and row strides: a transposed view (no unit row
    stride) and packed rows sliced out of wider ones, against the same-dtype and fp64 references."""
    from maefast.ops import visible_attention
    from maefast.reference.attention import attention as ref_attention
    from maefast.testing import assert_error_ratio, randn

    n, L, H, dh = 3, 50, 2, 64
    W = 3 * H * dh
    qkv = randn(L, n, W + 16, dtype=dtype, device="cuda")[..., :W].transpose(0, 1)  # strides (W+16, n(W+16), 1)
    packed = randn(2 * L, W + 16, dtype=dtype, device="cuda")[:, :W]  # strides (W+16, 1)
    cu = torch.tensor([0, 20, 20, 2 * L], dtype=torch.int32, device="cuda")
    for x, kw in ((qkv, {}), (packed, dict(cu_seqlens=cu))):
        assert not x.is_contiguous()
        out = visible_attention(x, H, impl="cuda", **kw)
        assert_error_ratio(out, ref_attention(x, H, **kw), ref_attention(x.double(), H, **kw), dtype, "forward",
                           name=f"cuda attention, qkv strides {x.stride()}")
