"""The probes `maefast.patch` runs on an official-layout model before it serves it fast: its random_masking,
forward_loss and whole forward against the official computation on small random inputs (a copied
models_mae.py, a fork, computes something else where no subclass shows it). Each runs with the user's
hooks set aside, leaves the generator state, training flags and TF32 settings as they were, and works on
any device (a meta model's forward is probed on a float32 CPU copy with random weights) and dtype."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from .fast import fast_forward, official_view


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state, device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _probe_ratios(num_patches: int) -> tuple[float, ...]:
    """0.75, and two ratios that keep k + 0.3 and k + 0.7 patches (k = L // 3): floor, round and ceil of
    L * (1 - r) each keep another count at one of them (a fork's len_keep rule that 0.75 alone hides)."""
    k = max(num_patches // 3, 1)  # (at least one patch kept, as maefast's rule asks)
    return (0.75,) + tuple(1 - (k + f) / num_patches for f in (0.3, 0.7) if k + f < num_patches)


def masking_differs(model, device) -> str | None:
    """Runs model.random_masking(x, r) and the official masking from the same generator state, for each
    of `_probe_ratios`."""
    from ..reference.masking import random_masking

    x = torch.randn(2, model.pos_embed.shape[1] - 1, model.pos_embed.shape[-1],
                    generator=torch.Generator().manual_seed(0)).to(device)
    state = _rng_state(device)
    for ratio in _probe_ratios(x.shape[1]):
        try:
            with torch.no_grad():
                _set_rng_state(state, device)
                got = model.random_masking(x, ratio)
                _set_rng_state(state, device)
                want = random_masking(x, ratio)
        except Exception as e:  # noqa: BLE001 - any failure means we cannot vouch for it
            return f"it failed on a probe at mask_ratio {ratio:.4f} ({type(e).__name__}: {e})"
        finally:
            _set_rng_state(state, device)  # the user's generator is left as it was
        same = isinstance(got, (tuple, list)) and len(got) == 3 and all(
            isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a.to(b.dtype), b)
            for a, b in zip(got, want))
        if not same:
            return (f"a probe at mask_ratio {ratio:.4f} drew another mask than the official masking of the same "
                    "torch.rand noise")
    return None


def loss_differs(model, device) -> bool:
    """Whether model.forward_loss differs from the official loss on a probe (norm_pix_loss False and True)."""
    from ..reference.loss import forward_loss

    view = official_view(model)
    p, (h, w), c, L = view.patch_size, view.img_size, view.in_chans, view.num_patches
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, c, h, w, generator=g).to(device)
    pred = torch.randn(2, L, p * p * c, generator=g).to(device)
    mask = (torch.rand(2, L, generator=g) < 0.75).float()
    mask[:, 0] = 1.0
    mask = mask.to(device)
    had = model.__dict__.get("norm_pix_loss", None)
    values = (False, True) if isinstance(had, bool) else (bool(getattr(model, "norm_pix_loss", False)),)
    try:
        for npl in values:
            if isinstance(had, bool):
                model.norm_pix_loss = npl
            with torch.no_grad():
                got = model.forward_loss(imgs, pred, mask)
                want = forward_loss(imgs, pred, mask, p, npl)
            if not (isinstance(got, torch.Tensor) and got.numel() == 1
                    and torch.allclose(got.float().reshape(()), want, rtol=1e-5, atol=1e-8)):
                return True
    except Exception:  # noqa: BLE001 - its own loss will run (and raise there, as unpatched)
        return True
    finally:
        if isinstance(had, bool):
            model.norm_pix_loss = had
    return False


def _one_of_each(blocks) -> nn.Module:
    """One block of each class, in a container of the kind the model holds (a Sequential is called)."""
    seen, out = set(), []
    for b in blocks:
        if type(b) not in seen:
            seen.add(type(b))
            out.append(b)
    return nn.Sequential(*out) if isinstance(blocks, nn.Sequential) else nn.ModuleList(out)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def hooks_off(model: nn.Module):
    """The model's module hooks set aside while `patch` probes it: a user's hooks see only the user's calls
    (and one that changes outputs does not make the probe refuse the model); the per-call routing sees them."""
    saved = []
    for m in model.modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d:
                saved.append((d, dict(d)))
                d.clear()
    try:
        yield
    finally:
        for d, items in saved:
            d.clear()
            d.update(items)


def _probe_copy(model, device: torch.device) -> nn.Module:
    """A float32 copy of the model on `device`, its encoder and decoder cut to one block of each class, for
    the forward probe of a model whose weights are on the meta device (random weights) or not float32."""
    blocks, dec_blocks = model.blocks, model.decoder_blocks
    try:
        model.blocks, model.decoder_blocks = _one_of_each(blocks), _one_of_each(dec_blocks)
        if model.pos_embed.device.type == "meta":
            probe = copy.deepcopy(model).to_empty(device=device)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for t in (*probe.parameters(), *probe.buffers()):
                    if t.is_floating_point():
                        t.copy_(torch.randn(t.shape, generator=g) * 0.05)
                for m in probe.modules():
                    if isinstance(m, nn.LayerNorm) and m.weight is not None:
                        m.weight.add_(1.0)
        else:
            probe = copy.deepcopy(model).to(device)
    finally:
        model.blocks, model.decoder_blocks = blocks, dec_blocks
    return probe.float()


def forward_differs(model, device, loss_via_model: bool) -> str | None:
    """The model's own forward against the fast one (the reference ops) on one random image, from the
    same torch.rand noise, in eval mode and fp32, with the encoder and the decoder cut to one block of
    each class they hold: a copied file's forward_encoder / forward_decoder / forward or block class
    that computes something else is found here. A model whose weights are not fp32, or are on the meta
    device, is probed through a float32 copy on ``device`` (random weights for meta ones)."""
    if model.pos_embed.dtype != torch.float32 or model.pos_embed.device != device:
        try:
            model = _probe_copy(model, device)
        except Exception as e:  # noqa: BLE001 - a model we cannot copy to probe we cannot vouch for
            return f"it could not be copied for a probe ({type(e).__name__}: {e})"
    blocks, dec_blocks = model.blocks, model.decoder_blocks
    modes = [(m, m.training) for m in model.modules()]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    rng = _rng_state(device)
    try:
        model.blocks, model.decoder_blocks = _one_of_each(blocks), _one_of_each(dec_blocks)
        model.eval()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 oracle
        view = official_view(model)
        imgs = torch.randn(1, view.in_chans, *view.img_size, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            want = type(model).forward(model, imgs, 0.75)  # the official forward draws torch.rand(N, L) noise
            _set_rng_state(rng, device)
            noise = torch.rand(1, view.num_patches, device=device)
            got = fast_forward(view, imgs, 0.75, noise, impl="reference", fused=False,
                               loss_fn=model.forward_loss if loss_via_model else None)
    except Exception as e:  # noqa: BLE001 - any failure means we cannot vouch for it
        return f"it failed on a probe ({type(e).__name__}: {e})"
    finally:
        model.blocks, model.decoder_blocks = blocks, dec_blocks
        for m, mode in modes:
            m.training = mode
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        _set_rng_state(rng, device)  # the user's generator is left as it was
    same = (isinstance(want, (tuple, list)) and len(want) == 3
            and all(isinstance(t, torch.Tensor) and t.shape == u.shape for t, u in zip(want, got[:3]))
            # loose enough for a GPU's fp32 summation orders (conv vs gather GEMM), far below what another
            # computation changes (a decoder without its norm: 2% of the loss)
            and torch.allclose(want[0], got[0], rtol=1e-3, atol=1e-5)
            and torch.allclose(want[1], got[1], rtol=1e-3, atol=1e-4) and torch.equal(want[2].float(), got[2].float()))
    return None if same else "on a probe its forward's (loss, pred, mask) differed from the official computation's"
