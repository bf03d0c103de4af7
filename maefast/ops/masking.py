"""Random masking as a custom op: ``maefast::random_masking``.

Given ``noise``: the official MAE masking of that noise (maefast.reference.masking_ids). Without it:
noise drawn in the kernel from a counter-based Philox stream, ``philox_noise(seed, offset)`` of
maefast.reference.philox, so a seed gives the same mask on every backend, run and recompute, and
nothing waits on the GPU. Each sample is ranked inside one kernel (no global argsort).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import contextlib

import torch

from .._cpp_lib import get_C
from .._validate import check_mask_ratio, check_tensor, compiling
from ..reference.philox import SEED_BOUND, check_seed_offset, philox_noise
from ._backend import choose_impl, device_guard, stream_of
from ._dispatch import call, custom_op, register_autograd

# The kernels stage a sample's L noise values (Triton: in blocks; CUDA: in shared memory as doubles).
KERNEL_MAX_PATCHES = 4096
_KERNEL_NOISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class MaskIds(NamedTuple):
    ids_keep: torch.Tensor     # (N, K) int64, kept patches in shuffle (ascending noise) order
    ids_restore: torch.Tensor  # (N, L) int64, the rank of each patch = argsort(ids_shuffle)
    mask: torch.Tensor         # (N, L) float32, 1 = removed, original patch order


def _resolve(impl: str, device: torch.device, num_patches: int, noise: Optional[torch.Tensor]) -> str:
    chosen = choose_impl(impl, device, auto_order=("triton", "cuda"), cuda_op="random_masking",
                         what="maefast.ops.random_masking")
    if chosen == "reference":
        return chosen
    why = None
    if num_patches > KERNEL_MAX_PATCHES:
        why = f"num_patches={num_patches} exceeds the kernels' limit of {KERNEL_MAX_PATCHES}"
    elif noise is not None and noise.dtype not in _KERNEL_NOISE_DTYPES:
        why = f"noise dtype {noise.dtype} is not supported by the kernels"
    if why is None:
        return chosen
    if impl == "auto":
        return "reference"
    raise ValueError(f"impl={impl!r} is not available for maefast.ops.random_masking: {why}")


def _reference(batch: int, num_patches: int, len_keep: int, noise: Optional[torch.Tensor], seed: int | torch.Tensor,
               offset: int, device: torch.device):
    if noise is None:
        noise = philox_noise(batch, num_patches, seed, offset, device=device)
    noise = noise.contiguous()  # argsort keeps a layout: the outputs are contiguous, as the fake op says
    # Stable: equal noise values keep index order, like the kernels' rank (torch's default argsort may order
    # ties either way, on the CPU too; continuous noise has none)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep].contiguous()
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_keep, ids_restore, mask


def _cuda(batch: int, num_patches: int, len_keep: int, noise: Optional[torch.Tensor], seed: int, offset: int,
          device: torch.device, seed_ptr: int = 0):
    C = get_C()
    N, L, K = batch, num_patches, len_keep
    ids_keep = torch.empty(N, K, dtype=torch.int64, device=device)
    ids_restore = torch.empty(N, L, dtype=torch.int64, device=device)
    mask = torch.empty(N, L, dtype=torch.float32, device=device)
    if noise is None:
        ptr, sn, sl, kind = 0, 0, 0, 0
    else:
        if noise.dtype in (torch.float16, torch.bfloat16):
            noise = noise.float()  # exact, order-preserving
        kind = 2 if noise.dtype == torch.float64 else 1
        ptr, sn, sl = noise.data_ptr(), noise.stride(0), noise.stride(1)
    with device_guard(mask):
        C.random_masking(ptr, sn, sl, kind, seed, offset, N, L, K, ids_keep.data_ptr(), ids_restore.data_ptr(),
                         mask.data_ptr(), stream_of(mask), seed_ptr)
    return ids_keep, ids_restore, mask


@custom_op("maefast::random_masking", mutates_args=())
def _random_masking_op(batch: int, num_patches: int, len_keep: int, noise: Optional[torch.Tensor],
                       seed: Optional[torch.Tensor], offset: int, device: torch.device,
                       impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if noise is None and seed is None:
        raise ValueError("maefast::random_masking needs noise or a seed")
    if noise is None and torch.device(device).type == "meta":
        # no meta tensor among the inputs (the seed is a CPU tensor): the dispatcher sends the call
        # here, not to the fake implementation, so answer with the fake's shapes
        return _fake(batch, num_patches, len_keep, noise, seed, offset, device, impl)
    # seed: a 1-element int64 tensor, on the CPU (read here: never waits on the GPU) or on the output
    # CUDA device (a "device seed", read by the kernels: CUDA-graph capturable).
    dev_seed = noise is None and seed.device.type != "cpu"
    s = int(seed.reshape(-1)[0]) if noise is None and not dev_seed else 0
    device = noise.device if noise is not None else torch.device(device)
    if dev_seed and (seed.dtype != torch.int64 or seed.device != device):  # metadata only: no sync
        raise ValueError(f"a device seed must be an int64 tensor on {device}, got {seed.dtype} on {seed.device}")
    chosen = _resolve(impl, device, num_patches, noise)
    if chosen == "triton":
        from ..kernels.masking import random_masking_triton

        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return random_masking_triton(batch, num_patches, len_keep, noise, s, offset, device,
                                         seed_tensor=seed if dev_seed else None)
    if chosen == "cuda":
        return _cuda(batch, num_patches, len_keep, noise, s, offset, device, seed.data_ptr() if dev_seed else 0)
    # the reference computes a device seed's noise on the device (no sync; capturable)
    return _reference(batch, num_patches, len_keep, noise, seed if dev_seed else s, offset, device)


@_random_masking_op.register_fake
def _fake(batch, num_patches, len_keep, noise, seed, offset, device, impl):
    device = noise.device if noise is not None else torch.device(device)
    return (torch.empty(batch, len_keep, dtype=torch.int64, device=device),
            torch.empty(batch, num_patches, dtype=torch.int64, device=device),
            torch.empty(batch, num_patches, dtype=torch.float32, device=device))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _backward(ctx, *grads):
    # Index outputs and the mask carry no gradient to the noise (the wrapper passes it detached).
    return None, None, None, None, None, None, None, None


register_autograd(_random_masking_op, _backward, setup_context=_setup_context)


def _check_int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def random_masking(batch: int, num_patches: int, mask_ratio: float, *, noise: torch.Tensor | None = None,
                   seed: int | torch.Tensor | None = None, offset: int = 0, device=None,
                   impl: str = "auto") -> MaskIds:
    """MAE random masking of ``batch`` samples of ``num_patches`` patches.

    Args:
        batch, num_patches: N and L.
        mask_ratio: fraction removed, in (0, 1); K = len_keep = floor(L * (1 - mask_ratio)) >= 1.
        noise: optional (N, L) float noise (any float dtype; NaN ranks last, as in torch.sort): the official
            masking of it (ascending noise is kept; equal values keep index order).
        seed: without ``noise``, the Philox seed, an int in [0, 2**63) or a 1-element int64 CPU tensor,
            or a 1-element int64 tensor on the output CUDA device ("device seed": read on the device by
            every impl, the reference too, so a CUDA graph can capture the op and replay it with a new
            value; its range is not checked, that would sync). None draws one from torch's default CPU generator
            (``torch.manual_seed`` reproduces it; inside a graph Inductor compiled, the draw is Inductor's
            own, reproducible from run to run but not the eager call's: pass a seed to get the same mask).
        offset: Philox counter offset (>= 0): sample n, patch l uses counter offset + n*L + l, so
            consecutive draws with one seed use offset += N*L.
        device: where the outputs live when ``noise`` is None (default: torch's default device).
        impl: "auto" | "triton" | "cuda" | "reference".

    Returns:
        MaskIds(ids_keep (N, K) int64, ids_restore (N, L) int64, mask (N, L) float32, 1 = removed).
        The same (seed, offset) gives bit-identical results on every impl; the seeded noise itself is
        ``maefast.reference.philox.philox_noise(N, L, seed, offset)``.
    """
    if compiling():
        from torch.fx.experimental.symbolic_shapes import guard_scalar  # loaded by Dynamo itself

        # K is a size: the ratio is specialised (a guard on its value; each new ratio compiles once, as it did
        # anyway). Left symbolic (torch.compile(dynamic=True), or a second ratio with torch's default
        # specialize_float=False), sizes derived from it crashed grad checkpointing's trace ("Source of
        # 'TruncToInt(16.0 - 16.0*zf..) + 1' is None"; torch 2.13)
        if isinstance(mask_ratio, (int, float)):
            mask_ratio = guard_scalar(mask_ratio)
        len_keep = int(num_patches * (1 - float(mask_ratio)))
        if not 0 < float(mask_ratio) < 1 or not 1 <= len_keep < num_patches:  # the eager rule; a constant message
            raise ValueError("mask_ratio must be in the open interval (0, 1), keep at least one patch and mask one")
    else:
        _check_int("batch", batch, 0)
        _check_int("num_patches", num_patches, 1)
        len_keep = check_mask_ratio(mask_ratio, num_patches)
    seed_t = None
    if noise is not None:  # checked while torch.compile traces too: the kernels read N*L values of it
        check_tensor("noise", noise, ndim=2)
        if tuple(noise.shape) != (batch, num_patches):
            raise ValueError(f"noise must have shape (N, L) = ({batch}, {num_patches}), got {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating point tensor, got {noise.dtype}")
        if seed is not None:
            raise ValueError("pass either noise or seed, not both")
        if device is not None and torch.device(device) != noise.device:
            raise ValueError(f"device={device} differs from noise.device={noise.device}")
        noise = noise.detach()
        out_device = noise.device
    else:
        try:
            if device is not None:
                out_device = torch.device(device)
            else:  # dynamo cannot trace get_default_device(); a new tensor's device is the default device
                out_device = torch.empty(0).device if compiling() else torch.get_default_device()
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must name a torch device, got {device!r}") from e
        if out_device.type == "cuda" and not compiling() and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here (torch {torch.__version__})")
        if out_device.type == "cuda" and out_device.index is None:  # "cuda" -> "cuda:<current>"
            out_device = torch.device("cuda", torch.cuda.current_device())
        if seed is None:
            # Drawn on the CPU from the default generator: reproducible with torch.manual_seed, no GPU sync.
            seed_t = torch.randint(0, SEED_BOUND // 2, (1,), dtype=torch.int64)
        elif isinstance(seed, torch.Tensor):
            on_device = seed.device.type == "cuda" and seed.device == out_device
            if (seed.device.type != "cpu" and not on_device) or seed.numel() != 1 or seed.dtype != torch.int64:
                raise ValueError("a seed tensor must be a 1-element int64 tensor on the CPU or on the output "
                                 f"CUDA device ({out_device}); got {seed.numel()} elements, {seed.dtype} on "
                                 f"{seed.device}")
            if on_device or compiling():  # its value is not read: no sync (a traced tensor has none)
                check_seed_offset(0, offset, batch * num_patches)
            else:
                check_seed_offset(int(seed.reshape(-1)[0]), offset, batch * num_patches)
            seed_t = seed.reshape(1)
        else:
            check_seed_offset(seed, offset, batch * num_patches)
            seed_t = torch.tensor([seed], dtype=torch.int64)
        check_seed_offset(0, offset, batch * num_patches)
    if not compiling():
        choose_impl(impl, out_device, cuda_op="random_masking", what="maefast.ops.random_masking")
    out = call(_random_masking_op, batch, num_patches, len_keep, noise, seed_t, offset, out_device, impl)
    return MaskIds(*out)
