"""maefast.patch of transformers' ViTMAEForPreTraining: gradient and activation checkpointing, and
forward hooks (which a fast path that skips a hooked module must not drop: it runs the original
forward with a SlowPathWarning). The pair and the runner: tests/test_patching_transformers.py."""
import copy
import warnings

import pytest
import torch

import maefast
from maefast.reference import MaskedAutoencoderViT as ReferenceMAE
from official_layout import L, N, TINY, _assert_grads_equal, _close, _grads, _no_slow_warning, _slow_warning
from test_patching_transformers import _hf_pair, _run_hf

pytestmark = pytest.mark.usefixtures("warn_again")

pytest.importorskip("transformers")


def _saved_tensors(model, imgs, noise):
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(pixel_values=imgs, noise=noise)
    out.loss.backward()
    return count[0], _grads(model)


@pytest.mark.parametrize("training", [True, False])
def test_transformers_gradient_checkpointing_enable_is_honoured(training):
    """gradient_checkpointing_enable(): in training only the block inputs are kept for the backward; in
    eval, as in the original (its layers checkpoint only in training), what an unchecked forward keeps."""
    _, patched = _hf_pair()
    patched.train(training)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    n0, g0 = _saved_tensors(patched, imgs, noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        patched.gradient_checkpointing_enable()
    patched.train(training)  # (it may switch the model to training)
    patched.zero_grad()
    with _no_slow_warning():
        n1, g1 = _saved_tensors(patched, imgs, noise)
    assert n1 < n0 / 2 if training else n1 == n0, (n1, n0)
    _assert_grads_equal(g1, g0, rel=1e-6)


def _spy_checkpoint_funcs(model) -> dict:
    """Wrap each layer's checkpoint function (set by transformers when checkpointing is enabled) with a
    call counter; returns {layer name: [calls]}."""
    calls = {}
    for name, m in model.named_modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if fn is not None and name.split(".")[-2:-1] and name.split(".")[-1].isdigit():
            calls[name] = [0]

            def spy(*a, _fn=fn, _c=calls[name], **k):
                _c[0] += 1
                return _fn(*a, **k)

            m._gradient_checkpointing_func = spy
    return calls


@pytest.mark.parametrize("every", [1, 2])
def test_transformers_activation_checkpointing_every_n_layers(every):
    """5.x's activation_checkpointing_enable(every_n_layers=n): the fast path checkpoints the layers the
    original does, through each layer's own checkpoint function (so offload=True, which wraps that
    function in save_on_cpu, is honoured too: it needs a pinned-memory allocator, not here)."""
    from maefast.convert import to_transformers_model

    torch.manual_seed(0)  # 2 + 2 layers: with n = 2 a decoder layer is left out too
    plain = to_transformers_model(ReferenceMAE(**{**TINY, "decoder_depth": 2}, norm_pix_loss=True), mask_ratio=0.75)
    patched = maefast.patch(copy.deepcopy(plain))
    if not hasattr(patched, "activation_checkpointing_enable"):
        pytest.skip("this transformers has no activation_checkpointing_enable(every_n_layers=...)")
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    runs = {}
    for name, model in (("plain", plain), ("patched", patched)):
        model.train()
        model.activation_checkpointing_enable(every_n_layers=every)
        calls = _spy_checkpoint_funcs(model)
        with _no_slow_warning() if name == "patched" else warnings.catch_warnings():
            out, grads = _run_hf(model, imgs, noise)
        runs[name] = out, grads, {k: c[0] for k, c in calls.items()}
    (o0, g0, c0), (o1, g1, c1) = runs["plain"], runs["patched"]
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0, rel=1e-6)
    assert c1 == c0, (c0, c1)  # the same layers, once each, through their own function
    called = [k for k, v in c0.items() if v]
    assert len(c0) >= 4 and (len(called) == len(c0) if every == 1 else 0 < len(called) < len(c0)), c0


@pytest.mark.parametrize("where, slow", [
    ("vit.embeddings", True),           # the fast path never calls the embeddings, the layers or attention
    ("decoder.decoder_layers.0", True),
    ("vit.layernorm", False),           # called as modules: their hooks run on the fast path
    ("decoder.decoder_pred", True),     # called on the L patch rows only (the original: 1+L rows)
])
def test_transformers_hooks_the_fast_path_would_skip_run_the_original(where, slow):
    plain, patched = _hf_pair()
    seen = []
    for m in (plain, patched):
        m.get_submodule(where).register_forward_hook(lambda mod, args, out: seen.append(mod))
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, _ = _run_hf(plain, imgs, noise)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        o1, _ = _run_hf(patched, imgs, noise)
    slow_said = [str(w.message) for w in said if issubclass(w.category, _slow_warning())]
    assert bool(slow_said) == slow and all(f"{where} has hooks" in s for s in slow_said), slow_said
    assert _close(o1.loss, o0.loss) and len(seen) == 2


def test_transformers_hooks_on_a_layer_the_fast_path_calls_run_on_the_fast_path():
    """A forward hook on an MLP layer (unfused: called as a module) runs on the fast path, no warning."""
    plain, patched = _hf_pair()
    seen = []
    for m in (plain, patched):
        layer = (m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer)[1]
        fc1 = layer.mlp.fc1 if hasattr(layer, "mlp") else layer.intermediate.dense
        fc1.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, _ = _run_hf(plain, imgs, noise)
    with _no_slow_warning():
        o1, _ = _run_hf(patched, imgs, noise)
    assert _close(o1.loss, o0.loss) and len(seen) == 2 and seen[0] == seen[1]


def test_transformers_output_capturing_hooks_do_not_slow_later_calls():
    """transformers 5.x installs its output-capturing hooks for good at the first output_hidden_states
    call (which runs the original), and 4.56-4.57 leave each captured layer's own bound forward set on
    its instance; the calls after it are still served fast."""
    plain, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _slow_warning())
        _run_hf(patched, imgs, noise, output_hidden_states=True)
    o0, _ = _run_hf(plain, imgs, noise)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        o1, _ = _run_hf(patched, imgs, noise)
    assert not [w for w in said if issubclass(w.category, _slow_warning())], [str(w.message) for w in said]
    assert _close(o1.loss, o0.loss)


def test_transformers_layer_forward_set_back_to_its_own_method_is_served_fast():
    """`layer.forward = layer.forward` (the class's method bound to the layer: what transformers 4.56-4.57's
    output capturing leaves on each captured layer) computes what the class's forward does: served fast.
    The class's method bound to another layer is the user's forward: it runs the original."""
    plain, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, g0 = _run_hf(plain, imgs, noise)
    enc = patched.vit.layers if hasattr(patched.vit, "layers") else patched.vit.encoder.layer
    for layer in enc:
        layer.forward = layer.forward
        layer.attention.forward = layer.attention.forward
    with _no_slow_warning():
        o1, g1 = _run_hf(patched, imgs, noise)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)
    enc[0].forward = type(enc[1]).forward.__get__(enc[1])  # layer 0 now computes layer 1
    with pytest.warns(_slow_warning(), match="encoder layer 0 runs its own forward"):
        o2, _ = _run_hf(patched, imgs, noise)
    assert not _close(o2.loss, o0.loss, rel=1e-7)
