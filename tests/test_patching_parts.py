"""maefast.patch and the parts of a model whose forward the fast path never calls: layers whose weights it
reads (each qkv, the patch projection; with fused="block" every block layer), timm's other blocks, newer
timm block parts and methods set on the instance after patching. Each is seen on every call: the call
runs the original forward (a SlowPathWarning names the part) and computes what the unpatched model does."""
import copy
import types

import pytest
import torch
import torch.nn as nn

import maefast
from maefast.models.fast import trusted_class
from maefast.reference import MaskedAutoencoderViT as ReferenceMAE
from official_layout import TINY, L, N, _slow_warning

pytestmark = pytest.mark.usefixtures("warn_again")


class LoRALinear(nn.Linear):
    """A LoRA adapter as peft-like code writes it: the frozen Linear plus B @ A, B zero at first."""

    def __init__(self, base: nn.Linear, r: int = 2, b_init: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.lora_a = nn.Linear(base.in_features, r, bias=False)
        self.lora_b = nn.Linear(r, base.out_features, bias=False)
        nn.init.constant_(self.lora_b.weight, b_init)

    def forward(self, x):
        return super().forward(x) + self.lora_b(self.lora_a(x))


def _pair(fused=False):
    torch.manual_seed(0)
    plain = ReferenceMAE(norm_pix_loss=True, **TINY)
    return plain, maefast.patch(copy.deepcopy(plain), fused=fused)


def _same_call(plain, patched, match):
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    want = plain(imgs, 0.75, noise)[0]
    want.backward()
    with pytest.warns(_slow_warning(), match=match):
        got = patched(imgs, 0.75, noise)[0]
    got.backward()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (got.item(), want.item())
    return {n: p.grad for n, p in patched.named_parameters()}


@pytest.mark.parametrize("where", ["blocks.0.attn.qkv", "patch_embed.proj"])
def test_an_adapter_on_a_layer_whose_weights_are_read_is_not_dropped(where):
    plain, patched = _pair()
    for m in (plain, patched):
        parent, name = m.get_submodule(where.rsplit(".", 1)[0]), where.rsplit(".", 1)[1]
        old = getattr(parent, name)
        if isinstance(old, nn.Conv2d):  # a weight-standardised convolution: another forward, no children
            class StdConv(nn.Conv2d):
                def forward(self, x):
                    w = self.weight
                    return self._conv_forward(x, (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5), self.bias)
            new = StdConv(old.in_channels, old.out_channels, old.kernel_size, old.stride)
            new.load_state_dict(old.state_dict())
        else:
            torch.manual_seed(3)
            new = LoRALinear(old, b_init=0.01)
        setattr(parent, name, new)
    grads = _same_call(plain, patched, where.replace(".", r"\."))
    if "qkv" in where:
        assert grads[f"{where}.lora_a.weight"] is not None  # the adapter trains


def test_a_torch_layer_with_child_modules_is_not_read_as_plain():
    """torch's QAT Linear (a trusted class, no instance forward of its own) fake-quantises its weight through
    a child module: the fast path, which would read the raw weight, runs the original instead."""
    plain, patched = _pair()
    for m in (plain, patched):
        qkv = m.blocks[0].attn.qkv
        qkv.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
        m.blocks[0].attn.qkv = torch.ao.nn.qat.Linear.from_float(qkv)
    _same_call(plain, patched, r"blocks\.0\.attn\.qkv")


def test_layers_the_one_op_block_reads_are_plain_or_run_as_modules():
    """fused="block" reads every block layer's weights; unfused calls proj and the MLP layers as modules."""
    for fused in ("block", False):
        plain, patched = _pair(fused)
        for m in (plain, patched):
            torch.manual_seed(3)
            m.blocks[1].mlp.fc1 = LoRALinear(m.blocks[1].mlp.fc1, b_init=0.01)
        if fused == "block":
            _same_call(plain, patched, r"blocks\.1\.mlp\.fc1")
        else:
            imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error", _slow_warning())  # served fast: fc1 is called as a module
                got = patched(imgs, 0.75, noise)[0]
            assert torch.allclose(got, plain(imgs, 0.75, noise)[0], rtol=1e-6)


def test_a_parametrized_layer_is_read_through_its_parametrization():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    plain, patched = _pair()
    for m in (plain, patched):
        parametrize.register_parametrization(m.blocks[0].attn.qkv, "weight", Double())
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", _slow_warning())
        got = patched(imgs, 0.75, noise)[0]
    assert torch.allclose(got, plain(imgs, 0.75, noise)[0], rtol=1e-6)


def test_timm_is_trusted_class_by_class():
    def cls(module, name):
        return type(name, (nn.Module,), {"__module__": module, "forward": lambda self, x: x})

    # where timm 0.3.2 (the official code's), 0.4-0.8 (timm.models.layers) and 0.9+ (timm.layers) define them
    for module, names in (("timm.models.vision_transformer", ("Block", "Attention", "Mlp", "PatchEmbed")),
                          ("timm.models.layers.mlp", ("Mlp",)), ("timm.models.layers.patch_embed", ("PatchEmbed",)),
                          ("timm.models.layers.drop", ("DropPath",)), ("timm.models.layers.norm", ("LayerNorm",)),
                          ("timm.models.layers.activations", ("GELU",)), ("timm.layers.mlp", ("Mlp",)),
                          ("timm.layers.attention", ("Attention",)), ("timm.layers.patch_embed", ("PatchEmbed",)),
                          ("timm.layers.drop", ("DropPath",)), ("timm.layers.norm", ("LayerNorm",)),
                          ("timm.layers.activations", ("GELU",))):
        assert all(trusted_class(cls(module, name)) for name in names), module
    for module, name in (("timm.models.vision_transformer", "ResPostBlock"), ("timm.models.beit", "Block"),
                         ("timm.models.vision_transformer_relpos", "Attention"), ("timm.layers.mlp", "GluMlp"),
                         # vision_transformer is one file: nothing below it; a package only named alike
                         ("timm.models.vision_transformer.fork", "Block"), ("timm.layers_extra.mlp", "Mlp")):
        assert not trusted_class(cls(module, name)), (module, name)


def test_packages_are_trusted_by_their_whole_name():
    """maefast's and torch's modules are trusted; a package whose name only starts alike (torchvision) is not."""
    def cls(module):
        return type("Layer", (nn.Module,), {"__module__": module, "forward": lambda self, x: x})

    assert trusted_class(cls("torch.nn.modules.linear")) and trusted_class(cls("maefast.nn.attention"))
    for module in ("torchvision.ops.misc", "torchaudio.models", "maefast_plugins.layers"):
        assert not trusted_class(cls(module)), module


def test_every_kind_of_hook_counts():
    from maefast._modules import hooked

    for register in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                     "register_full_backward_pre_hook"):
        m = nn.Linear(2, 2)
        assert not hooked(m)
        getattr(m, register)(lambda *args: None)
        assert hooked(m), register


