"""Official checkpoints (full and encoder-only) and transformers conversions, both ways."""
import re

import pytest
import torch

from maefast.convert import (encoder_state_dict, from_transformers, load_official_state_dict, to_transformers,
                             unwrap_checkpoint)
from maefast.models import create_model


def _tiny(**kw):
    return create_model("tiny", **kw)


def _assert_computes_as(hf, m, imgs, noise):
    """transformers' model `hf` and maefast's `m` (mask ratio 0.5): the same mask, prediction and loss."""
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = m(imgs, mask_ratio=0.5, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)


def test_full_roundtrip_and_wrapped_checkpoint():
    a, b = _tiny(), _tiny()
    info = load_official_state_dict(b, {"model": a.state_dict()})
    assert info == {"missing": [], "unexpected": [], "encoder_only": False}
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_encoder_only_release_format():
    a, b = _tiny(), _tiny()
    before = b.decoder_embed.weight.clone()
    info = load_official_state_dict(b, {"model": encoder_state_dict(a.state_dict())})
    assert info["encoder_only"] and info["missing"] == []
    assert torch.equal(b.blocks[1].attn.qkv.weight, a.blocks[1].attn.qkv.weight)
    assert torch.equal(b.decoder_embed.weight, before)


def test_missing_unexpected_and_shape_errors_name_keys():
    a, b = _tiny(), _tiny()
    sd = a.state_dict()
    sd.pop("blocks.0.norm1.weight")
    sd["head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=re.escape("missing keys ['blocks.0.norm1.weight']")):
        load_official_state_dict(b, sd)
    info = load_official_state_dict(b, sd, strict=False)
    assert info["unexpected"] == ["head.weight"]
    sd = a.state_dict()
    sd["norm.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match="shape mismatch for 'norm.weight'"):
        load_official_state_dict(b, sd)
    with pytest.raises(TypeError, match="checkpoint must be"):
        unwrap_checkpoint([1, 2])


def _as_4x_names(hf_sd):
    """transformers 4.x naming of the same weights (encoder.layer.N.attention.attention.query, ...)."""
    out = {}
    for k, v in hf_sd.items():
        k = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", k)
        k = k.replace("attention.q_proj", "attention.attention.query")
        k = k.replace("attention.k_proj", "attention.attention.key")
        k = k.replace("attention.v_proj", "attention.attention.value")
        k = k.replace("attention.o_proj", "attention.output.dense")
        k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        out[k] = v
    return out


def test_transformers_names_both_generations_roundtrip():
    m = _tiny()
    sd = m.state_dict()
    hf5 = to_transformers(sd)
    assert "vit.layers.1.attention.k_proj.weight" in hf5 and "decoder.decoder_layers.0.mlp.fc2.bias" in hf5
    hf4 = _as_4x_names(hf5)
    back5, back4 = from_transformers(hf5), from_transformers(hf4)
    for k, v in sd.items():
        assert torch.equal(back5[k], v), k
        assert torch.equal(back4[k], v), k
    # and to the 4.x names when the target model uses them
    again4 = to_transformers(sd, target_keys=hf4.keys())
    assert set(again4) == set(hf4)
    for k in hf4:
        assert torch.equal(again4[k], hf4[k]), k


def test_transformers_conversions_name_missing_and_leftover_keys():
    """A missing layer key was a bare KeyError, a key with no counterpart was dropped silently, q/k/v of
    unequal shapes were concatenated: each is a ValueError naming the key."""
    sd = _tiny().state_dict()
    hf = to_transformers(sd)
    cases = [
        (to_transformers, {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc1.bias"}, "no 'blocks.1.mlp.fc1.bias'"),
        (to_transformers, {**sd, "head.weight": torch.zeros(3)}, r"no counterpart, e.g. \['head.weight'\]"),
        (from_transformers, {k: v for k, v in hf.items() if k != "vit.layers.1.mlp.fc1.bias"},
         "no 'vit.layers.1.mlp.fc1.bias'"),
        (from_transformers, {**hf, "vit.pooler.dense.weight": torch.zeros(3)}, "vit.pooler.dense.weight"),
        (from_transformers, {**hf, "vit.layers.0.attention.q_proj.weight": torch.zeros(5, 64)}, "unequal shapes"),
    ]
    for fn, state, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(state)
    # an encoder-only file converts its encoder (the decoder's tensors are simply absent)
    enc = to_transformers(encoder_state_dict(sd))
    assert "vit.layers.1.attention.k_proj.weight" in enc and not any(k.startswith("decoder.") for k in enc)


def test_transformers_config_with_two_mlp_ratios_is_named():
    """maefast's MAE has one MLP ratio; a ViTMAEConfig whose decoder has another was refused as a 'shape
    mismatch' of a decoder weight (a corrupt checkpoint, it read): the message now says why."""
    transformers = pytest.importorskip("transformers")
    from maefast.convert import from_transformers_model

    base = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=32,
                patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2)
    for kw in (dict(decoder_intermediate_size=32), dict(hidden_size=112, num_attention_heads=2,
                                                           intermediate_size=488, decoder_intermediate_size=64)):
        hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**{**base, **kw}))
        with pytest.raises(ValueError, match="one MLP ratio for encoder and decoder"):
            from_transformers_model(hf)
    ok = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**base, decoder_intermediate_size=64))
    assert from_transformers_model(ok).decoder_blocks[0].mlp.fc1.out_features == 64


