"""Builds maefast._C with nvcc + pybind11, no torch involved (so it cannot clash with torch's C++ ABI
and builds against the CPU torch here). Used by setup.py and runnable alone:

    python csrc/build.py --inplace        # writes maefast/_C<ext suffix>
    python csrc/build.py --inplace --jpeg # writes maefast/_jpeg<ext suffix> (build_jpeg)

Incremental through ninja when it is installed (one object per csrc/*.cu), else a pool of nvcc
processes. Parallel twice over: ninja compiles files side by side, and nvcc --threads compiles one
file's gencode targets (sm_80, sm_90, PTX) side by side, so that the CPUs are used (`parallelism`).
The build says what it builds, why and how to skip it, and its progress, on stderr and on the
terminal (`say`): pip captures a build's output and shows it only with -v or on failure.
Environment: MAEFAST_CUDA_ARCHS ("80;90" default, each gets sm_XX code, the last also PTX),
NVCC (path), MAEFAST_BUILD_JOBS (default: the CPUs this process may use).
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def find_nvcc() -> str | None:
    """NVCC's compiler (an error when it names none: the build was asked for that one), else nvcc on
    PATH, else CUDA_HOME's, CUDA_PATH's or /usr/local/cuda's; None: not found."""
    cand = os.environ.get("NVCC")
    if cand:
        found = os.path.abspath(cand) if os.path.isfile(cand) and os.access(cand, os.X_OK) else shutil.which(cand)
        if not found:
            raise RuntimeError(f"NVCC={cand!r} is not an executable (unset NVCC to look for nvcc on PATH and in "
                               "CUDA_HOME, or MAEFAST_SKIP_CUDA_BUILD=1 to build without maefast._C)")
        return found
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def cuda_archs() -> list[str]:
    return [a.strip() for a in os.environ.get("MAEFAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]


def gencode_flags() -> list[str]:
    archs = cuda_archs()
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def compile_flags(threads: int = 1) -> list[str]:
    """nvcc's flags for one .cu file; `threads` > 1 compiles its gencode targets in parallel (nvcc --threads)."""
    import pybind11

    inc = [HERE, pybind11.get_include(), sysconfig.get_paths()["include"]]
    # No global --use_fast_math: the loss/normalization kernels need IEEE division and sqrt.
    return (["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
             "-lineinfo"] + (["--threads", str(threads)] if threads > 1 else []) + gencode_flags()
            + [f"-I{p}" for p in inc])


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parallelism(n_sources: int, n_targets: int, jobs: int | None = None) -> tuple[int, int]:
    """(parallel jobs, nvcc --threads per job) for `jobs` CPUs (default: MAEFAST_BUILD_JOBS, else the
    available CPUs): files side by side first, then each file's gencode targets with what is left
    (16 CPUs, 7 files, 3 targets: 7 jobs x 2 threads; 2 CPUs: 2 jobs x 1)."""
    if jobs is None:
        env = os.environ.get("MAEFAST_BUILD_JOBS", "").strip()
        jobs = int(env) if env.isdigit() and int(env) > 0 else available_cpus()
    jobs = max(1, jobs)
    at_once = min(jobs, max(1, n_sources))
    return jobs, max(1, min(n_targets, jobs // at_once))


_tty_lines = 0  # lines `say` wrote to the terminal


def say(msg: str) -> None:
    """A build message where the user sees it: stderr, and the terminal itself when stderr is not one
    (pip runs the build with its output captured and shows it only with -v or when the build fails)."""
    global _tty_lines
    print(msg, file=sys.stderr, flush=True)
    try:
        if sys.stderr.isatty():
            return
        with open("/dev/tty", "w") as tty:  # no controlling terminal (CI, a daemon): OSError, stderr only
            # pip's spinner draws at the cursor: the first line leaves pip's "Building ... -" line, the
            # others start by returning over the spinner's character
            tty.write(("\n" if _tty_lines == 0 else "\r") + msg + "\n")
        _tty_lines += 1
    except OSError:
        pass


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown version"
    for part in out.replace(",", "\n").splitlines():
        if part.strip().startswith("release "):
            return "CUDA " + part.strip().removeprefix("release ")
    return "unknown version"


def announce(nvcc: str, n_sources: int, jobs: int, threads: int) -> None:
    """Says what is built, why, how long it takes and how to skip it."""
    archs = cuda_archs()
    targets = ", ".join(f"sm_{a}" for a in archs) + f" + PTX ({archs[-1]})"
    say(f"maefast: building the CUDA C++ extension maefast._C with nvcc ({nvcc}, {nvcc_version(nvcc)})")
    say("maefast:   why: nvcc is on this machine, so the install compiles maefast's CUDA C++ kernels (impl='cuda'); "
        "building needs no GPU, running them does")
    say(f"maefast:   what: {n_sources} files for {targets}; {jobs} parallel job(s) x {threads} nvcc thread(s) "
        f"(MAEFAST_BUILD_JOBS); a few minutes on a small machine")
    say("maefast:   skip it: MAEFAST_SKIP_CUDA_BUILD=1 pip install ...  (the Triton and PyTorch-reference paths "
        "need no build; MAEFAST_CUDA_ARCHS=90 builds for one GPU generation, faster)")


def ninja_command(ninja: str, build_dir: str, jobs: int, verbose: bool = False) -> list[str]:
    return [ninja, "-C", build_dir, "-j", str(jobs)] + (["-v"] if verbose else [])


def _run_streaming(cmd: list[str]) -> None:
    """Runs `cmd`; its progress lines ("[3/8] NVCC attention.cu") go through `say`, the rest to stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("["):
            say(f"maefast:   {line}")
        else:
            print(line, file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(HERE, "*.cu")))


def output_name() -> str:
    return "_C" + sysconfig.get_config_var("EXT_SUFFIX")


def build(output: str, build_dir: str, verbose: bool = False) -> str:
    """Compiles csrc/*.cu into the extension at `output` (objects in `build_dir`); announces itself."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set NVCC or CUDA_HOME, or MAEFAST_SKIP_CUDA_BUILD=1 to skip)")
    os.makedirs(build_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    srcs = sources()
    jobs, threads = parallelism(len(srcs), len(cuda_archs()) + 1)
    cflags = compile_flags(threads)
    objs = [os.path.join(build_dir, os.path.basename(s) + ".o") for s in srcs]
    link = [nvcc, "-shared", "-cudart", "static"] + gencode_flags()
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as _ninja  # the PyPI package ships the binary
            ninja = os.path.join(_ninja.BIN_DIR, "ninja")
        except Exception:
            ninja = None
    announce(nvcc, len(srcs), jobs, threads)
    t0 = time.perf_counter()
    if ninja:
        q = shlex.quote
        lines = [
            f"nvcc = {q(nvcc)}",
            "cflags = " + " ".join(q(f) for f in cflags),
            "rule cu",
            "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = NVCC $name",
            "rule link",
            "  command = " + " ".join(q(f) for f in link) + " $in -o $out",
            "  description = LINK $name",
        ]
        for s, o in zip(srcs, objs):
            lines += [f"build {q(o)}: cu {q(s)}", f"  name = {os.path.basename(s)}"]
        lines += [f"build {q(os.path.abspath(output))}: link " + " ".join(q(o) for o in objs),
                  f"  name = {os.path.basename(output)}"]
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        _run_streaming(ninja_command(ninja, build_dir, jobs, verbose))
    else:
        def compile_one(so):
            say(f"maefast:   NVCC {os.path.basename(so[0])}")
            subprocess.run([nvcc] + cflags + ["-c", so[0], "-o", so[1]], check=True)

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(compile_one, zip(srcs, objs)))  # list(): re-raises a failed compile
        subprocess.run(link + objs + ["-o", output], check=True)
    secs = time.perf_counter() - t0
    say(f"maefast: built maefast._C in {int(secs // 60)}m{secs % 60:04.1f}s")
    return output


def jpeg_output_name() -> str:
    return "_jpeg" + sysconfig.get_config_var("EXT_SUFFIX")


def c_compiler() -> list[str]:
    """The host C compiler build_jpeg uses: CC, else the one Python was built with, else cc."""
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def jpeg_headers_found() -> bool:
    """Whether `c_compiler` finds libjpeg's header (jpeglib.h): build_jpeg can then build."""
    cc = c_compiler()
    if not cc or shutil.which(cc[0]) is None:
        return False
    return subprocess.run(cc + ["-E", "-x", "c", "-"], input="#include <stdio.h>\n#include <jpeglib.h>\n",
                          capture_output=True, text=True).returncode == 0


def build_jpeg(output: str) -> str:
    """Compiles csrc/jpeg_region.c (the data loader's windowed JPEG reader, plain C on the Python C API)
    into the extension at `output` with the host C compiler (CC, else Python's, else cc), linked to the
    system's libjpeg-turbo (its headers: Debian's libjpeg62-turbo-dev; the loader uses it from 2.1). Raises
    RuntimeError saying why it could not (no compiler, no headers, an older libjpeg): the loader then
    reads JPEGs with simplejpeg or Pillow, the same pixels, slower."""
    cc = c_compiler()
    if not cc or shutil.which(cc[0]) is None:
        raise RuntimeError(f"no C compiler ({' '.join(cc) or 'CC'} not found)")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp{os.getpid()}"  # a failed build leaves no half-written extension behind
    link = ["-shared", "-undefined", "dynamic_lookup"] if sys.platform == "darwin" else ["-shared"]
    cmd = cc + ["-O2", "-std=c99", "-fPIC", *link, "-I" + sysconfig.get_paths()["include"],
                os.path.join(HERE, "jpeg_region.c"), "-o", tmp, "-ljpeg"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        lines = [ln for ln in proc.stdout.splitlines() if "error" in ln] or proc.stdout.splitlines() or ["?"]
        raise RuntimeError(f"{' '.join(cmd[:1])} could not build it against libjpeg-turbo: {lines[0].strip()}")
    os.replace(tmp, output)
    say(f"maefast: built maefast._jpeg (windowed JPEG reader) in {time.perf_counter() - t0:.1f}s")
    return output


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inplace", action="store_true", help="write maefast/_C<suffix> in the source tree")
    ap.add_argument("--jpeg", action="store_true", help="build maefast._jpeg (build_jpeg), not maefast._C")
    ap.add_argument("--output", help="output path of the extension")
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build", "csrc"))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    out = args.output or os.path.join(ROOT, "maefast", jpeg_output_name() if args.jpeg else output_name())
    if args.jpeg:
        try:
            build_jpeg(out)
        except RuntimeError as exc:
            print(f"maefast._jpeg not built: {exc}", file=sys.stderr)
            return 1
    else:
        build(out, args.build_dir, args.verbose)
    print(f"built {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
