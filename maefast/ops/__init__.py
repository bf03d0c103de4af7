"""maefast's ops: torch.library custom ops with fake and autograd registrations, each choosing a
backend through impl="auto" | "triton" | "cuda" | "reference"."""
from ._backend import IMPLS, choose_impl  # noqa: F401
from .unshuffle import unshuffle  # noqa: F401
from .loss import masked_patch_ids, masked_prediction_loss, norm_pix_loss  # noqa: F401
from .masking import MaskIds, random_masking  # noqa: F401
from .patch_embed import masked_patch_embed  # noqa: F401
from .attention import visible_attention  # noqa: F401
from .layernorm import add_layer_norm, layer_norm  # noqa: F401
from .bias_gelu import bias_gelu  # noqa: F401
from .block import vit_block  # noqa: F401
from ._dispatch import tag_compile_caches

tag_compile_caches()  # compiled graphs cached by another maefast are not reused (see its docstring)
