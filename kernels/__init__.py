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
        import os
        import sys
        import types

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ours = sys.modules.pop("kernels")
        # Every sys.path entry but the repository root ("" and "." included).
        others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", others)
        if spec is None:  # nothing installed: a namespace package's face, empty
            shadow = types.ModuleType("kernels")
            shadow.__spec__ = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
            shadow.__path__ = []
            shadow.__package__ = "kernels"
            sys.modules["kernels"] = shadow
            del ours
            return
        saved = list(sys.path)
        sys.path[:] = others
        try:
            real = importlib.import_module("kernels")  # its own errors are its own: they propagate
        finally:
            # Entries the imported package added stay; the removed ones come back in front.
            added = [p for p in sys.path if p not in saved]
            sys.path[:] = saved + added
            del ours
        sys.modules["kernels"] = real

    _defer()
