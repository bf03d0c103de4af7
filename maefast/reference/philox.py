"""Counter-based random numbers (Philox4x32-10) in plain PyTorch, bit-exact with Triton's
``tl.rand(seed, offsets)`` and with maefast's CUDA masking kernel.

maefast's seeded masks are defined through this function: the noise of sample ``n``, patch ``l``
for a mask of ``L`` patches drawn with ``(seed, offset)`` is

    philox_uniform(seed, offset + n * L + l)

where, for a 64-bit counter ``c`` and a seed ``0 <= seed < 2**63``:
  * key = (seed & 0xffffffff, seed >> 32), counter = (c & 0xffffffff, c >> 32, 0, 0);
  * ten Philox4x32 rounds (Salmon et al., SC'11; constants 0xD2511F53 / 0xCD9E8D57, key bumps
    0x9E3779B9 / 0xBB67AE85), the first output word ``x`` is the random uint32;
  * ``x`` as int32, ``~x`` where negative (so 0 <= x < 2**31), converted to float32 (round to
    nearest even) and multiplied in float32 by 4.6566127342e-10, giving a float32 in [0, 1).

Everything here is int64 arithmetic on tensors holding 32-bit values (products split in 16-bit
halves so nothing overflows), so it runs on any device and gives the same bits everywhere.
"""
from __future__ import annotations

import torch

from .._validate import compiling

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit draws: the largest float with (2**31 - 1) * s < 1.
UNIFORM_SCALE = 4.6566127342e-10
SEED_BOUND = 2 ** 63
COUNTER_BOUND = 2 ** 63


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of the constant a and b (int64 holding uint32)."""
    al, ah = a & 0xFFFF, a >> 16
    bl, bh = b & 0xFFFF, b >> 16
    p0 = bl * al
    p1 = bl * ah
    p2 = bh * al
    p3 = bh * ah
    mid = (p0 >> 16) + (p1 & 0xFFFF) + (p2 & 0xFFFF)
    hi = p3 + (p1 >> 16) + (p2 >> 16) + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (p0 & 0xFFFF)
    return hi & MASK32, lo


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0, k1,
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 (Random123 philox4x32_R) on int64 tensors holding uint32 words; key (k0, k1) ints, or
    0-d int64 tensors (a seed on the device, never read on the host)."""
    c0, c1, c2, c3 = (t.to(torch.int64) & MASK32 for t in (c0, c1, c2, c3))
    k0, k1 = (k & MASK32 if isinstance(k, torch.Tensor) else int(k) & MASK32 for k in (k0, k1))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def check_seed_offset(seed, offset, count: int = 0) -> tuple[int, int]:
    """Validates a Philox seed and counter offset (ints, 0 <= seed < 2**63, offset + count <= 2**63: the
    last counter is 2**63 - 1)."""
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 0 <= seed < SEED_BOUND:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if offset < 0 or offset + count > COUNTER_BOUND:
        raise ValueError(f"offset must be >= 0 with offset + N*L <= 2**63, got offset={offset} for {count} draws")
    return int(seed), int(offset)


def philox_randint(seed: int | torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.randint(seed, counters)`` for int64 counters: uint32 values held in int64. ``seed``: an
    int, or a 1-element int64 tensor, read where it lives (a seed on the GPU is not read on the host)."""
    c = counters.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(c.device)
    zero = torch.zeros_like(c)
    x, _, _, _ = philox4x32(c & MASK32, (c >> 32) & MASK32, zero, zero, seed & MASK32, (seed >> 32) & MASK32)
    return x


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words (held in int64): float32 in [0, 1)."""
    x = torch.where(x >= 2 ** 31, x - 2 ** 32, x)        # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)                    # ~x
    scale = torch.full((), UNIFORM_SCALE, dtype=torch.float32, device=x.device)  # filled there: no copy, no sync
    return x.to(torch.float32) * scale


def philox_uniform(seed: int | torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), bit-exact with ``tl.rand(seed, counters)`` (counters int64)."""
    return uint32_to_uniform(philox_randint(seed, counters))


def philox_noise(batch: int, num_patches: int, seed: int | torch.Tensor, offset: int = 0,
                 device=None) -> torch.Tensor:
    """The (N, L) float32 noise that maefast's seeded masking draws: philox_uniform(seed, offset + n*L + l).

    seed: an int in [0, 2**63), or a 1-element int64 tensor: on the CPU read (and checked) as that int; on a
    GPU, or while torch.compile traces, used as a tensor, never read on the host (no sync, no graph break;
    CUDA-graph capturable), its value unchecked, as the kernels read a device seed. The noise is computed on
    ``device`` (a seed elsewhere is copied there: a GPU seed for CPU noise is read, a sync)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"a seed tensor must hold 1 int64 element, got {seed.numel()} of {seed.dtype}")
        if seed.device.type == "cpu" and not compiling():
            seed = int(seed.reshape(()))
    if isinstance(seed, torch.Tensor):
        offset = check_seed_offset(0, offset, batch * num_patches)[1]
    else:
        seed, offset = check_seed_offset(seed, offset, batch * num_patches)
    ctr = offset + torch.arange(batch * num_patches, dtype=torch.int64, device=device)
    return philox_uniform(seed, ctr).reshape(batch, num_patches)
