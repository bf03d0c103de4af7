"""maefast._C: the torch-free CUDA extension (built where nvcc is; its functions work without a GPU)."""
import pytest

from maefast import _cpp_lib
from maefast.ops import choose_impl
from cli_run import run_cli

C = _cpp_lib.get_C()
needs_C = pytest.mark.skipif(C is None, reason=f"maefast._C not built: {_cpp_lib.load_error}")


@needs_C
def test_versions_and_device_count():
    assert C.cuda_version >= 11000
    assert C.device_count() >= 0
    assert C.driver_version() >= 0
    assert "device" in C.registered


@needs_C
def test_cuda_errors_become_python_exceptions_with_the_name():
    assert issubclass(C.CudaError, RuntimeError)
    with pytest.raises(C.CudaError, match="cudaErrorInvalidValue"):
        C.raise_for_status(1)
    assert C.error_name(2) == "cudaErrorMemoryAllocation"
    C.raise_for_status(0)
    with pytest.raises(ValueError, match="device must be in"):
        C.device_properties(10_000)


@needs_C
@pytest.mark.cuda
def test_device_properties_on_a_gpu():
    import torch

    p = C.device_properties(0)
    assert p["name"] == torch.cuda.get_device_name(0)
    assert p["multi_processor_count"] == torch.cuda.get_device_properties(0).multi_processor_count
    assert C.runtime_version() >= 11000


def test_cuda_kernels_refuse_cards_before_sm_80(monkeypatch):
    """A T4 (sm_75) has no kernel image in the build (sm_80, sm_90): impl='cuda' is a ValueError saying so,
    not a CudaError at the first launch."""
    import torch

    from maefast.ops import _backend

    monkeypatch.setattr(_backend, "get_C", lambda: type("C", (), {"attention_fwd": None})())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    ok, why = _backend.cuda_ext_usable(torch.device("cuda", 0), "attention_fwd")
    assert not ok and "compute capability 8.0 or newer; cuda:0 is 7.5" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert _backend.cuda_ext_usable(torch.device("cuda", 0), "attention_fwd") == (True, "")


def test_choose_impl_rules():
    import torch

    cpu = torch.device("cpu")
    assert choose_impl("auto", cpu) == "reference"
    assert choose_impl("reference", cpu) == "reference"
    with pytest.raises(ValueError, match="impl must be one of"):
        choose_impl("fast", cpu)
    with pytest.raises(ValueError, match="impl='cuda' is not available.*CUDA tensors"):
        choose_impl("cuda", cpu, what="test op")


def test_auto_takes_the_first_usable_backend_of_its_order_on_cuda(monkeypatch):
    """On a CUDA device `auto` takes the first backend of auto_order that can run, else the reference; an
    explicit one that cannot run raises with its reason (the backends' checks faked: no GPU here)."""
    import torch

    from maefast.ops import _backend

    dev = torch.device("cuda", 0)
    usable = {"triton": (True, ""), "cuda": (True, "")}
    monkeypatch.setattr(_backend, "triton_usable", lambda d: usable["triton"])
    monkeypatch.setattr(_backend, "cuda_ext_usable", lambda d, op=None: usable["cuda"])
    assert choose_impl("auto", dev) == "triton"
    assert choose_impl("auto", dev, auto_order=("cuda", "triton")) == "cuda"
    assert choose_impl("auto", dev, auto_order=("triton",)) == "triton"
    usable["triton"] = (False, "no Triton here")
    assert choose_impl("auto", dev) == "cuda"
    assert choose_impl("auto", dev, auto_order=("triton",)) == "reference"
    with pytest.raises(ValueError, match="impl='triton' is not available for op x: no Triton here"):
        choose_impl("triton", dev, what="op x")
    usable["cuda"] = (False, "no extension here")
    assert choose_impl("auto", dev) == "reference"
    with pytest.raises(ValueError, match="impl='cuda' is not available for op x: no extension here"):
        choose_impl("cuda", dev, what="op x")


def test_cuda_ext_without_the_ops_binding_is_not_usable(monkeypatch):
    import torch

    from maefast.ops import _backend

    monkeypatch.setattr(_backend, "get_C", lambda: type("C", (), {"attention_fwd": None})())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    dev = torch.device("cuda", 0)
    assert _backend.cuda_ext_usable(dev, "attention_fwd") == (True, "")
    ok, why = _backend.cuda_ext_usable(dev, "norm_pix_loss_fwd")
    assert not ok and "maefast._C has no 'norm_pix_loss_fwd'" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    ok, why = _backend.cuda_ext_usable(dev, "attention_fwd")
    assert not ok and "compute capability 8.0 or newer" in why


