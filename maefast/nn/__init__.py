"""Drop-in modules with the official/timm constructor arguments and state-dict keys."""
from .loss import NormPixLoss  # noqa: F401
from .unshuffle import Unshuffle  # noqa: F401
from .patch_embed import MaskedPatchEmbed  # noqa: F401
from .attention import Attention, Block, DropPath, Mlp  # noqa: F401
