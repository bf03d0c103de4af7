"""maefast.flops on what tests/test_bench.py's paper and square configs leave open: rectangular images, each
component and stage on its own, one input channel and other MLP ratios, the Table 2 ratio at another mask ratio,
stage_bytes and the paper's Table 2 figures."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from maefast import flops as fl
from maefast.reference import MaskedAutoencoderViT


def test_flops_of_a_rectangular_model_match_torch_flop_counter():
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                             decoder_depth=1, decoder_num_heads=2)
    with FlopCounterMode(display=False) as fc:
        m(torch.randn(1, 3, 32, 48))  # one image: mae_flops counts per image
    f = fl.mae_flops(m)
    assert f["tokens"] == {"encoder": 7, "decoder": 25, "L": 24}  # 4 x 6 patches, 6 kept
    assert fc.get_total_flops() == f["forward"]
    assert fl.mae_flops(dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)) == f


def _counted_per_module(model, imgs, mask_ratio):
    """FlopCounterMode's count of one forward, per module (name -> FLOPs), the model's prefix dropped."""
    with FlopCounterMode(display=False) as fc:
        model(imgs, mask_ratio)
    prefix = type(model).__name__ + "."
    return {k.removeprefix(prefix): sum(v.values()) for k, v in fc.get_flop_counts().items()}


def test_each_flop_component_and_stage_is_its_own_modules_count():
    """Every component of mae_flops (and every stage of `maefast profile`, which sums them) is the count of its own
    modules, not only their total: qkv + proj, the attention matmuls (the attn module's own bmm) and the MLPs of
    the encoder and of the decoder, decoder_embed and decoder_pred (a term moved between them keeps the total)."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                             decoder_depth=1, decoder_num_heads=2, mlp_ratio=3.0)
    n, ratio = 2, 0.5
    c = _counted_per_module(m, torch.randn(n, 3, 32, 48), ratio)

    def blocks(prefix, depth, part):
        return sum(c[f"{prefix}.{i}.{part}"] for i in range(depth))

    want = {"patch_embed": c["patch_embed"], "decoder_embed": c["decoder_embed"], "decoder_pred": c["decoder_pred"]}
    for side, prefix, depth in (("enc", "blocks", 2), ("dec", "decoder_blocks", 1)):
        linear = blocks(prefix, depth, "attn.qkv") + blocks(prefix, depth, "attn.proj")
        want.update({f"{side}_attn_linear": linear, f"{side}_attn_matmul": blocks(prefix, depth, "attn") - linear,
                     f"{side}_mlp": blocks(prefix, depth, "mlp")})
    f = fl.mae_flops(m, mask_ratio=ratio)
    assert {k: n * f[k] for k in want} == want
    assert {k: n * v for k, v in f["stage_fwd"].items()} == {
        "masking+embed": c["patch_embed"], "encoder attention": blocks("blocks", 2, "attn"),
        "encoder MLP/norms": blocks("blocks", 2, "mlp"), "decoder embed + un-shuffle": c["decoder_embed"],
        "decoder": c["decoder_blocks.0"], "head+loss": c["decoder_pred"]}


def test_flops_and_parameters_of_a_one_channel_model_with_another_mlp_ratio():
    """dims_of reads the model's input channels and MLP width: the FLOP count (patch_embed, decoder_pred) and
    param_count of a one-channel model with mlp_ratio 2.5 are torch's FLOP count and the model's own parameters."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                             decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.5)
    with FlopCounterMode(display=False) as fc:
        m(torch.randn(1, 1, 32, 32))  # one image
    assert fc.get_total_flops() == fl.mae_flops(m)["forward"]
    assert fl.param_count(m) == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_table2_flop_ratio_at_another_mask_ratio_is_the_counted_one():
    """table2_flop_ratio(..., mask_ratio) counts the visible-only encoder at that ratio (the mask-token encoder sees
    every token whatever it is): the ratio of torch's counts of the two models' training steps at 0.5."""
    from maefast.table2 import MaskTokenEncoderMAE

    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                             decoder_depth=1, decoder_num_heads=2)
    imgs, counts = torch.randn(1, 3, 32, 32), []
    for fwd in (MaskTokenEncoderMAE(m), m):
        with FlopCounterMode(display=False) as fc:
            fwd(imgs, mask_ratio=0.5)[0].backward()
        counts.append(fc.get_total_flops())
    assert fl.table2_flop_ratio(m, mask_ratio=0.5) == counts[0] / counts[1] != fl.table2_flop_ratio(m)


def test_stage_bytes_are_each_stages_tensors_and_weights():
    """stage_bytes' lower bound, stage by stage, from the model's own tensors: the fp32 images read (embedding and
    loss), each block reading and writing the (N, T, D) encoder or (N, L + 1, Dd) decoder rows, the weight matrices
    each stage holds, and AdamW's 28 bytes per trainable parameter (4 fp32 reads, 3 writes)."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                             decoder_depth=1, decoder_num_heads=2, mlp_ratio=3.0)
    n, ratio, imgs = 3, 0.5, torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        latent, _, ids_restore = m.forward_encoder(imgs, ratio)
        dec = m.decoder_embed(latent).shape[-1] * n * (ids_restore.shape[1] + 1)  # the unshuffled decoder rows
    enc = latent.numel()

    def weights(*mods):
        return sum(mod.weight.numel() for mod in mods)

    b, d = m.blocks[0], m.decoder_blocks[0]
    want = {  # stage: (image bytes, activation elements, weight elements)
        "masking+embed": (4 * imgs.numel(), enc, weights(m.patch_embed.proj)),
        "encoder attention": (0, 2 * 2 * enc, 2 * weights(b.attn.qkv, b.attn.proj)),
        "encoder MLP/norms": (0, 2 * 2 * enc, 2 * weights(b.mlp.fc1, b.mlp.fc2)),
        "decoder embed + un-shuffle": (0, enc + dec, weights(m.decoder_embed)),
        "decoder": (0, 2 * dec, weights(d.attn.qkv, d.attn.proj, d.mlp.fc1, d.mlp.fc2)),
        "head+loss": (4 * imgs.numel(), dec, weights(m.decoder_pred))}

    def at(act_bytes, weight_bytes):
        return fl.stage_bytes(m, n, act_bytes=act_bytes, weight_bytes=weight_bytes, mask_ratio=ratio)

    base, act, wgt = at(0, 0), at(1, 0), at(0, 1)
    got = {k: (base[k], act[k] - base[k], wgt[k] - base[k]) for k in want}
    assert got == want
    assert base["optimizer"] == 28 * sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_paper_speed_ups_are_its_hours():
    """PAPER_TABLE2's speed-ups as printed are the mask-token encoder's hours over each row's (the paper's Table 2:
    ViT-L 42.4 h, ViT-H 119.6 h with [M] and decoder 8), to the paper's one decimal."""
    for (name, depth), (hours, speedup, _) in fl.PAPER_TABLE2.items():
        if name in fl.PAPER_MASK_TOKEN_HOURS:
            assert round(fl.PAPER_MASK_TOKEN_HOURS[name] / hours, 1) == speedup, (name, depth)
    assert sum(name in fl.PAPER_MASK_TOKEN_HOURS for name, _ in fl.PAPER_TABLE2) == 4


def test_flops_of_a_model_whose_decoder_mlp_width_the_encoders_does_not_pin():
    """mlp_ratio 2.2 makes the encoder's MLP 140 wide (64 x 2.2 = 140.8) and the decoder's 281 (128 x 2.2); a
    ratio read off the encoder alone (140 / 64) gives the decoder 280: dims_of reads one ratio that gives both,
    so the count and param_count of the model instance are torch's and the model's own."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=128,
                             decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.2)
    assert (m.blocks[0].mlp.fc1.out_features, m.decoder_blocks[0].mlp.fc1.out_features) == (140, 281)
    with FlopCounterMode(display=False) as fc:
        m(torch.randn(1, 3, 32, 32))
    assert fc.get_total_flops() == fl.mae_flops(m)["forward"]
    assert fl.param_count(m) == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_flops_of_models_without_encoder_or_decoder_blocks():
    """depth 0 / decoder_depth 0 (the model takes both): the count of a model instance is torch's (it raised
    IndexError reading the first encoder block's heads and MLP)."""
    torch.manual_seed(0)
    for depth, decoder_depth in ((0, 1), (1, 0), (0, 0)):
        m = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2,
                                 decoder_embed_dim=16, decoder_depth=decoder_depth, decoder_num_heads=2)
        with FlopCounterMode(display=False) as fc:
            m(torch.randn(1, 3, 32, 32))
        assert fc.get_total_flops() == fl.mae_flops(m)["forward"], (depth, decoder_depth)
        assert fl.param_count(m) == sum(p.numel() for p in m.parameters() if p.requires_grad)
