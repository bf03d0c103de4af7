"""maefast.models.configs beyond tests/test_model.py (the paper models' sizes and spellings) and test_bench.py's
test_check_config: every alias, the CPU config's head widths, check_config on both attentions and on bools."""
import pytest

from maefast.models.configs import ALIASES, MODEL_CONFIGS, check_config, model_config, resolve_model_name

SIZES = {"b": "base", "l": "large", "h": "huge", "s": "small", "t": "tiny"}


def test_every_alias_names_the_model_it_spells():
    """A short name resolves to the model it spells: its first letter the size (vit_l, l16, large -> ViT-L), its
    digits, if any, the patch (h14 -> patch14); each of the paper's three models has some."""
    for alias, key in ALIASES.items():
        word = alias.removeprefix("vit_")
        assert key in MODEL_CONFIGS and f"_{SIZES[word[0]]}_" in f"{key}_", (alias, key)
        if word[1:].isdigit():
            assert key.endswith(f"_patch{word[1:]}"), (alias, key)
        assert resolve_model_name(alias) == resolve_model_name(alias.upper()) == key
    assert {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"} <= set(ALIASES.values())


def test_cpu_config_keeps_the_papers_head_widths():
    """mae_vit_small_cpu: head dims 64 (encoder) and 32 (decoder), as the paper's models, on 8 x 8 = 64 patches."""
    cfg = model_config("small")
    assert cfg["embed_dim"] // cfg["num_heads"] == 64 and cfg["decoder_embed_dim"] // cfg["decoder_num_heads"] == 32
    assert check_config(cfg) == 64


@pytest.mark.parametrize("bad,needle", [
    (dict(num_heads=5), "embed_dim=768 is not divisible by num_heads=5"),  # the encoder's heads too
    (dict(depth=True), "depth must be a non-negative integer, got True"),  # a bool is no size
    (dict(decoder_depth=-1), "decoder_depth must be a non-negative integer, got -1"),
    (dict(img_size=(224, 0)), r"img_size must be a positive integer or \(height, width\) of them, got \(224, 0\)"),
    (dict(img_size=(224, 100)), "img_size=.224, 100. is not a whole number of patch_size=16 patches"),
    (dict(mlp_ratio=True), "mlp_ratio must be a positive number, got True"),
    # the sin-cos position embeddings' rule: `maefast bench table2 --override decoder_embed_dim=30` passed this
    # check and failed every row at the model's constructor (exit 1 after the peak's measurement, not 2)
    (dict(decoder_embed_dim=30, decoder_num_heads=2), "decoder_embed_dim=30 is not a multiple of 4"),
    (dict(embed_dim=90, num_heads=3), "embed_dim=90 is not a multiple of 4"),
])
def test_check_config_refuses_encoder_heads_and_bools_by_name(bad, needle):
    with pytest.raises(ValueError, match=needle):
        check_config(model_config("base", **bad))


@pytest.mark.parametrize("change", [dict(depth=0), dict(decoder_depth=0), dict(img_size=(32, 48)),
                                    dict(img_size=[48, 32], depth=0, decoder_depth=0)])
def test_check_config_takes_what_the_model_takes(change):
    """No encoder or decoder block, and (height, width) images, are models the constructor builds and runs:
    check_config takes them too, its L the model's patch count (it refused them as non-positive ints)."""
    import torch

    from maefast.models import MaskedAutoencoderViT

    cfg = model_config("tiny", **change)
    m = MaskedAutoencoderViT(**cfg)
    assert check_config(cfg) == m.patch_embed.num_patches
    h, w = m.patch_embed.img_size
    assert torch.isfinite(m(torch.randn(1, 3, h, w), 0.5)[0])


def test_model_config_is_a_copy_with_the_overrides():
    """model_config returns a fresh dict: a caller's override or later edit never reaches the table (the next
    model built by that name would be another model)."""
    cfg = model_config("base", depth=2)
    assert cfg["depth"] == 2 and MODEL_CONFIGS["mae_vit_base_patch16"]["depth"] == 12
    cfg["embed_dim"] = 8
    assert model_config("base") == MODEL_CONFIGS["mae_vit_base_patch16"] and model_config("base")["embed_dim"] == 768
