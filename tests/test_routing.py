"""The fast path serves a call only when it computes what the module tree says (maefast/models/routing.py,
`structure_reason`): hooks on modules it does not call, replaced or instance-patched block forwards,
a head it reads by weight, dropout added after earlier calls — each runs the model's original forward
with a SlowPathWarning, equal to the reference; hooks on modules it does call keep the fast path and
run. Checked on maefast's own model (impl="auto": the reference ops on the CPU) and on a patched
official-layout model."""
import warnings

import pytest
import torch
import torch.nn as nn

import maefast
from maefast.models import create_model
from maefast.models import routing
from maefast.models.configs import PAPER_NORM
from maefast.models.fast import route_blocks_through_modules
from maefast.models.routing import SlowPathWarning
from maefast.nn import MaskedPatchEmbed
from maefast.reference.model import Block as RefBlock
from maefast.testing import assert_close

IMGS_SHAPE, L = (2, 3, 32, 32), 16


@pytest.fixture(autouse=True)
def _warn_every_time(monkeypatch):
    monkeypatch.setattr(routing, "_WARNED", set())  # one warning per reason and process otherwise


def _pair(**kw):
    torch.manual_seed(0)
    fast = create_model("tiny", impl="auto", norm_pix_loss=True, **kw)
    ref = create_model("tiny", impl="reference", norm_pix_loss=True)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(*IMGS_SHAPE, generator=g), torch.rand(IMGS_SHAPE[0], L, generator=g)


def _loss(model, return_pred=True):
    imgs, noise = _inputs()
    torch.manual_seed(2)
    return model(imgs, 0.75, noise, return_pred=return_pred)[0]


def _check(fast, ref, slow: str | None, return_pred=True):
    """fast equals ref; a SlowPathWarning matching `slow` (None: no warning, the fast path served it)."""
    routing._WARNED.clear()  # a reason warned earlier in the test would go unsaid: "no warning" would prove nothing
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got = _loss(fast, return_pred)
    slow_said = [str(w.message) for w in said if issubclass(w.category, SlowPathWarning)]
    if slow is None:
        assert not slow_said, slow_said
    else:
        assert len(slow_said) == 1 and slow in slow_said[0], slow_said
    assert_close(got, _loss(ref), torch.float32, name="loss")


def _both(fast, ref, change):
    change(fast)
    change(ref)


class PostNormBlock(RefBlock):  # a user's block: the fast path cannot know its forward
    def forward(self, x):
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


@pytest.mark.parametrize("where, return_pred, slow", [
    ("blocks.0", True, "blocks.0 has hooks"),
    ("blocks.0.attn", True, "blocks.0.attn has hooks"),
    ("blocks.0.attn.qkv", True, "blocks.0.attn.qkv has hooks"),
    ("decoder_blocks.0.mlp", True, "decoder_blocks.0.mlp has hooks"),
    ("patch_embed", True, "patch_embed has hooks"),
    ("patch_embed.proj", True, "patch_embed.proj has hooks"),
    ("decoder_pred", False, "decoder_pred has hooks"),
    ("decoder_pred", True, "decoder_pred has hooks"),  # called on the L patch rows only: a hook would see
                                                         # 16 rows where the original gives it 17
    ("blocks.0.norm1", True, None),        # the unfused fast block calls its norms and MLP layers
    ("blocks.1.mlp.fc2", True, None),
    ("norm", True, None),
])
def test_a_hook_the_fast_path_would_skip_sends_the_call_to_the_original_forward(where, return_pred, slow):
    fast, ref = _pair()
    seen = []

    def double(mod, args, out):
        seen.append(mod)
        return out * 2

    _both(fast, ref, lambda m: m.get_submodule(where).register_forward_hook(double))
    _check(fast, ref, slow, return_pred)
    assert seen, "the hook did not run"


def test_a_pre_hook_counts_too_and_global_observers_keep_the_fast_path():
    """Global module hooks are observers (torch's ModuleTracker: FlopCounterMode counts the fast path)."""
    fast, ref = _pair()
    _both(fast, ref, lambda m: m.blocks[1].register_forward_pre_hook(lambda mod, args: (args[0] * 2,)))
    _check(fast, ref, "blocks.1 has hooks")
    fast, ref = _pair()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        _check(fast, ref, None)


def test_with_fused_block_every_block_module_is_skipped():
    fast, ref = _pair(fused="block")
    _both(fast, ref, lambda m: m.blocks[0].norm1.register_forward_hook(lambda mod, args, out: out + 1))
    _check(fast, ref, "blocks.0.norm1 has hooks")


def test_blocks_routed_through_their_modules_run_their_hooks_fast():
    """FSDP2's per-block hooks (maefast train --fsdp routes the blocks through their modules)."""
    fast, ref = _pair()
    route_blocks_through_modules(fast)
    seen = []
    for blk in fast.blocks:
        blk.register_forward_pre_hook(lambda mod, args: seen.append(mod))
    _check(fast, ref, None)
    assert len(seen) == len(fast.blocks)


@pytest.mark.parametrize("change, return_pred, slow", [
    (lambda m: m.blocks.__setitem__(0, _post_norm(m.blocks[0])), True, "forward of test_routing.PostNormBlock"),
    (lambda m: setattr(m.blocks[1].mlp, "forward", lambda x, f=m.blocks[1].mlp.forward: 3 * f(x)), True,
     "blocks.1.mlp runs an instance forward"),
    (lambda m: setattr(m, "decoder_pred", nn.Sequential(m.decoder_pred, nn.Tanh())), False,
     "decoder_pred is a torch.nn.modules.container.Sequential"),
    (lambda m: setattr(m, "decoder_pred", nn.Sequential(m.decoder_pred, nn.Tanh())), True, None),
])
def test_a_replaced_module_is_run_not_duck_typed(change, return_pred, slow):
    fast, ref = _pair()
    _both(fast, ref, change)
    _check(fast, ref, slow, return_pred)


