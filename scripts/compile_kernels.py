"""Compiles every Triton kernel of maefast for a GPU architecture ahead of time — no GPU needed — with
the launch configurations the launchers pick at the paper's shapes, and prints each variant's
registers, spill stack and shared memory (from the cubin, with triton's bundled cuobjdump).

    python scripts/compile_kernels.py            # sm_90 (H100/H200), every kernel
    python scripts/compile_kernels.py --attention-only   # the attention tile table and every sweep candidate
    python scripts/compile_kernels.py --arch 80 --json out.json
    python scripts/compile_kernels.py --match "patch_embed bwd dW"   # the variants whose name contains it

Catches code-generation errors (and register spills) that the CPU interpreter cannot see, before any
GPU time is spent; run it under each Triton version the project supports (3.6 on the GPU machines,
3.9 here). Run it without TRITON_INTERPRET (it is removed from the environment here anyway).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

CUDA = torch.device("cuda")  # only read by the config functions (device.type), never touched
FLOAT_ARGS = {"eps", "scale", "sm_scale", "qk_scale_log2"} | {f"px_{k}{c}" for k in ("scale", "offset")
                                                             for c in range(4)}  # uint8 pixels' factors


# The most shared memory one block may opt into (CUDA's cudaDevAttrMaxSharedMemoryPerBlockOptin): a
# kernel compiled with more fails at its launch, which only a card would show.
SHARED_OPTIN = {90: 232448, 80: 166912, 86: 101376, 89: 101376}


def _compile(kernel, consts: dict, ptrs: dict, *, arch: int, num_warps: int, num_stages: int = 1,
             ints: dict | None = None) -> dict:
    """Compiles `kernel` as a launch would specialise it: constexprs `consts`; pointer types from `ptrs`
    (name -> "*bf16", ...), 16-byte aligned (as torch allocates); float scalars by name; each integer
    argument from its runtime value in `ints` (== 1: a constant, % 16 == 0: known divisible by 16, as
    Triton's launcher specialises them; none for the kernel's do_not_specialize arguments, i64 there)."""
    from maefast.kernels._aot import compile_for, resource_usage

    ints = ints or {}
    fixed = {p.name for p in getattr(kernel, "params", []) if getattr(p, "do_not_specialize", False)}
    consts = dict(consts)
    sig, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = ptrs[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in FLOAT_ARGS:
            sig[arg] = "fp32"
        elif arg in fixed:
            sig[arg] = "i64"
        elif ints.get(arg) == 1:
            consts[arg] = 1
            sig[arg] = "constexpr"
        else:
            sig[arg] = "i32"
            if arg in ints and ints[arg] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.perf_counter()
    # the launch's own compile options (kernels/loss.py: LAUNCH_OPTIONS), as its launcher passes them
    options = getattr(sys.modules[kernel.fn.__module__], "LAUNCH_OPTIONS", None)
    compiled = compile_for(kernel, sig, consts, arch=arch, num_warps=num_warps, num_stages=num_stages, attrs=attrs,
                           options=options)
    regs, stack = resource_usage(compiled)
    ptx = compiled.asm["ptx"]
    # the tensor-core instructions tl.dot became: Hopper's warpgroup wgmma (what the tiles are chosen
    # for on sm_90) or the older warp-level mma.sync (Triton's choice under 64 rows a warpgroup)
    return dict(seconds=round(time.perf_counter() - t0, 2), shared_bytes=compiled.metadata.shared, registers=regs,
                spill_stack_bytes=stack, fma_f32=ptx.count("fma.rn.f32"), wgmma=ptx.count("wgmma.mma_async"),
                mma_sync=ptx.count("mma.sync"))


def _contiguous_strides(*shape) -> list[int]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def variants(quick: bool = False):
    """(name, kernel, consts, ptr types, num_warps, num_stages, runtime ints) for each launch the
    launchers make at the paper's shapes (ViT-H/14 batch 64 unless said; bf16 activations, fp32
    residual stream and images, contiguous tensors)."""
    from maefast.kernels import bias_gelu as bg
    from maefast.kernels import colsum as cs
    from maefast.kernels import layernorm as ln
    from maefast.kernels import loss as lo
    from maefast.kernels import masking as ma
    from maefast.kernels import patch_embed as pe
    from maefast.kernels import unshuffle as un

    N, img = 64, 224
    out = []
    # masking: L = 196 / 256 at batch 256; given noise or Philox from an int or a device seed
    for L in ((256,) if quick else (196, 256)):
        bi, bj, w = ma._config(L)
        for has_noise, from_ptr in ((True, False), (False, False), (False, True)):
            out.append((f"masking L{L} noise={has_noise} seed_ptr={from_ptr}", ma._random_masking_fwd_kernel,
                        dict(HAS_NOISE=has_noise, SEED_FROM_PTR=from_ptr, BLOCK_I=bi, BLOCK_J=bj),
                        dict(noise_ptr="*fp32", ids_keep_ptr="*i64", ids_restore_ptr="*i64", mask_ptr="*fp32",
                             seed_ptr="*i64"), w, 1,
                        dict(stride_noise_n=L, stride_noise_l=1, L=L, K=L // 4)))
    # LayerNorm and bias + GELU: encoder D 1280 (ViT-H) / 1024 / 768 on its visible tokens, decoder 512 on 257
    widths = ((1280, N * 65),) if quick else ((1280, N * 65), (1024, N * 50), (768, N * 50), (512, N * 257))
    for D, M in widths:
        bm, bd, w = ln._fwd_config(D, CUDA)
        rows = dict(M=M, D=D, stride_x_m=D, stride_x_d=1, stride_r_m=D, stride_r_d=1, stride_dy_m=D, stride_dy_d=1,
                    stride_ds_m=D, stride_ds_d=1)
        for res in (True, False):
            out.append((f"layernorm fwd D{D} residual={res}", ln._add_ln_fwd_kernel,
                        dict(HAS_RESIDUAL=res, BLOCK_M=bm, BLOCK_D=bd),
                        dict(x_ptr="*bf16", r_ptr="*fp32", w_ptr="*fp32", b_ptr="*fp32", y_ptr="*bf16",
                             s_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32"), w, 1, rows))
        bm, bd, w = ln._bwd_config(D, CUDA)
        # the per-op LayerNorm's backward (ds: the residual's gradient or none), and vit_block's: LN2 from
        # p (bf16) + x (fp32) formed again, LN1 from x, both writing the forward's bf16 output again
        for has_ds, has_r, write_y in ((True, False, False), (False, False, False), (True, True, True),
                                       (True, False, True)):
            tag = f"ds={has_ds}" + (" from x+r" if has_r else "") + (" +y" if write_y else "")
            out.append((f"layernorm bwd D{D} {tag}", ln._ln_bwd_kernel,
                        dict(HAS_DS=has_ds, HAS_R=has_r, WRITE_Y=write_y, BLOCK_M=bm, BLOCK_D=bd),
                        dict(dy_ptr="*bf16", ds_ptr="*fp32", x_ptr="*bf16" if has_r else "*fp32", r_ptr="*fp32",
                             w_ptr="*fp32", b_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32", dx_ptr="*fp32",
                             dw_part_ptr="*fp32", db_part_ptr="*fp32", y_ptr="*bf16"), w, 1,
                        dict(rows, ROWS_PER_PROG=max(bm, M // 528 // bm * bm))))
        H = 4 * D
        bm, bn, w = bg._config(H, CUDA)
        cols = dict(M=M, N=H, stride_x_m=H, stride_x_n=1, stride_dy_m=H, stride_dy_n=1, ROWS_PER_PROG=bm * 8)
        out.append((f"bias_gelu fwd N{H}", bg._bias_gelu_fwd_kernel, dict(BLOCK_M=bm, BLOCK_N=bn),
                    dict(x_ptr="*bf16", b_ptr="*fp32", y_ptr="*bf16"), w, 1, cols))
        for write_y in (False, True):  # True: vit_block's backward, which takes the GELU output back too
            out.append((f"bias_gelu bwd N{H}{' +y' if write_y else ''}", bg._bias_gelu_bwd_kernel,
                        dict(WRITE_Y=write_y, BLOCK_M=bm, BLOCK_N=bn),
                        dict(dy_ptr="*bf16", x_ptr="*bf16", b_ptr="*fp32", dx_ptr="*bf16", db_part_ptr="*fp32",
                             y_ptr="*bf16"), w, 1, cols))
        # the block backward's bias gradients: fc2 / proj (the fp32 stream's gradient cast to bf16 on
        # the way) and qkv (the attention backward's bf16 output, summed only)
        for width, x_t, write in ((D, "fp32", True), (3 * D, "bf16", False)):
            bm, bn, w = cs.config(width, CUDA)
            out.append((f"colsum N{width} {x_t}{' -> bf16' if write else ''}", cs._colsum_kernel,
                        dict(WRITE_Y=write, BLOCK_M=bm, BLOCK_N=bn),
                        dict(x_ptr=f"*{x_t}", y_ptr="*bf16" if write else f"*{x_t}", part_ptr="*fp32"), w, 1,
                        dict(M=M, N=width, ROWS_PER_PROG=2 * bm, stride_x_m=width, stride_x_n=1)))  # a GPU's
    # un-shuffle: decoder T = 197 / 257, width 512, batch 256
    for L in ((256,) if quick else (196, 256)):
        T, K, D, Nu = L + 1, L // 4, 512, 256
        bt, bd, w = un._config(T, D, CUDA)
        ids = dict(stride_ids_n=L, stride_ids_l=1)
        # decoder_embed's bf16 output with the fp32 mask token / pos_embed (autocast): fp32 out and grad,
        # x_vis's grad in bf16; and an all-bf16 model ("bf16 params")
        for params, o in (("", "fp32"), (" bf16 params", "bf16")):
            out.append((f"unshuffle fwd T{T}{params}", un._unshuffle_fwd_kernel, dict(BLOCK_T=bt, BLOCK_D=bd),
                        dict(x_ptr="*bf16", tok_ptr=f"*{o}", ids_ptr="*i64", pos_ptr=f"*{o}", out_ptr=f"*{o}"), w,
                        1, dict(ids, T=T, K=K, D=D, stride_x_n=(K + 1) * D, stride_x_k=D, stride_x_d=1,
                                stride_pos_t=D, stride_pos_d=1)))
            for need_pos in (True, False):
                out.append((f"unshuffle bwd T{T} pos={need_pos}{params}", un._unshuffle_bwd_kernel,
                            dict(NEED_POS=need_pos, BLOCK_T=bt, BLOCK_D=bd),
                            dict(g_ptr=f"*{o}", ids_ptr="*i64", gx_ptr="*bf16", tok_part_ptr="*fp32",
                                 pos_part_ptr="*fp32"), w, 1,
                            dict(ids, N=Nu, T=T, K=K, D=D, N_PER=8, stride_g_n=T * D, stride_g_t=D, stride_g_d=1)))
    # norm-pix loss: patch 14 / 16, 3 channels, batch 256; pred bf16 (masked rows or all), image fp32
    for patch in ((14,) if quick else (14, 16)):
        P, gw, Nl = patch * patch * 3, img // patch, 256
        L = gw * gw
        M = L - L // 4
        bm, bp, w = lo._config(P, CUDA)
        sn, sc, sh, sw = _contiguous_strides(Nl, 3, img, img)
        for masked in (True, False):
            R = M if masked else L
            ints = dict(NR=Nl * R, R=R, L=L, GW=gw, P=P, stride_pred_n=R * P, stride_pred_r=P, stride_pred_e=1,
                        stride_img_n=sn, stride_img_c=sc, stride_img_h=sh, stride_img_w=sw,
                        stride_w_n=L if not masked else M, stride_w_l=1, stride_ids_n=M if masked else L,
                        stride_ids_l=1)
            for norm, img_t in ((True, "fp32"), (True, "u8")) + (() if quick else ((False, "fp32"), (False, "u8"))):
                consts = dict(PATCH=patch, CHANNELS=3, NORM=norm, PRED_MASKED=masked, NORMALIZE=img_t == "u8",
                              BLOCK_M=bm, BLOCK_P=bp)
                ptrs = dict(pred_ptr="*bf16", img_ptr=f"*{img_t}", w_ptr="*fp32", ids_ptr="*i64", part_ptr="*fp32",
                            scale_ptr="*fp32", gpred_ptr="*bf16", res_ptr="*bf16")
                tag = " uint8" if img_t == "u8" else ""
                for grad in (True, False):
                    out.append((f"loss fwd p{patch} masked={masked} norm={norm} grad={grad}{tag}",
                                lo._norm_pix_loss_fwd_kernel, dict(consts, GRAD=grad), ptrs, w, 1, ints))
                out.append((f"loss bwd p{patch} masked={masked} norm={norm}{tag}", lo._norm_pix_loss_bwd_kernel,
                            consts, ptrs, w, 1, ints))
    # masked patch embedding (bf16 and fp32 images), its weight and position-embedding backward
    for patch, D in (((14, 1280),) if quick else ((14, 1280), (16, 1024))):
        gw = img // patch
        L, KD = gw * gw, 3 * patch * patch
        K = L // 4
        sn, sc, sh, sw = _contiguous_strides(N, 3, img, img)
        ints = dict(stride_img_n=sn, stride_img_c=sc, stride_img_h=sh, stride_img_w=sw, stride_w_d=KD, stride_w_k=1,
                    stride_pos_l=D, stride_pos_d=1, M=N * K, K=K, D=D, L=L, GRID_W=gw, KD=KD, ROWS_PER_SPLIT=128,
                    N=N, SAMPLES_PER_SPLIT=4)
        # (GEMM dtype = the weight's, image dtype): float images in the GEMM's dtype, and uint8 ones
        # normalised in the prologue into the weight's dtype (bf16/fp16 under autocast, fp32 without)
        pairs = [("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "u8"), ("fp32", "u8")]
        for dt, img_t in pairs + ([] if quick else [("fp16", "u8")]):
            torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
            bm, bn, bk, w, st = pe._fwd_config(torch_dt, CUDA)  # the launchers' tiles
            tag = f"{dt} uint8" if img_t == "u8" else dt
            # with a position embedding as the models keep it (fp32) the tokens are fp32 (promoted)
            for has_pos in (True, False):
                out.append((f"patch_embed fwd p{patch} {tag} pos={has_pos}", pe._masked_patch_embed_fwd_kernel,
                            dict(P=patch, HAS_BIAS=True, HAS_POS=has_pos, NORMALIZE=img_t == "u8", IEEE=dt == "fp32",
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                            dict(imgs_ptr=f"*{img_t}", ids_ptr="*i64", w_ptr=f"*{dt}", b_ptr=f"*{dt}",
                                 pos_ptr="*fp32", out_ptr="*fp32" if has_pos else f"*{dt}"), w, st, ints))
            bd, bkd, bm2, w2, st2 = pe._dw_config(torch_dt, img_t == "u8", CUDA)
            out.append((f"patch_embed bwd dW p{patch} {tag}", pe._masked_patch_embed_bwd_dw_kernel,
                        dict(P=patch, NORMALIZE=img_t == "u8", IEEE=dt == "fp32", BLOCK_D=bd, BLOCK_KD=bkd,
                             BLOCK_M=bm2),
                        dict(imgs_ptr=f"*{img_t}", ids_ptr="*i64", g_ptr=f"*{dt}", part_ptr="*fp32"), w2, st2, ints))
            if img_t == "u8":
                continue  # the position backward does not read the image
            out.append((f"patch_embed bwd dpos p{patch} {dt}", pe._masked_patch_embed_bwd_dpos_kernel,
                        dict(IEEE=dt == "fp32", BLOCK_L=64, BLOCK_D=64, BLOCK_K=64),
                        dict(ids_ptr="*i64", g_ptr=f"*{dt}", part_ptr="*fp32"), 4, 2, ints))
    return out


def attention_variants(quick: bool = False):
    """The attention launches (same tuple layout as `variants`): every table entry of
    kernels/attention_tiles.py in bf16 ("[table]"), and varlen with int32 and int64 cu_seqlens at its
    tiles ("[table varlen i32]": 64 sequences of L packed; quick: the first shape only); unless quick,
    each sweep candidate, the generic rule's fp32 tiles at the paper shapes, and every tile the generic
    rule gives elsewhere ("[generic rule]"); 16 heads, contiguous packed qkv (the batch enters only the
    batch strides, multiples of 16 at any batch)."""
    from maefast.kernels import attention as at
    from maefast.kernels import attention_tiles as tt

    H, B = 16, 64
    out = []
    for i, ((L, dh), entry) in enumerate(tt.TILES.items()):
        W, ints = 3 * H * dh, _strides(L, dh, H)
        # varlen: one (1, B*L, W) tensor, seqlen = its B*L rows, max_seqlen = L
        T = B * L
        varlen_ints = dict(ints, stride_qkv_b=T * W, stride_out_b=T * H * dh, stride_do_b=T * H * dh,
                           stride_dqkv_b=T * W, stride_lse_b=H * T, stride_lse_h=T, seqlen=T, max_seqlen=L)
        cases = [("bf16", entry.fwd, entry.bwd, "[table]", None)]
        if not quick or i == 0:
            cases += [("bf16", entry.fwd, entry.bwd, f"[table varlen {cu}]", cu) for cu in ("i32", "i64")]
        if not quick:
            cases += [("bf16", t, None, "[candidate]", None) for t in entry.fwd_candidates if t != entry.fwd]
            cases += [("bf16", None, b, "[candidate]", None) for b in entry.bwd_candidates if b != entry.bwd]
            cases.append(("fp32", tt.fwd_tiles(L, dh, torch.float32), tt.bwd_tiles(L, dh, torch.float32), "[fp32 rule]",
                          None))
        out += _launches(at, L, dh, ints, varlen_ints, cases)
    if not quick:
        out += _generic_rule_variants(at, tt)
    return out


def _strides(L: int, dh: int, H: int) -> dict:
    W = 3 * H * dh
    return dict(stride_qkv_b=L * W, stride_qkv_l=W, stride_qkv_c=1, stride_out_b=L * H * dh, stride_out_l=H * dh,
                stride_out_c=1, stride_do_b=L * H * dh, stride_do_l=H * dh, stride_do_c=1, stride_dqkv_b=L * W,
                stride_dqkv_l=W, stride_dqkv_c=1, stride_lse_b=H * L, stride_lse_h=L, seqlen=L, num_heads=H)


def _generic_rule_variants(at, tt, H: int = 16):
    """Every distinct tile the generic rule (shapes outside the table) gives for head dims 16-128 and
    sequences of 1-299 and 577 tokens, bf16 and fp32, once each at the first length that gets it."""
    seen, out = set(), []
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for dh in (16, 32, 48, 64, 80, 96, 128):
            for L in [*range(1, 300), 577]:
                if tt.table_entry(L, dh, torch_dt) is not None:
                    continue
                fwd, bwd = tt.fwd_tiles(L, dh, torch_dt), tt.bwd_tiles(L, dh, torch_dt)
                fwd = None if (dt, dh, "fwd", fwd) in seen else fwd
                bwd = None if (dt, dh, "bwd", bwd) in seen else bwd
                if fwd is None and bwd is None:
                    continue
                seen.update({(dt, dh, "fwd", fwd), (dt, dh, "bwd", bwd)})
                out += _launches(at, L, dh, _strides(L, dh, H), None, [(dt, fwd, bwd, "[generic rule]", None)])
    return out


def _launches(at, L, dh, ints, varlen_ints, cases):
    """The launches of (dtype, fwd tile, bwd tiles, tag, cu_seqlens type) cases at one shape."""
    out = []
    d0, d1 = at.head_dim_split(dh)
    for dt, fwd, bwd, tag, cu in cases:
        ptrs = dict(qkv_ptr=f"*{dt}", out_ptr=f"*{dt}", dout_ptr=f"*{dt}", dqkv_ptr=f"*{dt}", lse_ptr="*fp32",
                    delta_ptr="*fp32", cu_ptr=f"*{cu or 'i32'}")
        meta = dict(HEAD_DIM=dh, D0=d0, D1=d1, VARLEN=cu is not None, DOT_PREC="ieee" if dt == "fp32" else "tf32")
        shape = f"L{L} Dh{dh} {dt}"
        args = varlen_ints if cu else ints
        if fwd is not None:
            out.append((f"attention fwd {shape} {fwd.name} {tag}", at._attn_fwd_kernel,
                        dict(meta, BLOCK_M=fwd.BLOCK_M, BLOCK_N=fwd.BLOCK_N), ptrs, fwd.num_warps, fwd.num_stages,
                        dict(args, num_m_blocks=-(-L // fwd.BLOCK_M))))
        if bwd is not None:
            if not bwd.fused:
                t = bwd.dq
                out.append((f"attention bwd-dq {shape} {bwd.name} {tag}", at._attn_bwd_dq_kernel,
                            dict(meta, BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N), ptrs, t.num_warps, t.num_stages,
                            dict(args, num_m_blocks=-(-L // t.BLOCK_M))))
            t = bwd.dkdv
            out.append((f"attention bwd-dkdv {shape} {bwd.name} {tag}", at._attn_bwd_dkdv_kernel,
                        dict(meta, BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, FUSED_DQ=bwd.fused), ptrs, t.num_warps,
                        t.num_stages, dict(args, num_n_blocks=-(-L // t.BLOCK_N))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="one shape per kernel family, the attention table only (CI)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--no-attention", action="store_true", help="skip the attention kernels")
    which.add_argument("--attention-only", action="store_true", help="only the attention kernels")
    ap.add_argument("--match", default=None, metavar="TEXT", help="only the variants whose name contains TEXT")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows, failed = [], 0
    print(f"triton {triton.__version__}, sm_{a.arch}")
    todo = [] if a.attention_only else variants(a.quick)
    if not a.no_attention:
        todo += attention_variants(a.quick)
    if a.match:
        todo = [v for v in todo if a.match in v[0]]
    limit = SHARED_OPTIN.get(a.arch)
    for name, kernel, consts, ptrs, warps, stages, ints in todo:
        try:
            r = _compile(kernel, consts, ptrs, arch=a.arch, num_warps=warps, num_stages=stages, ints=ints)
            r.update(kernel=name, num_warps=warps, num_stages=stages)
            if limit is not None and r["shared_bytes"] is not None and r["shared_bytes"] > limit:
                # compiles, but the launch fails on the card (triton's OutOfResources)
                raise RuntimeError(f"needs {r['shared_bytes']} bytes of shared memory; sm_{a.arch} allows {limit}")
        except Exception as e:  # noqa: BLE001 - report every failing variant, not just the first
            failed += 1
            last = (str(e).strip().splitlines() or [""])[-1][:300]  # the last line: the compiler's verdict
            r = dict(kernel=name, error=f"{type(e).__name__}: {last}" if last else type(e).__name__)
        rows.append(r)
        mma = f" wgmma {r['wgmma']} mma.sync {r['mma_sync']}" if r.get("wgmma") or r.get("mma_sync") else ""
        print(f"  {name:<60} " + (f"regs {r['registers']} spill {r['spill_stack_bytes']} B smem {r['shared_bytes']} B"
                                   f"{mma} ({r['seconds']} s)" if "error" not in r else "FAILED " + r["error"]), flush=True)
    spilled = [r["kernel"] for r in rows if r.get("spill_stack_bytes")]
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": a.arch, "kernels": rows}, f, indent=1)
    print(f"{len(rows) - failed} compiled, {failed} failed; {len(spilled)} spill registers"
          + "".join(f"\n  spills: {k}" for k in spilled))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
