"""maefast's CUDA C++ kernels (csrc/*.cu) on the CPU: the same sources, built with the host compiler
against include/cuda_emu.h (a CPU emulation of the CUDA runtime subset they use: blocks one at a time,
a block's threads as fibers switching at barriers, warp shuffles and WMMA on whole tiles), so the
``impl="cuda"`` paths run in the test suite on machines without a GPU, as the Triton kernels run
under the interpreter.

``module()`` builds (once per set of sources, cached under $MAEFAST_CACHE or ~/.cache/maefast) and
loads the extension: the same bindings as ``maefast._C``, plus ``emulated = True``. ``installed()``
puts it in place of ``maefast._C`` for maefast's ops, which then take ``impl="cuda"`` on CPU tensors.

What it checks and what it cannot: the kernels' arithmetic, indexing, synchronisation structure
(a barrier some threads miss is a deadlock, a shuffle naming an exited lane an error), launch limits
and WMMA alignment, against the reference on fresh inputs; with CUDA_EMU_ASAN=1 (AddressSanitizer,
tests/test_cuda_emu.py's opt-in run) reads and writes past a tensor's memory. Not the GPU's timing,
memory model (threads only switch at barriers, so a race between two barriers goes unseen unless
CUDA_EMU_ORDER=reverse changes the result; shared memory starts as 0xff bytes, NaN, which fmaxf skips:
CUDA_EMU_POISON=0x7f makes it 3.4e38), or the GPU's own rounding of expf/logf (the host's libm here;
the tolerances cover both).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
INCLUDE = os.path.join(HERE, "include")
CXX = os.environ.get("CXX", "g++")
# -fsanitize=alignment, trapping: a misaligned load or store through a wider type (a uint4 of 16 bytes, a
# word), which x86 performs and a GPU refuses (cudaErrorMisalignedAddress), stops the process with SIGILL
# -Dmaefast=maefast_emu: its own C++ types (maefast::CudaError above all): pybind11's exception translators are
# global, and one catching the other module's type (equal by name across shared objects) turned maefast._C's
# errors into the emulation's CudaError class in a process that had loaded both
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-w", "-fsanitize=alignment",
         "-fsanitize-undefined-trap-on-error", "-Dmaefast=maefast_emu"]
# CUDA_EMU_ASAN=1: the kernels built with AddressSanitizer, so a read or write past a tensor's memory stops the
# process with a report (what compute-sanitizer's memcheck says on a card). Its runtime must be loaded first:
# run python as `LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python ...`
# (tests/test_cuda_emu.py runs the emulated kernel tests so).
ASAN = os.environ.get("CUDA_EMU_ASAN") == "1"
if ASAN:
    FLAGS += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]

# `kernel<<<grid, block[, smem[, stream]]>>>(args)` -> a call of the emulation's launcher
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>", re.S)
# `extern __shared__ [__align__(n)] T name[];` -> a pointer into the block's dynamic shared memory
_DYN_SMEM = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s:]*?)\s+(\w+)\s*\[\s*\]\s*;")
# `__shared__ [__align__(n)] T name[dims];` (or a scalar) -> a function static, filled with 0xff bytes as each
# block starts (by the first thread reaching it), as dynamic shared memory is: not zeros, not the last block's
_STATIC_SMEM = re.compile(
    r"(?<![\w])__shared__\s+((?:__align__\(\s*\d+\s*\)\s+)?[A-Za-z_][\w\s:]*?)\s+(\w+)\s*((?:\[[^\]\[;]+\])*)\s*;")

_error: str | None = None
_module = None


def rewrite(source: str) -> str:
    """The .cu text as C++ the host compiler takes (only the launch and shared memory syntax changes:
    static shared memory is poisoned per block, as dynamic; the kernels are compiled as written)."""
    out = _DYN_SMEM.sub(lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(::cuda_emu::dynamic_smem());", source)
    out = _LAUNCH.sub(lambda m: f"::cuda_emu::launch(::cuda_emu::Cfg({m[2]}), {m[1]})", out)
    if "<<<" in out or "extern __shared__" in out:
        raise RuntimeError("tests/cuda_emu: a launch or dynamic shared memory form it cannot rewrite")
    return _STATIC_SMEM.sub(
        lambda m: f"static {m[1]} {m[2]}{m[3]}; ::cuda_emu::poison_static(&{m[2]}, sizeof({m[2]}));", out)


def _sources() -> list[str]:
    """csrc's .cu files, emulated.cu (the `emulated` mark and the launch count) and selftest.cu (kernels
    pinning the emulation's semantics, tests/test_cuda_emu.py)."""
    own = sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".cu"))
    return own + [os.path.join(HERE, "emulated.cu"), os.path.join(HERE, "selftest.cu")]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _shared_key() -> str:
    """What every object depends on: the headers, the emulation, this builder, the compiler (and its
    version), pybind11's version and the flags."""
    import pybind11

    files = sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith((".h", ".cuh")))
    files += [os.path.join(INCLUDE, f) for f in sorted(os.listdir(INCLUDE))] + [os.path.abspath(__file__)]
    cxx = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    meta = " ".join([CXX, cxx, pybind11.__version__] + FLAGS +
                    [sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""]).encode()
    return _digest(meta, *(f.encode() + b"\0" + _read(f) for f in files))