def test_transformers_model_roundtrip():
    pytest.importorskip("transformers")
    from maefast.convert import from_transformers_model, to_transformers_model

    m = _tiny(norm_pix_loss=True)
    hf = to_transformers_model(m, mask_ratio=0.5)
    assert hf.config.norm_pix_loss and hf.config.layer_norm_eps == 1e-6 and hf.config.mask_ratio == 0.5
    m2 = from_transformers_model(hf)
    assert m2.norm_pix_loss
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    rect = create_model("tiny", img_size=(32, 48))
    with pytest.raises(ValueError, match="square images"):
        to_transformers_model(rect)


def test_checkpoints_saved_through_ddp_or_compile_load_as_the_model(tmp_path):
    """'module.' / '_orig_mod.' key prefixes (a DDP or torch.compile wrapper's state dict) were taken for
    an encoder-only file (no 'decoder_' key) and loaded nothing under strict=False."""
    from maefast.train.checkpoint import load_checkpoint

    a, b = _tiny(), _tiny()
    wrapped = {f"_orig_mod.module.{k}": v for k, v in a.state_dict().items()}
    assert load_official_state_dict(b, {"model": wrapped})["encoder_only"] is False
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    path = tmp_path / "ck.pth"
    torch.save({"model": wrapped}, path)
    assert set(load_checkpoint(str(path), optimizer=False)["model"]) == set(a.state_dict())
    legacy = tmp_path / "legacy.pth"  # torch's pre-zip format cannot be memory-mapped: read whole
    torch.save({"model": a.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    assert set(load_checkpoint(str(legacy), optimizer=False)["model"]) == set(a.state_dict())


def test_conversions_refuse_what_they_do_not_recognise(tmp_path):
    """A state dict of another layout converted to {} without a word; a transformers config maefast's
    model does not compute (another activation, no q/k/v bias) converted silently or with a KeyError."""
    sd = _tiny().state_dict()
    with pytest.raises(ValueError, match="not a transformers ViTMAEForPreTraining state dict"):
        from_transformers(sd)
    with pytest.raises(ValueError, match="not an official MAE state dict"):
        to_transformers({"vit.embeddings.cls_token": torch.zeros(1)})
    pytest.importorskip("transformers")
    from maefast.convert import from_transformers_model, to_transformers_model

    hf = to_transformers_model(_tiny())
    for field, value in (("hidden_act", "relu"), ("qkv_bias", False)):
        setattr(hf.config, field, value)
        with pytest.raises(ValueError, match="exact GELU and q/k/v biases"):
            from_transformers_model(hf)
        setattr(hf.config, field, {"hidden_act": "gelu", "qkv_bias": True}[field])
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):  # it converted without its dropout
        setattr(hf.config, field, 0.1)
        with pytest.raises(ValueError, match=f"has no dropout; this config has .*{field}=0.1"):
            from_transformers_model(hf)
        setattr(hf.config, field, 0.0)


def test_a_damaged_shards_folder_is_one_clear_error(tmp_path):
    """torch.distributed.checkpoint raises CheckpointException, a BaseException: it escaped the ValueError."""
    from maefast.train.checkpoint import _load_full_shards

    folder = tmp_path / "checkpoint-last.pth.dcp-0a1b"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"not a pickle")
    (folder / "__0_0.distcp").write_bytes(b"torn")
    with pytest.raises(ValueError, match="is not readable \\(damaged or incomplete"):
        _load_full_shards(str(folder))


