"""`import maefast` works without triton and without the CUDA extension (checked in subprocesses)."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def __init__(self, names): self.names = names
    def find_spec(self, name, path, target=None):
        if name in self.names or any(name.startswith(n + '.') for n in self.names):
            raise ImportError(f'blocked {name} for the test')
sys.meta_path.insert(0, Block(NAMES))
"""


def test_import_without_triton():
    out = _run(BLOCK.replace('NAMES', repr(["triton"])) + """
import torch, maefast
from maefast import reference, models
info = maefast.backends()
assert info['triton'] is False and 'blocked' in info['triton_error'], info
m = models.create_model('tiny')
loss, _, _ = m(torch.randn(2, 3, 32, 32))
import maefast.ops
print('ok', float(loss) > 0)
""")
    assert "ok True" in out


def test_import_without_C_extension():
    out = _run(BLOCK.replace('NAMES', repr(["maefast._C"])) + """
import maefast
from maefast import _cpp_lib
assert _cpp_lib.get_C() is None and 'blocked' in _cpp_lib.load_error
info = maefast.backends()
assert info['_C'] is False and info['_C_error']
try:
    _cpp_lib.require_C()
except RuntimeError as e:
    assert 'not available' in str(e)
else:
    raise SystemExit('require_C should raise')
print('ok')
""")
    assert "ok" in out


