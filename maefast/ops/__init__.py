"""maefast's ops: torch.library custom ops with fake and autograd registrations, each choosing a
backend through impl="auto" | "triton" | "cuda" | "reference"."""
from ._backend import IMPLS, choose_impl  # noqa: F401
