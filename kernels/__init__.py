"""Triton kernels of maefast, shipped as `maefast.kernels`. Importing this package does not import
triton; each kernel module does, and is imported only when a Triton impl is chosen.

The folder is never a top-level `kernels` package. With the repository root on `sys.path`
(`python -m pytest`, a REPL or a script run from the root) `import kernels` finds this folder first
and would shadow Hugging Face's `kernels` package, which transformers imports. Imported under that
name, this module hands the import on to the next `kernels` on the path; where there is none, it
leaves what Python leaves for a folder without `__init__.py` (a namespace package: no `__file__`,
no `__version__`, nothing inside). It cannot raise instead: transformers 5.x asks
`importlib.util.find_spec("kernels")`, which finds this folder, then imports it to read a version
when no installed distribution has one, without catching an error, and takes a namespace package
for what it is, a folder on the path rather than an install (`from transformers import
ViTMAEForPreTraining` failed in the root under transformers 5.17 without `kernels` installed).
"""
if __name__ == "kernels":
    def _defer() -> None:
        import importlib
        import importlib.machinery
        import importlib.util
        import os
        import sys
        import types

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ours = sys.modules.pop("kernels")
        saved = list(sys.path)
        # Every sys.path entry but the repository root ("" and "." included); the finders on
        # sys.meta_path (an editable install's among them) are asked too.
        sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != here]
        try:
            if importlib.util.find_spec("kernels") is None:  # nothing installed: a namespace package's face
                shadow = types.ModuleType("kernels")
                shadow.__spec__ = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
                shadow.__path__ = []
                shadow.__package__ = "kernels"
                sys.modules["kernels"] = shadow
                return
            sys.modules["kernels"] = importlib.import_module("kernels")  # its own errors propagate
        finally:
            # Entries the imported package added stay; the removed ones come back in front.
            added = [p for p in sys.path if p not in saved]
            sys.path[:] = saved + added
            del ours

    _defer()