def test_meta_tensors_keep_an_explicit_impl():
    """On the meta device (tracing) only the fake implementations run: an explicit backend is kept, `auto`
    is the reference."""
    import torch

    meta = torch.device("meta")
    assert [choose_impl(i, meta) for i in ("auto", "triton", "cuda", "reference")] == \
        ["reference", "triton", "cuda", "reference"]


# -- what `maefast info` / maefast.backends() tell a user -------------------------------------------

KEYS_CI_PRINTS = {"torch", "torch_cuda", "triton", "triton_error", "_C", "_C_error", "_C_ops", "eager_dispatch"}


def test_info_json_keeps_its_keys_and_adds_what_can_run():
    import json

    r = run_cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert KEYS_CI_PRINTS <= set(info)
    assert set(info["can_run"]) == {"reference", "triton", "cuda"} and info["can_run"]["reference"] is True
    assert set(info["why_not"]) == {k for k, ok in info["can_run"].items() if not ok}
    assert info["auto"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="what a machine without a GPU is told")
def test_info_without_a_gpu_says_nothing_fast_runs_here():
    # an installed triton or a built _C does not run without a GPU: `maefast info` must not suggest it does
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    rows = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("  ") and len(ln.split()) > 1}
    assert rows["reference"] == "yes" and rows["triton"] == "no" and rows["cuda"] == "no", r.stdout
    assert "need a CUDA GPU" in r.stdout and 'impl="auto" here: reference' in r.stdout
    assert "GPU     none" in r.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="what a machine without a GPU is told")
def test_backends_with_a_built_extension_but_no_gpu(monkeypatch):
    import types

    import maefast

    fake = types.SimpleNamespace(registered=["device", "attention"], device_count=lambda: 0)
    monkeypatch.setattr(_cpp_lib, "_C", fake)
    monkeypatch.setattr(_cpp_lib, "load_error", None)
    info = maefast.backends()
    assert info["_C"] is True and info["_C_ops"] == ["device", "attention"]  # built: CI prints this
    assert info["can_run"]["cuda"] is False and "is built, but its kernels need a CUDA GPU" in info["why_not"]["cuda"]
    assert info["can_run"]["triton"] is False
    from maefast.cli import format_info

    text = format_info(info)
    assert "is built, but its kernels need a CUDA GPU" in text


# -- csrc/build.py: what `pip install -e .` with nvcc present says and how it parallelises ---------

FAKE_NVCC = """#!/bin/sh
# stands in for nvcc: logs its arguments, writes the -o output and the -MF depfile
echo "$@" >> "$(dirname "$0")/calls.log"
case "$1" in --version) echo "Cuda compilation tools, release 99.9, V99.9.1"; exit 0;; esac
out=""; dep=""; prev=""
for a in "$@"; do
  [ "$prev" = "-o" ] && out="$a"
  [ "$prev" = "-MF" ] && dep="$a"
  prev="$a"
done
[ -n "$dep" ] && echo "$out: " > "$dep"
: > "$out"
"""