def test_only_transformers_output_capturing_hooks_are_inert():
    """transformers 5.x's output-capturing hooks (they act only in calls the fast path never serves) do not
    count; any other hook beside them does, one without a __module__ (a bound builtin method) too."""
    from maefast._modules import hooked

    def capture(*args):
        return None

    capture.__module__ = "transformers.utils.output_capturing"  # where transformers defines its hooks
    m = nn.Linear(2, 2)
    m.register_forward_hook(capture)
    assert not hooked(m)
    seen = {}
    m.register_forward_pre_hook(seen.setdefault)  # records the inputs by module; its __module__ is None
    assert hooked(m)


def test_a_newer_timm_part_or_an_instance_method_set_after_patching_runs_the_original():
    plain, patched = _pair()

    class LayerScale(nn.Module):
        def forward(self, x):
            return 0.5 * x

    for m in (plain, patched):
        m.blocks[0].ls1 = LayerScale()
        m.blocks[0].forward = types.MethodType(lambda self, x: x + self.ls1(self.attn(self.norm1(x))) +
                                               self.mlp(self.norm2(x)), m.blocks[0])
    _same_call(plain, patched, r"blocks\.0")
    plain, patched = _pair()

    def l1(self, imgs, pred, mask):
        return ((pred - self.patchify(imgs)).abs().mean(-1) * mask).sum() / mask.sum()

    for m in (plain, patched):
        m.forward_loss = types.MethodType(l1, m)
    _same_call(plain, patched, r"model\.forward_loss set on the instance")


# -- transformers' ViTMAEForPreTraining: the same rules on every call ------------------------------------

def _hf(**config):
    from test_patching_transformers import _hf_pair

    return _hf_pair(**config)


def _hf_same(plain, patched, match, noise=None):
    imgs = torch.randn(N, 3, 32, 32)
    noise = torch.rand(N, L) if noise is None else noise
    plain.zero_grad(), patched.zero_grad()
    want = plain(pixel_values=imgs, noise=noise)
    want.loss.backward()
    if match is None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", _slow_warning())
            got = patched(pixel_values=imgs, noise=noise)
    else:
        with pytest.warns(_slow_warning(), match=match):
            got = patched(pixel_values=imgs, noise=noise)
    got.loss.backward()
    assert torch.allclose(got.loss, want.loss, rtol=1e-5) and torch.allclose(got.logits, want.logits, atol=1e-5)
    return {n: p.grad for n, p in patched.named_parameters()}


def test_transformers_adapters_and_instance_forwards_after_patching_run_the_original():
    plain, patched = _hf()
    for m in (plain, patched):
        att = m.vit.encoder.layer[0].attention if hasattr(m.vit, "encoder") else m.vit.layers[0].attention
        name = "q_proj" if hasattr(att, "q_proj") else None
        if name is None:
            pytest.skip("transformers 4.x names")
        torch.manual_seed(3)
        setattr(att, name, LoRALinear(getattr(att, name), b_init=0.01))
    grads = _hf_same(plain, patched, "encoder layer 0")
    assert any("lora_a" in n and g is not None for n, g in grads.items())  # the adapter trains
    plain, patched = _hf()
    for m in (plain, patched):
        proj = m.vit.embeddings.patch_embeddings.projection
        proj.forward = types.MethodType(lambda self, x: nn.Conv2d.forward(self, x) * 1.5, proj)
    _hf_same(plain, patched, "projection is not a plain Conv2d")
    plain, patched = _hf()
    fixed = torch.rand(N, L)
    for m in (plain, patched):
        emb = m.vit.embeddings
        real = type(emb).random_masking
        emb.random_masking = types.MethodType(lambda self, seq, noise=None, _r=real: _r(self, seq, noise=fixed), emb)
    _hf_same(plain, patched, "random_masking is set on the instance")


