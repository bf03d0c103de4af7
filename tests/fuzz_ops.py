"""Fuzzing of the Triton ops on the CPU: random odd shapes (head dims, lengths 1..257, patch sizes 1..16,
1-4 channels, uint8 and float images, strided and varlen qkv, widths that no block divides) through
every op forward and backward under the interpreter, with the memory checker (tests/triton_memcheck.py)
and poisoned allocations (tests/poison_alloc.py) on and bf16 computed as a GPU does (tests/triton_bf16.py),
compared with the reference loosely (it looks for faults, races, unwritten or NaN outputs and gross
errors; the tests hold the tolerances).

    python tests/fuzz_ops.py [SEED] [SECONDS]      # e.g. 1 420; prints each failure, then a count

Not collected by pytest (a run of minutes); run it after a kernel or launcher change. 2026-12-05:
seeds 1 and 2, 420 s each, 8284 cases, no failure."""
import argparse
import os
import random
import sys
import time
import traceback

_cli = argparse.ArgumentParser(prog="tests/fuzz_ops.py", description=__doc__.split("\n\n")[0])
_cli.add_argument("seed", type=int, nargs="?", default=0)
_cli.add_argument("seconds", type=float, nargs="?", default=400.0)
_a = _cli.parse_args()  # before the imports below (seconds): --help answers at once
seed, budget = _a.seed, _a.seconds
os.environ["TRITON_INTERPRET"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import poison_alloc  # noqa: E402
import triton_bf16  # noqa: E402
import triton_memcheck  # noqa: E402

poison_alloc.install()
triton_memcheck.install()
triton_bf16.install()
import torch  # noqa: E402

from maefast import ops  # noqa: E402
from maefast.ops.attention import TRITON_HEAD_DIMS  # noqa: E402

rng = random.Random(seed)
torch.manual_seed(seed)
fails = []


def close(a, b, name, tol=5e-2):
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
    if torch.isnan(a).any() and not torch.isnan(b).any():
        raise AssertionError(f"{name}: NaN where the reference has none")
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 1.0
    if err > tol * max(scale, 1e-3):
        raise AssertionError(f"{name}: max err {err:.3g} (scale {scale:.3g})")


def both(fn, *tensors):
    """(out, grads) for impl triton and reference, leaves cloned."""
    res = []
    g = None
    for impl in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
                  for t in tensors]
        out = fn(impl, *leaves)
        o = out if isinstance(out, torch.Tensor) else out[0]
        if o.requires_grad:
            if g is None:
                g = torch.randn_like(o, dtype=torch.float32)
            o.backward(g.to(o.dtype))
        res.append((o, [t.grad if isinstance(t, torch.Tensor) and t.is_floating_point() else None for t in leaves]))
    return res


def check_pair(res, name):
    (o1, g1), (o2, g2) = res
    close(o1, o2, name + " out")
    for i, (a, b) in enumerate(zip(g1, g2)):
        if a is not None and b is not None:
            close(a, b, f"{name} grad{i}")
        elif (a is None) != (b is None):
            raise AssertionError(f"{name} grad{i}: one is None")


def case_attention():
    dh = rng.choice(TRITON_HEAD_DIMS)
    H = rng.randint(1, 3)
    L = rng.choice([1, 2, 7, 16, 17, 31, 33, 50, 63, 65, 100, 129, 197, 257])
    N = rng.randint(1, 2)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    qkv = torch.randn(N, L, 3 * H * dh).to(dtype)
    if rng.random() < 0.3:  # strided view
        qkv = torch.randn(N, L, 3 * H * dh + 8).to(dtype)[..., 4:4 + 3 * H * dh]
    varlen = rng.random() < 0.3 and N == 1
    kw = {}
    if varlen:
        cuts = sorted(rng.sample(range(1, L), min(2, L - 1))) if L > 2 else []
        cu = torch.tensor([0] + cuts + [L], dtype=rng.choice([torch.int32, torch.int64]))
        kw = dict(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))
    name = f"attention N{N} L{L} H{H} dh{dh} {dtype} varlen={varlen}"
    res = both(lambda impl, q: ops.visible_attention(q.float() if impl == "reference" else q, H, impl=impl, **kw), qkv)
    check_pair(res, name)