def test_reference_does_not_import_triton():
    out = _run("""
import sys, maefast.reference
print('triton' in sys.modules)
""")
    assert out.strip() == "False"


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    """`python -c` with the repository root as the working directory: sys.path[0] is the root, as
    for `python -m pytest`, a REPL or a script there."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_repo_kernels_folder_does_not_shadow_hf_kernels():
    """transformers >= 5.2x imports Hugging Face's `kernels` package (5.17 does when it finds one); the
    root's `kernels/` folder must not stand in for it (it did: ImportError 'CUDAProperties' from
    kernels/__init__.py) nor break the import where none is installed."""
    r = _run_in_root("""
        import transformers
        from transformers import ViTMAEForPreTraining
        import maefast.kernels, sys
        assert maefast.kernels.__name__ == 'maefast.kernels'
        print('ok', getattr(sys.modules.get('kernels'), '__file__', None))  # None: absent, or a namespace face
    """)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
    assert os.path.join(ROOT, "kernels") not in r.stdout  # whatever `kernels` is, it is not ours


def test_import_kernels_from_the_root_is_never_ours():
    """`import kernels` in the root gives the installed package when there is one, and otherwise
    what Python gives for a folder without __init__.py (an empty namespace package); never
    maefast's Triton folder."""
    r = _run_in_root("""
        import os
        import kernels
        if getattr(kernels, '__file__', None) is None:
            assert list(kernels.__path__) == [] and not hasattr(kernels, '__version__'), vars(kernels)
            print('absent')
        else:
            assert not os.path.samefile(os.path.dirname(kernels.__file__), os.path.join(os.getcwd(), 'kernels'))
            print('installed', kernels.__file__)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(("absent", "installed")), r.stdout


def test_transformers_availability_check_without_hf_kernels_installed():
    """transformers 5.17 (the GPU machines') does not depend on `kernels`: its
    `_is_package_available("kernels")` finds the root's folder with find_spec, finds no
    distribution's version, imports it uncaught and reads __version__ / __file__. That import must
    succeed and look like a namespace folder (not an install), or `from transformers import
    ViTMAEForPreTraining` fails in the root. Run here with every site-packages hidden from the
    lookup, so the installed `kernels` (transformers 5.25 depends on it) is not found."""
    r = _run_in_root("""
        import importlib, importlib.util, sys
        sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]
        assert importlib.util.find_spec('kernels') is not None  # the root's folder
        m = importlib.import_module('kernels')
        exists = not (getattr(m, '__version__', 'N/A') == 'N/A' and getattr(m, '__file__', None) is None)
        print('exists' if exists else 'namespace')
        try:
            import kernels.attention
        except ModuleNotFoundError:
            print('no submodules')
        # as for a namespace folder: an empty __path__, so a submodule lookup answers None, not an error
        print(list(m.__path__), importlib.util.find_spec('kernels.layers'))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["namespace", "no", "submodules", "[]", "None"], r.stdout


def test_a_kernels_only_a_meta_path_finder_serves_is_handed_on(tmp_path):
    """An editable install serves its package through a finder on sys.meta_path, not a sys.path
    entry: `import kernels` in the root must reach it too (not the empty stand-in)."""
    pkg = tmp_path / "elsewhere" / "kernels"
    pkg.mkdir(parents=True)
    # a package that adds a sys.path entry of its own when imported: the entry stays, after the root's
    (pkg / "__init__.py").write_text("import sys\nsys.path.append('/added/by/kernels')\n"
                                     "__version__ = 'from-the-finder'\n")
    r = _run_in_root(f"""
        import importlib.machinery, sys
        sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]

        class Finder:  # as setuptools' editable finder: a fixed mapping, on meta_path
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name == 'kernels':
                    return importlib.machinery.PathFinder.find_spec(name, [{str(pkg.parent)!r}])
                return None

        sys.meta_path.append(Finder)
        before = list(sys.path)
        import kernels
        print(kernels.__version__, sys.path == before + ['/added/by/kernels'])
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["from-the-finder", "True"], r.stdout


def test_import_without_jpeg_extension():
    """Without maefast._jpeg (no libjpeg-turbo headers at install) the loader reads JPEGs whole with
    simplejpeg, and `maefast info` says why."""
    out = _run(BLOCK.replace('NAMES', repr(["maefast._jpeg"])) + """
import maefast
from maefast.train import jpeg
info = maefast.backends()
assert jpeg.reader() in ('simplejpeg', 'pillow'), jpeg.reader()
assert 'blocked' in info['jpeg_window_error'] and 'csrc/build.py --inplace --jpeg' in info['jpeg_window_error']
assert info['jpeg_reader'] == jpeg.describe()
print('ok')
""")
    assert "ok" in out


def test_lazy_public_names_import_on_first_use_and_nothing_else_is_there():
    """`maefast.nn`, `maefast.ops`, `maefast.patch` and `maefast.TrainStep` (the README's entry points) are
    reached from a bare `import maefast` without importing them first; a name maefast lacks raises
    AttributeError (so `hasattr` and `from maefast import x` tell the truth)."""
    out = _run("""
import sys, maefast
assert 'maefast.nn' not in sys.modules and 'maefast.step' not in sys.modules and 'maefast.patching' not in sys.modules
assert maefast.nn is sys.modules['maefast.nn'] and maefast.ops is sys.modules['maefast.ops']
from maefast.patching import patch
from maefast.step import TrainStep
assert maefast.patch is patch and maefast.TrainStep is TrainStep
assert not hasattr(maefast, 'no_such_name') and not hasattr(maefast, 'trainstep')
try:
    from maefast import no_such_name
except ImportError:
    pass
else:
    raise SystemExit('no_such_name imported')
assert all(getattr(maefast, name) is not None for name in maefast.__all__)
print('ok')
""")
    assert "ok" in out


def test_a_kernels_folder_beside_an_installed_maefast_is_not_taken(tmp_path):
    """maefast/_kernels_path.py maps the `kernels/` beside maefast to `maefast.kernels` only in a source
    checkout (setup.py beside it): in site-packages a top-level `kernels/` is someone else's package."""
    for checkout in (False, True):
        site = tmp_path / ("checkout" if checkout else "site")
        (site / "maefast").mkdir(parents=True)
        (site / "kernels").mkdir()
        with open(os.path.join(ROOT, "maefast", "_kernels_path.py")) as f:
            (site / "maefast" / "_kernels_path.py").write_text(f.read())
        (site / "maefast" / "__init__.py").write_text("from . import _kernels_path\n"
                                                      "_kernels_path.ensure_kernels_package()\n")
        (site / "kernels" / "__init__.py").write_text("OWNER = 'the folder beside maefast'\n")
        if checkout:
            (site / "setup.py").write_text("")
        r = subprocess.run([sys.executable, "-c", "import sys, maefast; m = sys.modules.get('maefast.kernels'); "
                            "print(getattr(m, 'OWNER', None), getattr(maefast, 'kernels', None) is m)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(site)})
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == (["the", "folder", "beside", "maefast", "True"] if checkout else ["None", "True"])