class PeftStyle(nn.Module):
    """A peft-style LoRA wrapper (not a Linear or Conv2d): the base layer and the A/B adapters as children,
    none of the base layer's other attributes (out_features, in_channels)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        conv = isinstance(base, nn.Conv2d)
        n_in, n_out = (base.in_channels, base.out_channels) if conv else (base.in_features, base.out_features)
        if conv:
            self.lora_A = nn.Conv2d(n_in, 2, base.kernel_size, base.stride, bias=False)
            self.lora_B = nn.Conv2d(2, n_out, 1, bias=False)
        else:
            self.lora_A, self.lora_B = nn.Linear(n_in, 2, bias=False), nn.Linear(2, n_out, bias=False)
        nn.init.constant_(self.lora_B.weight, 0.01)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


@pytest.mark.parametrize("where,when", [("vit.embeddings.patch_embeddings.projection", "before"),
                                        ("vit.embeddings.patch_embeddings.projection", "after"),
                                        ("attention.q_proj", "after")])  # (before: refused at patch time)
def test_transformers_a_wrapper_on_a_layer_whose_weights_are_read_runs_the_original(where, when):
    """Such a wrapper (not refused at patch time on the patch projection; set after patching on q_proj) made
    the call fail with an AttributeError, the fast path reading the layer's sizes before seeing that it was
    no plain layer: the call now runs the original forward, named."""
    plain, patched = _hf()
    if where.startswith("attention"):
        if not hasattr(plain.vit, "layers"):
            pytest.skip("transformers 4.x names")
        where = "vit.layers.0." + where
    targets = (plain, patched) if when == "after" else (plain,)
    for m in targets:
        parent, name = m.get_submodule(where.rsplit(".", 1)[0]), where.rsplit(".", 1)[1]
        torch.manual_seed(3)
        setattr(parent, name, PeftStyle(getattr(parent, name)))
    if when == "before":
        patched = maefast.patch(copy.deepcopy(plain))
    grads = _hf_same(plain, patched, "not a plain")
    assert any("lora_A" in n and g is not None for n, g in grads.items())  # the adapter trains


def test_transformers_an_adapter_on_a_layer_the_fast_path_calls_is_patched_and_served():
    """A peft-style adapter on o_proj / fc1 / fc2 (layers the unfused fast path calls as modules) was refused at
    patch time as "would be silently dropped", though the fast path runs it (set after patching, it was served):
    now patched and served exactly; with fused="block", which reads those layers' weights, still refused."""
    plain0, _ = _hf()
    if not hasattr(plain0.vit, "layers"):
        pytest.skip("transformers 4.x names")
    for where in ("vit.layers.0.attention.o_proj", "vit.layers.1.mlp.fc1", "decoder.decoder_layers.0.mlp.fc2"):
        plain = copy.deepcopy(plain0)
        parent, name = plain.get_submodule(where.rsplit(".", 1)[0]), where.rsplit(".", 1)[1]
        torch.manual_seed(3)
        setattr(parent, name, PeftStyle(getattr(parent, name)))
        with pytest.raises(TypeError, match="silently dropped"):
            maefast.patch(copy.deepcopy(plain), fused="block")
        grads = _hf_same(plain, maefast.patch(copy.deepcopy(plain)), None)
        assert any("lora_A" in n and g is not None for n, g in grads.items()), where


def test_transformers_attention_scaling_and_integer_noise():
    plain, patched = _hf()
    layers = [*(plain.vit.layers if hasattr(plain.vit, "layers") else plain.vit.encoder.layer)]
    if not hasattr(layers[0].attention, "scaling"):
        pytest.skip("transformers 4.x computes the scale")
    for m in (plain, patched):
        for layer in (m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer):
            layer.attention.scaling = 0.5
    _hf_same(plain, patched, None)
    plain, patched = _hf()
    _hf_same(plain, patched, None, noise=torch.stack([torch.randperm(L) for _ in range(N)]))  # a permutation


def test_transformers_heads_narrower_than_the_width_run_the_block_unfused():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                       decoder_num_attention_heads=2, decoder_intermediate_size=64, mask_ratio=0.75,
                       norm_pix_loss=True, layer_norm_eps=1e-6, head_dim=8)  # 4 x 8 = 32 < hidden 64
    torch.manual_seed(0)
    plain = ViTMAEForPreTraining(cfg)
    q = plain.vit.layers[0].attention.q_proj if hasattr(plain.vit, "layers") else None
    if q is None or q.out_features == 64:
        pytest.skip("this transformers has no head_dim setting")
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    _hf_same(plain, maefast.patch(copy.deepcopy(plain), fused="block"), None)