def test_strict_loading_refuses_an_unexpected_key_alone_and_a_missing_decoder_key():
    a, b = _tiny(), _tiny()
    with pytest.raises(ValueError, match=re.escape("unexpected keys ['head.weight']")):
        load_official_state_dict(b, {**a.state_dict(), "head.weight": torch.zeros(3)})
    sd = a.state_dict()
    sd.pop("decoder_pred.bias")  # a full checkpoint (it has a decoder) short of one decoder tensor
    with pytest.raises(ValueError, match=re.escape("missing keys ['decoder_pred.bias']")):
        load_official_state_dict(b, sd)
    assert load_official_state_dict(b, sd, strict=False)["missing"] == ["decoder_pred.bias"]


def test_wrapper_prefixes_are_stripped_only_when_every_key_has_one():
    from maefast.convert import strip_wrapper_prefixes

    assert strip_wrapper_prefixes({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}
    assert strip_wrapper_prefixes({"module._orig_mod.a": 1, "module._orig_mod.b": 2}) == {"a": 1, "b": 2}


def test_default_transformers_names_are_the_newest():
    """Without target_keys every layer key takes transformers 5.x's name (o_proj, mlp.fc1, q_proj)."""
    hf = to_transformers(_tiny().state_dict())
    for layer in ("vit.layers.0.", "vit.layers.1.", "decoder.decoder_layers.0."):
        for name in ("attention.q_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2", "layernorm_before"):
            assert f"{layer}{name}.weight" in hf, (layer, name)
    assert not [k for k in hf if "attention.attention." in k or "intermediate" in k or "output.dense" in k]


def test_from_transformers_model_computes_as_the_transformers_model():
    """A ViTMAEConfig of transformers' defaults where they differ from maefast's (LayerNorm eps 1e-12),
    MLP ratio 2, decoder heads unlike the encoder's: the converted model gives transformers' loss and pred."""
    transformers = pytest.importorskip("transformers")
    from maefast.convert import from_transformers_model, to_transformers_model

    cfg = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=1, decoder_intermediate_size=32, norm_pix_loss=True,
                                    mask_ratio=0.5)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    m = from_transformers_model(hf, impl="reference")
    assert m.impl == "reference" and m.norm_pix_loss and m.norm.eps == m.decoder_blocks[0].norm1.eps == 1e-12
    assert (m.blocks[0].attn.num_heads, m.decoder_blocks[0].attn.num_heads) == (4, 1)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    _assert_computes_as(hf, m, imgs, noise)
    back = to_transformers_model(m, mask_ratio=0.5)  # and back: the same config and weights
    for field in ("intermediate_size", "decoder_intermediate_size", "decoder_num_attention_heads", "layer_norm_eps"):
        assert getattr(back.config, field) == getattr(cfg, field), field
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_one_mlp_ratio_that_floating_point_does_not_round_trip():
    """intermediate 488 for hidden 112 (encoder and decoder alike): 112 * (488 / 112) is 487.99999999999994 in
    floating point, and int() of it made a 487-wide MLP: the config was refused as having two MLP ratios."""
    transformers = pytest.importorskip("transformers")
    from maefast.convert import from_transformers_model

    cfg = transformers.ViTMAEConfig(hidden_size=112, num_hidden_layers=1, num_attention_heads=2, intermediate_size=488,
                                    image_size=16, patch_size=8, decoder_hidden_size=112, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=2, decoder_intermediate_size=488)
    m = from_transformers_model(transformers.ViTMAEForPreTraining(cfg))
    assert m.blocks[0].mlp.fc1.out_features == m.decoder_blocks[0].mlp.fc1.out_features == 488