def _csrc_build():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "build.py")
    spec = importlib.util.spec_from_file_location("maefast_csrc_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_parallelism_splits_cpus_between_files_and_targets(monkeypatch):
    b = _csrc_build()
    assert b.parallelism(7, 3, jobs=2) == (2, 1)
    assert b.parallelism(7, 3, jobs=16) == (16, 2)  # 7 files at once, 2 of each file's 3 targets at once
    assert b.parallelism(7, 3, jobs=64) == (64, 3)
    assert b.parallelism(7, 1, jobs=64) == (64, 1)  # one target: --threads would do nothing
    monkeypatch.setenv("MAEFAST_BUILD_JOBS", "4")
    assert b.parallelism(7, 3) == (4, 1)
    assert "--threads" not in b.compile_flags(1) and b.compile_flags(3)[b.compile_flags(3).index("--threads") + 1] == "3"
    assert b.ninja_command("ninja", "/b", 6)[-2:] == ["-j", "6"]


def test_build_announces_itself_and_builds_in_parallel(tmp_path, monkeypatch, capfd):
    """The whole driver with a stand-in nvcc (no CUDA compile): it says what it builds, why and how to
    skip it, reports progress, and hands ninja -j and nvcc --threads."""
    import os
    import shutil
    import stat

    b = _csrc_build()
    if shutil.which("ninja") is None:
        pytest.importorskip("ninja")
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("NVCC", str(nvcc))
    monkeypatch.setenv("MAEFAST_BUILD_JOBS", "16")
    out = tmp_path / "out" / "_C.so"
    b.build(str(out), str(tmp_path / "build"))
    assert out.exists()
    err = capfd.readouterr().err
    assert f"building the CUDA C++ extension maefast._C with nvcc ({nvcc}, CUDA 99.9)" in err
    assert "why: nvcc is on this machine" in err and "needs no GPU" in err
    assert "MAEFAST_SKIP_CUDA_BUILD=1" in err and "16 parallel job(s) x 2 nvcc thread(s)" in err
    assert "sm_80, sm_90 + PTX (90)" in err
    n = len(b.sources())
    assert f"[{n + 1}/{n + 1}] LINK _C.so" in err and "NVCC attention.cu" in err
    assert "maefast: built maefast._C in " in err
    calls = (tmp_path / "bin" / "calls.log").read_text().splitlines()
    compiles = [c for c in calls if " -c " in f" {c} "]
    assert len(compiles) == n and all("--threads 2" in c for c in compiles)
    ninja_file = (tmp_path / "build" / "build.ninja").read_text()
    assert "--threads 2" in ninja_file
    assert os.path.basename(str(out)) in ninja_file


def test_an_nvcc_that_does_not_exist_is_an_error_not_a_skipped_build(tmp_path, monkeypatch):
    """NVCC names the compiler to build with: a wrong path stops the build saying so (it silently built
    no extension, even with nvcc on PATH)."""
    b = _csrc_build()
    monkeypatch.setenv("NVCC", str(tmp_path / "no" / "nvcc"))
    with pytest.raises(RuntimeError, match=r"NVCC=.*/no/nvcc' is not an executable .*MAEFAST_SKIP_CUDA_BUILD=1"):
        b.find_nvcc()
    (tmp_path / "nvcc").write_text("not executable")
    monkeypatch.setenv("NVCC", str(tmp_path / "nvcc"))
    with pytest.raises(RuntimeError, match="is not an executable"):
        b.find_nvcc()
    monkeypatch.setenv("NVCC", "sh")  # a name on PATH
    assert b.find_nvcc().endswith("/sh")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NVCC", "bin/nvcc")  # relative: absolute for ninja, which runs in the build folder
    assert b.find_nvcc() == str(tmp_path / "bin" / "nvcc")


# -- csrc/build.py --jpeg: the data loader's windowed JPEG reader (plain C, the host compiler) -------

def test_jpeg_reader_builds_or_says_why_not(tmp_path, monkeypatch):
    """It builds with the host compiler where libjpeg-turbo's headers are (CI's machine has them), and
    a failed build says why and leaves nothing behind (setup.py then installs without it)."""
    import glob
    import os
    import subprocess
    import sys
    import sysconfig

    b = _csrc_build()
    out = tmp_path / ("_jpeg" + sysconfig.get_config_var("EXT_SUFFIX"))
    if b.jpeg_headers_found():
        b.build_jpeg(str(out))
        r = subprocess.run([sys.executable, "-c", "import _jpeg; print(_jpeg.LIBJPEG_TURBO_VERSION_NUMBER)"],
                           cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0 and int(r.stdout) >= 1005000, r.stderr  # jpeg_skip/crop_scanline: >= 1.5
        out.unlink()
    monkeypatch.setenv("CC", str(tmp_path / "no-cc"))
    assert not b.jpeg_headers_found()
    with pytest.raises(RuntimeError, match="no C compiler"):
        b.build_jpeg(str(out))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(RuntimeError, match="could not build it against libjpeg-turbo"):
        b.build_jpeg(str(out))
    assert not os.listdir(tmp_path) and not glob.glob(str(out) + "*")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "csrc", "build.py"), "--jpeg", "--output", str(out)],
                       capture_output=True, text=True, env=dict(os.environ, CC="false"))
    assert r.returncode == 1 and r.stderr.startswith("maefast._jpeg not built: ") and not out.exists()


def test_sdist_carries_the_build_script_the_sources_and_the_test_helpers(tmp_path):
    """An sdist (pip install maefast-*.tar.gz) builds from csrc/ (setup.py imports csrc/build.py) and its
    tests run: without MANIFEST.in it had none of csrc/ but jpeg_region.c (the .cu sources are named by
    absolute path) and no tests/conftest.py, and `pip install` of it failed at `import build`."""
    import os
    import subprocess
    import sys

    pytest.importorskip("setuptools")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=root,
                       capture_output=True, text=True, env=dict(os.environ, MAEFAST_SKIP_CUDA_BUILD="1"))
    assert r.returncode == 0, r.stderr
    files = set((tmp_path / "maefast.egg-info" / "SOURCES.txt").read_text().split())
    csrc = {f"csrc/{n}" for n in os.listdir(os.path.join(root, "csrc"))
            if n.endswith((".py", ".cu", ".cuh", ".h", ".c"))}
    assert "csrc/build.py" in csrc and csrc <= files, sorted(csrc - files)
    assert {"tests/conftest.py", "tests/poison_alloc.py", "tests/triton_memcheck.py", "scripts/gpu_check.sh",
            "kernels/__init__.py"} <= files
    assert not [f for f in files if f.endswith((".so", ".pyc", ".o"))]


