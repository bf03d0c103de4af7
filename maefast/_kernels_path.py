"""Makes the top-level `kernels/` folder importable as `maefast.kernels` when maefast runs from a
source checkout (PYTHONPATH=., a worktree) rather than an install, where setup.py maps it
(package_dir). A checkout's `maefast` always takes the `kernels/` beside it, never another tree's."""
from __future__ import annotations

import importlib.util
import os
import sys


def ensure_kernels_package() -> None:
    if "maefast.kernels" in sys.modules:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = os.path.join(root, "kernels", "__init__.py")
    # Only a source checkout (setup.py beside): in site-packages a `kernels/` is someone else's.
    if not (os.path.exists(init) and os.path.exists(os.path.join(root, "setup.py"))):
        return
    spec = importlib.util.spec_from_file_location("maefast.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["maefast.kernels"] = mod
    spec.loader.exec_module(mod)
    setattr(sys.modules["maefast"], "kernels", mod)  # as the import system does for a submodule