def case_masking():
    N, L = rng.randint(1, 4), rng.randint(1, 300)
    ratio = rng.choice([0.1, 0.5, 0.75, 0.9])
    if int(L * (1 - ratio)) < 1:
        return
    s = rng.randint(0, 2 ** 40)
    a = ops.random_masking(N, L, ratio, seed=s, impl="triton")
    b = ops.random_masking(N, L, ratio, seed=s, impl="reference")
    for x, y, n in zip(a, b, ("keep", "restore", "mask")):
        if not torch.equal(x, y):
            raise AssertionError(f"masking N{N} L{L} r{ratio}: {n} differs")
    noise = torch.rand(N, L)
    a = ops.random_masking(N, L, ratio, noise=noise, impl="triton")
    b = ops.random_masking(N, L, ratio, noise=noise, impl="reference")
    for x, y, n in zip(a, b, ("keep", "restore", "mask")):
        if not torch.equal(x, y):
            raise AssertionError(f"masking noise N{N} L{L}: {n} differs")


def _imgs(N, C, H, W, u8):
    return torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8) if u8 else torch.randn(N, C, H, W)


def case_embed():
    p = rng.choice([1, 2, 3, 4, 7, 8, 14, 16])
    h, w = rng.randint(1, 5), rng.randint(1, 5)
    C = rng.randint(1, 4)
    N = rng.randint(1, 3)
    D = rng.choice([1, 3, 8, 17, 33, 64])
    u8 = rng.random() < 0.4
    L = h * w
    ratio = rng.choice([0.25, 0.5, 0.75])
    K = int(L * (1 - ratio))
    if K < 1:
        return
    ids = ops.random_masking(N, L, ratio, seed=rng.randint(0, 99), impl="reference").ids_keep
    imgs = _imgs(N, C, h * p, w * p, u8)
    wgt, b = torch.randn(D, C, p, p) * 0.1, torch.randn(D)
    pos = torch.randn(1, 1 + L, D) if rng.random() < 0.7 else None
    kw = dict(mean=[0.5] * C, std=[0.25] * C) if u8 and C != 3 else {}
    name = f"embed N{N} C{C} p{p} {h}x{w} D{D} u8={u8} pos={pos is not None}"
    res = both(lambda impl, i, ww, bb, pp: ops.masked_patch_embed(i.detach(), ids, ww, bb, pp, p, impl=impl, **kw),
               imgs, wgt, b, pos)
    check_pair(res, name)


def case_unshuffle():
    N, L, d = rng.randint(1, 3), rng.randint(1, 40), rng.choice([1, 5, 16, 33, 64])
    K = rng.randint(0, L)
    ids_restore = torch.stack([torch.randperm(L) for _ in range(N)])
    x = torch.randn(N, 1 + K, d)
    res = both(lambda impl, xx, t, pp: ops.unshuffle(xx, t, ids_restore, pp, impl=impl), x, torch.randn(1, 1, d),
               torch.randn(1, L + 1, d))
    check_pair(res, f"unshuffle N{N} L{L} K{K} d{d}")


def case_loss():
    p = rng.choice([1, 2, 4, 7, 8, 14, 16])
    h, w, C, N = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
    L, P = h * w, p * p * C
    u8 = rng.random() < 0.4
    imgs = _imgs(N, C, h * p, w * p, u8)
    norm = rng.random() < 0.6 and P > 1
    kw = dict(mean=[0.5] * C, std=[0.25] * C) if u8 and C != 3 else {}
    if rng.random() < 0.5:
        mask = (torch.rand(N, L) < 0.6).float()
        mask[:, 0] = 1
        res = both(lambda impl, pr: ops.norm_pix_loss(pr, imgs, mask, p, norm_pix=norm, impl=impl, **kw),
                   torch.randn(N, L, P))
        check_pair(res, f"loss all N{N} C{C} p{p} {h}x{w} u8={u8} norm={norm}")
    else:
        K = rng.randint(0, L - 1)
        ids_restore = torch.stack([torch.randperm(L) for _ in range(N)])
        res = both(lambda impl, pr: ops.norm_pix_loss(pr, imgs, ids_restore, p, norm_pix=norm, pred_on="masked",
                                                      impl=impl, **kw), torch.randn(N, L - K, P))
        check_pair(res, f"loss masked N{N} C{C} p{p} {h}x{w} K{K} u8={u8} norm={norm}")


