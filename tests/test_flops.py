"""maefast.flops on what tests/test_bench.py's paper and square configs leave open: rectangular images."""
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