def _post_norm(old):
    new = PostNormBlock(64, 2, 4.0, qkv_bias=True, norm_layer=PAPER_NORM)
    new.load_state_dict(old.state_dict())
    return new


def test_dropout_added_after_earlier_calls_is_seen():
    fast, ref = _pair()
    _loss(fast)  # earlier calls (the dropout modules were cached at the first one)
    _both(fast, ref, lambda m: setattr(m.blocks[0].attn, "proj_drop", nn.Dropout(0.5)))
    _check(fast.train(), ref.train(), "Dropout(p=0.5) is active in training mode")
    fast.eval(), ref.eval()
    _check(fast, ref, None)


def test_a_hook_on_the_model_itself_keeps_the_fast_path():
    """The model's own hooks run around its forward, fast or not: only its submodules' hooks count, also
    beside a hook on a module the fast path calls (its norm)."""
    fast, ref = _pair()
    seen = []
    _both(fast, ref, lambda m: m.register_forward_pre_hook(lambda mod, args: seen.append(mod)))
    _both(fast, ref, lambda m: m.norm.register_forward_hook(lambda mod, args, out: out * 2))
    _check(fast, ref, None)
    assert fast in seen


def test_slow_path_warning_points_at_the_users_call():
    """The SlowPathWarning's stacklevel reaches the model(...) call through nn.Module's call wrappers."""
    fast, _ = _pair()
    fast.blocks[0].register_forward_hook(lambda mod, args, out: out)
    imgs, noise = _inputs()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        fast(imgs, 0.75, noise)
    slow = [w for w in said if issubclass(w.category, SlowPathWarning)]
    assert len(slow) == 1 and slow[0].filename == __file__, [(w.filename, w.lineno) for w in slow]


def test_fused_block_computes_only_torch_layernorms_in_one_op():
    """A norm with a weight, bias and eps that is not a LayerNorm (an RMS norm): fused="block" runs that
    block unfused, as the module says, rather than as a LayerNorm."""
    class RMSNormWithBias(nn.Module):
        def __init__(self, d, eps=1e-6):
            super().__init__()
            self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias

    fast, ref = _pair(fused="block")
    _both(fast, ref, lambda m: setattr(m.blocks[0], "norm1", RMSNormWithBias(64)))
    _check(fast, ref, None)


def test_a_patched_official_model_hooked_after_patching():
    torch.manual_seed(0)
    official = create_model("tiny", impl="reference", norm_pix_loss=True)
    ref = create_model("tiny", impl="reference", norm_pix_loss=True)
    ref.load_state_dict(official.state_dict())
    patched = maefast.patch(official)
    _both(patched, ref, lambda m: m.blocks[0].attn.register_forward_hook(lambda mod, args, out: out * 0))
    _check(patched, ref, "blocks.0.attn has hooks")


def test_masked_patch_embed_names_the_images_for_a_wrong_channel_count():
    pe = MaskedPatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=64)
    with pytest.raises(ValueError, match="imgs"):
        pe(torch.randn(2, 4, 32, 32), 0.75)


def test_a_backward_hook_counts():
    """A gradient monitor's full backward hook on a module the fast path does not call never fired."""
    fast, ref = _pair()
    seen = []
    _both(fast, ref, lambda m: m.blocks[0].attn.register_full_backward_hook(lambda mod, gi, go: seen.append(mod)))
    _check(fast, ref, "blocks.0.attn has hooks")
    imgs, noise = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        fast(imgs, 0.75, noise)[0].backward()
    assert seen


def test_which_norms_the_block_op_computes():
    """`ops.vit_block` computes torch's LayerNorm: a subclass that keeps its forward (timm's, a user's
    that only adds attributes) stays on the fused block; one with its own forward does not."""
    from maefast.models.fast import is_layer_norm

    class Tagged(nn.LayerNorm):
        tag = "mine"

    class Centred(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x - x.mean())

    assert is_layer_norm(nn.LayerNorm(8)) and is_layer_norm(Tagged(8))
    assert not is_layer_norm(Centred(8)) and not is_layer_norm(nn.RMSNorm(8))


@pytest.mark.parametrize("patched", [False, True])
def test_compiled_calls_follow_the_same_rules(patched):
    """Under torch.compile the rules are traced too: a hook the fast path would skip (present when the
    model is compiled) runs, as in eager calls; an instance override is refused (before: the compiled model
    skipped the hook, and the override, silently)."""
    torch.manual_seed(0)
    fast, ref = _pair()
    if patched:
        official = create_model("tiny", impl="reference", norm_pix_loss=True)
        official.load_state_dict(ref.state_dict())
        fast = maefast.patch(official)
    _both(fast, ref, lambda m: m.blocks[0].attn.register_forward_hook(lambda mod, args, out: out * 0))
    imgs, noise = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        got = compiled(imgs, 0.75, noise)[0]
    assert_close(got, ref(imgs, 0.75, noise)[0], torch.float32, name="compiled loss with a hook")
    if not patched:
        fast.random_masking = lambda *a, **k: None
        torch._dynamo.reset()
        with pytest.raises(TypeError, match="overrides random_masking"):
            torch.compile(fast, backend="aot_eager")(imgs, 0.75, noise)