@pytest.mark.parametrize("devices", [2, 0, "raises", "not built"])
def test_backends_on_a_gpu_machine(monkeypatch, devices):
    """Where torch sees a GPU: triton runs; the built _C runs only when it sees a device itself (0 devices,
    or an error asking, is "cannot run" with the reason, never a crash); an unbuilt _C is told so without
    the no-GPU remark; impl="auto" names the fast backends that run."""
    import types

    import torch

    import maefast
    from maefast import _triton

    def device_count():
        if devices == "raises":
            raise RuntimeError("cudaErrorInsufficientDriver")
        return devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake H100")
    built = devices != "not built"
    monkeypatch.setattr(_cpp_lib, "_C", types.SimpleNamespace(registered=["device"], device_count=device_count)
                        if built else None)
    monkeypatch.setattr(_cpp_lib, "load_error", None if built else "ImportError: no maefast._C")
    info = maefast.backends()
    cuda_runs = devices == 2
    assert info["torch_cuda"] is True and info["gpu"] == "Fake H100" and info["_C"] is built
    assert info["can_run"] == {"reference": True, "triton": _triton.HAS_TRITON, "cuda": cuda_runs}
    assert set(info["why_not"]) == {k for k, ok in info["can_run"].items() if not ok}
    if built and not cuda_runs:
        assert info["why_not"]["cuda"] == "maefast._C is built, but its kernels need a CUDA GPU"
    if not built:
        assert info["why_not"]["cuda"] == "maefast._C is not built or does not load (ImportError: no maefast._C)"
    fast = [k for k in ("triton", "cuda") if info["can_run"][k]]
    assert info["auto"].startswith("on CUDA tensors") and f"({' or '.join(fast)})" in info["auto"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="what a machine without a GPU is told")
def test_backends_without_a_gpu_say_so_for_an_unbuilt_extension_and_the_interpreter(monkeypatch):
    """No GPU and no _C: both reasons are given; "triton_interpreter" follows TRITON_INTERPRET."""
    import maefast

    monkeypatch.setattr(_cpp_lib, "_C", None)
    monkeypatch.setattr(_cpp_lib, "load_error", "ImportError: no maefast._C")
    for env, said in (("1", True), ("0", False), (None, False)):
        if env is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", env)
        info = maefast.backends()
        assert info["triton_interpreter"] is said
        assert info["why_not"]["cuda"] == ("maefast._C is not built or does not load (ImportError: no maefast._C); "
                                           "its kernels would also need a CUDA GPU")


def test_triton_usable_on_any_cuda_device_and_on_cpu_only_under_the_interpreter(monkeypatch):
    """Triton runs on every CUDA device (cuda:1 of an 8-GPU rank too) and on CPU tensors only with
    TRITON_INTERPRET=1 exactly; an importable triton has no error to report."""
    pytest.importorskip("triton")
    import torch

    from maefast import _triton

    assert _triton.HAS_TRITON is True and _triton.triton_error is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a GPU machine's setting
    for dev in ("cuda", "cuda:0", "cuda:1"):
        assert _triton.triton_usable(torch.device(dev)) == (True, "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _triton.triton_usable(torch.device("cpu")) == (True, "")
    for env in ("0", "", None):
        if env is None:
            monkeypatch.delenv("TRITON_INTERPRET")
        else:
            monkeypatch.setenv("TRITON_INTERPRET", env)
        ok, why = _triton.triton_usable(torch.device("cpu"))
        assert not ok and "TRITON_INTERPRET=1" in why and why.endswith("got cpu"), why


def test_backends_reads_the_eager_dispatch_setting_without_importing_the_ops(monkeypatch):
    """`maefast info` says how eager calls reach the ops as maefast/ops/_dispatch.py will decide it: unset or
    empty is "direct" (the default), a typo is said to be invalid (every op call raises)."""
    import maefast

    for env, said in ((None, "direct"), ("", "direct"), ("direct", "direct"), ("custom_op", "custom_op")):
        if env is None:
            monkeypatch.delenv("MAEFAST_EAGER_DISPATCH", raising=False)
        else:
            monkeypatch.setenv("MAEFAST_EAGER_DISPATCH", env)
        assert maefast.backends()["eager_dispatch"] == said, env
    monkeypatch.setenv("MAEFAST_EAGER_DISPATCH", "fast")
    assert maefast.backends()["eager_dispatch"].startswith("invalid 'fast'")
