"""Makes the top-level `kernels/` folder importable as `maefast.kernels` when maefast runs from a
source checkout (PYTHONPATH=.) rather than an install, where setup.py maps it (package_dir)."""
from __future__ import annotations

import importlib.util
import os
import sys


def ensure_kernels_package() -> None:
    if "maefast.kernels" in sys.modules:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    if importlib.util.find_spec("maefast.kernels") is not None:
        return
    init = os.path.join(os.path.dirname(here), "kernels", "__init__.py")
    if not os.path.exists(init):
        return
    spec = importlib.util.spec_from_file_location("maefast.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["maefast.kernels"] = mod
    spec.loader.exec_module(mod)
