"""Shared by the maefast.patch tests (tests/test_patching*.py, tests/test_compile.py): an official-layout
MAE class written like facebookresearch/mae's models_mae.py (no `noise` argument, torch.rand in
random_masking, forward_loss through self.patchify; `official_class` makes forks of it), the tiny
config they run, and how they run and compare a patched model with a plain one."""
import contextlib
import copy
import warnings

import torch
import torch.nn as nn

import maefast
from maefast.reference import MaskedAutoencoderViT as ReferenceMAE

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)  # L = 16
N, L = 3, 16


def _slow_warning():
    from maefast.patching import SlowPathWarning

    return SlowPathWarning


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_equal(g, g0, rel=1e-5):
    assert set(g) == set(g0) and g0
    scale = max(v.abs().max().item() for v in g0.values())
    for n in g0:
        diff = (g[n] - g0[n]).norm().item()
        assert diff <= rel * g0[n].norm().item() + 1e-6 * scale, (n, diff, g0[n].norm().item())


def _close(a, b, rel=1e-5):
    return abs(a.item() - b.item()) <= rel * abs(b.item())


@contextlib.contextmanager
def _no_slow_warning():
    """A context in which a SlowPathWarning is an error (the call must stay on the fast path)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", _slow_warning())
        yield


def _o_init(self, norm_pix_loss=False, **kw):
    nn.Module.__init__(self)
    ref = ReferenceMAE(**kw, norm_pix_loss=norm_pix_loss)  # borrow its modules, parameters and initialisation
    for name, child in ref.named_children():
        setattr(self, name, child)
    for name in ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed"):
        setattr(self, name, getattr(ref, name))
    self.norm_pix_loss = norm_pix_loss


def _o_patchify(self, imgs):
    p = self.patch_embed.proj.kernel_size[0]
    h = w = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(imgs.shape[0], h * w, p ** 2 * 3)


def _o_random_masking(self, x, mask_ratio):
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, length], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def _o_forward_encoder(self, x, mask_ratio):
    x = self.patch_embed(x)
    x = x + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = self.random_masking(x, mask_ratio)
    cls_token = self.cls_token + self.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in self.blocks:
        x = blk(x)
    return self.norm(x), mask, ids_restore


def _o_forward_loss(self, imgs, pred, mask):
    target = self.patchify(imgs)
    if self.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def _o_forward(self, imgs, mask_ratio=0.75):
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
    pred = self.forward_decoder(latent, ids_restore)
    loss = self.forward_loss(imgs, pred, mask)
    return loss, pred, mask


def official_class(name="MaskedAutoencoderViT", **methods):
    """A root class (no maefast base) with the official methods; `methods` replace some (a "fork")."""
    ns = dict(__init__=_o_init, patchify=_o_patchify, random_masking=_o_random_masking,
              forward_encoder=_o_forward_encoder, forward_decoder=ReferenceMAE.forward_decoder,
              forward_loss=_o_forward_loss, forward=_o_forward)
    ns.update(methods)
    return type(name, (nn.Module,), ns)


def _official_pair(cls=None, norm_pix=True, **patch_kw):
    torch.manual_seed(0)
    plain = (cls or official_class())(norm_pix_loss=norm_pix, **TINY)
    patched = maefast.patch(copy.deepcopy(plain), **patch_kw)
    return plain, patched


def _run_official(model, imgs, seed, **kw):
    """The official forward draws its noise with torch.rand: the same seed gives the same mask; the
    patched forward is handed that noise."""
    model.zero_grad()
    torch.manual_seed(seed)
    if model.__dict__.get("forward") is not None and "noise" not in kw:  # patched: the same noise, given
        kw["noise"] = torch.rand(imgs.shape[0], L)
    out = model(imgs, 0.75, **kw)
    out[0].backward()
    return out, _grads(model)


def _run(model, imgs, noise, **kw):
    model.zero_grad()
    loss, pred, mask = model(imgs, 0.75, noise, **kw)
    loss.backward()
    return loss.detach(), pred, mask, _grads(model)