def case_ln():
    D = rng.choice([1, 2, 3, 17, 64, 100, 257])
    lead = (rng.randint(1, 3), rng.randint(1, 9))
    x = torch.randn(*lead, D)
    if rng.random() < 0.5:
        res = both(lambda impl, xx, ww, bb: ops.layer_norm(xx, ww, bb, impl=impl), x, torch.randn(D), torch.randn(D))
        check_pair(res, f"layer_norm {lead} D{D}")
    else:
        res = both(lambda impl, xx, rr, ww, bb: ops.add_layer_norm(xx, rr, ww, bb, impl=impl)[0], x,
                   torch.randn(*lead, D), torch.randn(D), torch.randn(D))
        check_pair(res, f"add_layer_norm {lead} D{D}")


def case_gelu():
    N = rng.choice([1, 2, 3, 17, 64, 100, 257])
    x = torch.randn(rng.randint(1, 3), rng.randint(1, 9), N)
    res = both(lambda impl, xx, bb: ops.bias_gelu(xx, bb, impl=impl), x, torch.randn(N))
    check_pair(res, f"bias_gelu N{N}")


def case_block():
    """One whole ViT block (`ops.vit_block`: its LayerNorms, attention and bias+GELU kernels, the residual
    recomputed in the backward), fp32 or under fp16 / bf16 autocast (the fp32 stream, 16-bit matmuls)."""
    dh, H = rng.choice(TRITON_HEAD_DIMS[:4]), rng.randint(1, 2)
    D, T, N = dh * H, rng.choice([1, 2, 5, 17, 33, 50, 65]), rng.randint(1, 2)
    hid = rng.choice([D, 2 * D + 8, 4 * D])
    qkv_bias = rng.random() < 0.7
    autocast = rng.random() < 0.4
    amp = rng.choice([torch.float16, torch.bfloat16])
    shapes = [(D,), (D,), (3 * D, D), (3 * D,) if qkv_bias else None, (D, D), (D,), (D,), (D,), (hid, D), (hid,),
              (D, hid), (D,)]
    ws = [None if s is None else (torch.randn(s) * (0.1 if len(s) == 1 else D ** -0.5) + (len(s) == 1 and i in (0, 6)))
          for i, s in enumerate(shapes)]
    x = torch.randn(N, T, D)

    def run(impl, xx, *w):
        with torch.autocast("cpu", dtype=amp, enabled=autocast):
            return ops.vit_block(xx, *w, num_heads=H, impl=impl)

    res = both(lambda impl, xx, *w: run(impl, xx, *[None if s is None else t for s, t in zip(shapes, w)]), x,
               *[t if t is not None else torch.zeros(0) for t in ws])
    check_pair(res, f"vit_block N{N} T{T} D{D} H{H} hid{hid} qkv_bias={qkv_bias} autocast={autocast and amp}")


CASES = [case_attention, case_masking, case_embed, case_unshuffle, case_loss, case_ln, case_gelu, case_block]
t0, n = time.time(), 0
while time.time() - t0 < budget:
    case = rng.choice(CASES)
    state = rng.getstate()
    try:
        case()
    except Exception as e:  # noqa: BLE001
        fails.append((case.__name__, repr(e)[:400]))
        print("FAIL", case.__name__, repr(e)[:400], flush=True)
        traceback.print_exc(limit=2)
    n += 1
print(f"seed {seed}: {n} cases, {len(fails)} failures in {time.time() - t0:.0f} s")