def _distinct(model):
    """``model`` with every tensor of its state dict made distinct (fresh LayerNorms are all ones and zeros: a
    swap of two of them converts to the same numbers)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + torch.rand((), generator=gen))
    return model


def test_to_transformers_puts_each_tensor_under_its_own_name():
    """Every official tensor lands under the transformers name of the same piece (norm1 before the attention,
    norm2 after it; q, k, v in that order out of qkv), checked on a model whose tensors all differ."""
    sd = _distinct(_tiny()).state_dict()
    hf = to_transformers(sd)
    for src, dst in (("blocks.1.norm1", "vit.layers.1.layernorm_before"),
                     ("blocks.1.norm2", "vit.layers.1.layernorm_after"),
                     ("decoder_blocks.0.norm1", "decoder.decoder_layers.0.layernorm_before"),
                     ("blocks.0.attn.proj", "vit.layers.0.attention.o_proj"), ("norm", "vit.layernorm"),
                     ("decoder_norm", "decoder.decoder_norm"), ("blocks.0.mlp.fc2", "vit.layers.0.mlp.fc2")):
        for p in ("weight", "bias"):
            assert torch.equal(hf[f"{dst}.{p}"], sd[f"{src}.{p}"]), (src, p)
    q, k, v = sd["blocks.1.attn.qkv.weight"].chunk(3)
    for name, want in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        assert torch.equal(hf[f"vit.layers.1.attention.{name}.weight"], want), name


def test_transformers_model_computes_as_maefast_on_distinct_weights():
    """The converted transformers model gives maefast's loss and prediction when no two tensors are alike (the
    oracle tests start from fresh LayerNorms, which a swapped pair does not change)."""
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model

    m = _distinct(create_model("tiny", impl="reference")).eval()
    hf = to_transformers_model(m, mask_ratio=0.5).eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    _assert_computes_as(hf, m, imgs, noise)


def test_split_qkv_is_saved_as_separate_tensors(tmp_path):
    """q, k and v are copies, not views of the fused qkv: safetensors (transformers' save format) refuses tensors
    that share memory, and an edit of the source must not reach the converted dict."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = _tiny().state_dict()
    hf = to_transformers(sd)
    safetensors_torch.save_file(hf, str(tmp_path / "model.safetensors"))
    q = hf["vit.layers.0.attention.q_proj.weight"].clone()
    sd["blocks.0.attn.qkv.weight"].add_(1.0)
    assert torch.equal(hf["vit.layers.0.attention.q_proj.weight"], q)


def test_checkpoint_layouts_unwrap_to_the_state_dict():
    """A state dict under 'model', 'state_dict' or 'model_state', or bare; a key that holds no mapping (e.g. a
    model's name under 'model') is passed over; wrapper prefixes go in every layout."""
    sd = {"cls_token": torch.zeros(1), "blocks.0.norm1.weight": torch.ones(2)}
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    for ck in ({"model": sd}, {"state_dict": sd}, {"model_state": sd},
               {"model": "mae_vit_base_patch16", "state_dict": sd}, wrapped, {"model_state": wrapped}):
        assert unwrap_checkpoint(ck) == sd, list(ck)


def test_a_sharded_checkpoint_read_with_torch_load_says_where_its_weights_are():
    """`maefast train --fsdp` writes the weights into a folder beside the file: the file alone, read with
    torch.load instead of load_checkpoint, was taken for a state dict (every model key reported missing,
    'config', 'epoch', ... unexpected)."""
    ck = {"shards": "checkpoint-last.pth.dcp-0a1b", "config": {}, "epoch": 2, "step": 8}
    for convert in (lambda c: load_official_state_dict(_tiny(), c), to_transformers):
        with pytest.raises(ValueError, match=r"sharded maefast train checkpoint \(--fsdp\).*'checkpoint-last"
                           r"\.pth\.dcp-0a1b'.*load_checkpoint\(path\)"):
            convert(ck)


def test_transformers_model_of_a_one_channel_model():
    """in_chans goes into the config (num_channels): a 1-channel model converts and back."""
    pytest.importorskip("transformers")
    from maefast.convert import from_transformers_model, to_transformers_model

    m = _tiny(in_chans=1)
    hf = to_transformers_model(m)
    assert hf.config.num_channels == 1
    back = from_transformers_model(hf)
    assert back.in_chans == 1 and all(torch.equal(back.state_dict()[k], v) for k, v in m.state_dict().items())


def test_transformers_model_of_an_official_layout_model():
    """facebookresearch's MaskedAutoencoderViT keeps no `in_chans` attribute (its patch embedding's conv has
    it): to_transformers_model of one, patched or not, raised AttributeError before 2026-12-07. The converted
    model computes as the patched one."""
    pytest.importorskip("transformers")
    import maefast
    from maefast.convert import to_transformers_model
    from official_layout import TINY, official_class

    torch.manual_seed(0)
    m = official_class()(norm_pix_loss=True, **TINY)
    assert not hasattr(m, "in_chans")
    hf = to_transformers_model(m, mask_ratio=0.5).eval()
    assert hf.config.num_channels == 3 and hf.config.norm_pix_loss
    _assert_computes_as(hf, maefast.patch(m).eval(), torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    del m.norm_pix_loss  # a fork without the flag: no norm-pix loss, as maefast.patch takes it (AttributeError before)
    assert not to_transformers_model(m).config.norm_pix_loss


def test_transformers_model_of_a_model_its_config_cannot_express_is_refused():
    """transformers' config has one activation (hidden_act='gelu': the exact GELU), one LayerNorm eps, q.k
    scaled by head_dim ** -0.5, and its dropout in other places than timm's blocks: to_transformers_model
    wrote those for any model, so a block with another activation, scale, eps or a dropout converted
    without a word into a model computing something else. Now a ValueError names the part (a field the
    caller gives transformers_config is taken as given). An encoder without blocks raised IndexError."""
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model, transformers_config
    from maefast.nn import DropPath

    changes = {"mlp.act": lambda b: setattr(b.mlp, "act", torch.nn.GELU(approximate="tanh")),
               "attn.scale": lambda b: setattr(b.attn, "scale", 0.1),
               "norm2.eps": lambda b: setattr(b.norm2, "eps", 1e-3),
               "attn.attn_drop": lambda b: setattr(b.attn.attn_drop, "p", 0.1),
               "drop_path": lambda b: setattr(b, "drop_path", DropPath(0.1))}
    for what, change in changes.items():
        m = _tiny()
        change(m.decoder_blocks[0])
        with pytest.raises(ValueError, match=f"cannot express this model: decoder_blocks.0.{re.escape(what)}"):
            to_transformers_model(m)
    m = _tiny()
    m.blocks[0].mlp.act = torch.nn.GELU(approximate="tanh")
    assert transformers_config(m, hidden_act="gelu_pytorch_tanh").hidden_act == "gelu_pytorch_tanh"
    m = _tiny(depth=0)
    hf = to_transformers_model(m, mask_ratio=0.5)
    assert hf.config.num_hidden_layers == 0
    _assert_computes_as(hf, m, torch.randn(2, 3, 32, 32), torch.rand(2, 16))


def test_an_official_checkpoint_loads_into_a_compiled_or_wrapped_model():
    """A torch.compile'd or DataParallel model's own keys start with '_orig_mod.' / 'module.', the checkpoint's
    lose that prefix: strict loading named every key missing and unexpected, strict=False loaded nothing."""
    a = _distinct(_tiny())
    for wrap in (torch.compile, torch.nn.DataParallel, lambda m: torch.compile(torch.nn.DataParallel(m))):
        for ck in ({"model": a.state_dict()}, {"model": wrap(a).state_dict()}):
            for strict in (True, False):
                b = _tiny()
                info = load_official_state_dict(wrap(b), ck, strict=strict)
                assert info == {"missing": [], "unexpected": [], "encoder_only": False}
                assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    b = _tiny()
    info = load_official_state_dict(torch.compile(b), {"model": encoder_state_dict(a.state_dict())})
    assert info["encoder_only"] and torch.equal(b.blocks[1].mlp.fc2.weight, a.blocks[1].mlp.fc2.weight)


def test_a_transformers_model_through_a_wrapper_converts(tmp_path):
    """from_transformers did not unwrap its input as to_transformers does: a compiled transformers model, a
    state dict saved through DDP, or one under 'model' (load_checkpoint's) was 'not a ViTMAEForPreTraining'."""
    pytest.importorskip("transformers")
    from maefast.convert import from_transformers_model, to_transformers_model
    from maefast.train.checkpoint import load_checkpoint

    m = _distinct(_tiny())
    hf = to_transformers_model(m)
    torch.save({f"module.{k}": v for k, v in hf.state_dict().items()}, tmp_path / "hf.pth")
    for state in ({f"module.{k}": v for k, v in hf.state_dict().items()}, {"model": hf.state_dict()},
                  load_checkpoint(str(tmp_path / "hf.pth"), optimizer=False)):
        back = from_transformers(state)
        assert set(back) == set(m.state_dict()) and all(torch.equal(back[k], v) for k, v in m.state_dict().items())
    m2 = from_transformers_model(torch.compile(hf))
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in m.state_dict().items())


def test_a_file_holding_a_plain_state_dict_loads(tmp_path):
    """torch.save(model.state_dict(), path), the usual way to keep weights, was 'not a maefast/MAE checkpoint (no
    'model' entry)' to load_checkpoint (README's way to read a file for load_official_state_dict and visualize);
    it reads as {'model': state dict}, and a resume from it says it holds no run state."""
    from maefast.train.checkpoint import check_resumable, load_checkpoint

    a, b = _distinct(_tiny()), _tiny()
    path = tmp_path / "weights.pth"
    torch.save({f"module.{k}": v for k, v in a.state_dict().items()}, path)
    for optimizer in (True, False):
        ck = load_checkpoint(str(path), optimizer=optimizer)
        assert set(ck) == {"model"} and set(ck["model"]) == set(a.state_dict())
        assert load_official_state_dict(b, ck)["missing"] == []
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
        with pytest.raises(ValueError, match="holds model weights but not a maefast train run's state"):
            check_resumable(ck, str(path))


def test_models_with_parametrized_weights_convert_the_weights_they_compute_with():
    """A weight under torch.nn.utils.parametrize (weight norm, a pruning mask) is in the state dict as
    'parametrizations.weight.original0/1': both model conversions refused it as a partial file ('no
    ...mlp.fc1.weight'); they take the weight the module computes with."""
    pytest.importorskip("transformers")
    from torch.nn.utils.parametrizations import weight_norm

    from maefast.convert import from_transformers_model, to_transformers_model
    from maefast.models.hf_view import _hf_layers, _hf_linears

    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    hf = to_transformers_model(_distinct(_tiny()), mask_ratio=0.5).eval()
    enc, dec = _hf_layers(hf)  # 5.x or 4.x module names
    weight_norm(_hf_linears(enc[0])[4])  # fc1
    weight_norm(_hf_linears(dec[0])[0])  # q
    m = from_transformers_model(hf, impl="reference").eval()
    _assert_computes_as(hf, m, imgs, noise)
    m = _distinct(_tiny(impl="reference")).eval()
    weight_norm(m.blocks[1].attn.qkv)
    _assert_computes_as(to_transformers_model(m, mask_ratio=0.5).eval(), m, imgs, noise)


def test_an_official_checkpoint_loads_into_a_model_sharded_by_fully_shard(tmp_path):
    """FSDP2's fully_shard makes the parameters DTensors: load_state_dict's copy of a full tensor into one failed
    ('aten.copy_.default got mixed torch.Tensor and DTensor'). Each rank now takes its shards (one gloo rank here;
    two ranks, compiled or not, checked by hand)."""
    import torch.distributed as dist

    fsdp = pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        a, b = _distinct(_tiny()), _tiny()
        mesh = init_device_mesh("cpu", (1,))
        for blk in b.blocks:
            fsdp.fully_shard(blk, mesh=mesh)
        fsdp.fully_shard(b, mesh=mesh)
        assert load_official_state_dict(b, {"model": a.state_dict()}) == {"missing": [], "unexpected": [],
                                                                           "encoder_only": False}
        assert all(torch.equal(v.full_tensor(), a.state_dict()[k]) for k, v in b.state_dict().items())
    finally:
        dist.destroy_process_group()


def test_to_transformers_model_refuses_a_mask_ratio_outside_the_official_domain():
    """transformers' config takes any mask_ratio, and its masking slices ids_shuffle[:, :int(L * (1 - r))]: 1.5
    kept the first L/2 of the shuffle (a ratio of 0.5, silently), a string failed in the forward."""
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model

    m = _tiny()
    with pytest.raises(ValueError, match=r"mask_ratio must be in the interval \[0, 1\], got 1.5"):
        to_transformers_model(m, mask_ratio=1.5)
    with pytest.raises(TypeError, match="mask_ratio must be a float"):
        to_transformers_model(m, mask_ratio="0.5")
    assert to_transformers_model(m, mask_ratio=0.0).config.mask_ratio == 0.0