def _cache_dir() -> str:
    base = os.environ.get("MAEFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "maefast")
    return os.path.join(base, "cuda_emu")


def build() -> str:
    """The path of the built extension, built now if this set of sources has none yet: each object is
    cached by its source (with the headers), so an edit of one .cu file recompiles that file only."""
    import pybind11

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    shared = _shared_key()
    keys = {src: _digest(shared.encode(), src.encode(), _read(src)) for src in _sources()}
    cache = _cache_dir()
    out_dir = os.path.join(cache, _digest(*(k.encode() for k in keys.values())))
    target = os.path.join(out_dir, "_C" + suffix)
    if os.path.exists(target):
        return target
    os.makedirs(os.path.join(cache, "obj"), exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers: one builds, the others wait for it
        if os.path.exists(target):
            return target
        work = tempfile.mkdtemp(prefix="build-", dir=cache)
        try:
            incs = [INCLUDE, CSRC, pybind11.get_include(), sysconfig.get_paths()["include"]]
            inc_flags = [f"-I{i}" for i in incs]

            def compile_one(src: str) -> str:
                obj = os.path.join(cache, "obj", f"{os.path.basename(src)[:-3]}-{keys[src]}.o")
                if os.path.exists(obj):
                    return obj
                cpp = os.path.join(work, os.path.basename(src)[:-3] + ".cpp")
                with open(src) as fh, open(cpp, "w") as oh:
                    oh.write(f'#line 1 "{src}"\n' + rewrite(fh.read()))
                r = subprocess.run([CXX, *FLAGS, *inc_flags, "-c", cpp, "-o", cpp + ".o"], capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"{CXX} failed on {os.path.basename(src)}:\n{r.stderr[-4000:]}")
                os.replace(cpp + ".o", obj)
                return obj

            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
                objs = list(ex.map(compile_one, _sources()))
            tmp = os.path.join(work, "_C" + suffix)
            r = subprocess.run([CXX, "-shared", *(["-fsanitize=address"] if ASAN else []), *objs, "-o", tmp],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{CXX} failed to link:\n{r.stderr[-4000:]}")
            os.makedirs(out_dir, exist_ok=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def module():
    """The emulated extension, or None when it cannot be built here (`error()` says why)."""
    global _module, _error
    if _module is None and _error is None:
        if shutil.which(CXX) is None:
            _error = f"no host C++ compiler ({CXX}) to build the CUDA emulation"
            return None
        try:
            path = build()
            spec = importlib.util.spec_from_file_location("_C", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            _module = mod
        except Exception as e:  # a build failure is reported by the tests that need it
            _error = f"{type(e).__name__}: {e}"
    return _module


def error() -> str | None:
    return _error


@contextlib.contextmanager
def installed():
    """maefast's ops see the emulated extension as maefast._C while the block runs."""
    from maefast import _cpp_lib

    mod = module()
    if mod is None:
        raise RuntimeError(f"the CUDA emulation is not available: {_error}")
    saved = _cpp_lib._C, _cpp_lib.load_error
    _cpp_lib._C, _cpp_lib.load_error = mod, None
    try:
        yield mod
    finally:
        _cpp_lib._C, _cpp_lib.load_error = saved
