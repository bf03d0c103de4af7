"""Triton kernels of maefast, shipped as `maefast.kernels`. Importing this package does not import
triton; each kernel module does, and is imported only when a Triton impl is chosen.

The folder is never a top-level `kernels` package. With the repository root on `sys.path`
(`python -m pytest`, a REPL or a script run from the root) `import kernels` finds this folder first
and would shadow Hugging Face's `kernels` package, which transformers imports. Imported under that
name, this module hands the import on to the next `kernels` on the path (or fails exactly as if the
folder were not here), so `import kernels` means the same with or without a maefast checkout beside.
"""
if __name__ == "kernels":
    def _defer() -> None:
        import importlib
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ours = sys.modules.pop("kernels")
        saved = list(sys.path)
        # Every sys.path entry that resolves to the repository root ("" and "." included).
        sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != here]
        try:
            real = importlib.import_module("kernels")
        except ImportError:
            raise ModuleNotFoundError("No module named 'kernels' (the 'kernels/' folder in "
                                      f"{here} is maefast's and imports as 'maefast.kernels')",
                                      name="kernels") from None
        finally:
            # Entries the imported package added stay; the removed ones come back in front.
            added = [p for p in sys.path if p not in saved]
            sys.path[:] = saved + added
            del ours
        sys.modules["kernels"] = real

    _defer()
