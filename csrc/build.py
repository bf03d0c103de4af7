"""Builds maefast._C with nvcc + pybind11, no torch involved (so it cannot clash with torch's C++ ABI
and builds against the CPU torch here). Used by setup.py and runnable alone:

    python csrc/build.py --inplace        # writes maefast/_C<ext suffix>

Incremental through ninja when it is installed (one object per csrc/*.cu), else sequential nvcc.
Environment: MAEFAST_CUDA_ARCHS ("80;90" default, each gets sm_XX code, the last also PTX),
NVCC (path), MAEFAST_BUILD_JOBS.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def find_nvcc() -> str | None:
    cand = os.environ.get("NVCC")
    if cand:
        return cand if os.path.exists(cand) or shutil.which(cand) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def gencode_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("MAEFAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def compile_flags() -> list[str]:
    import pybind11

    inc = [HERE, pybind11.get_include(), sysconfig.get_paths()["include"]]
    # No global --use_fast_math: the loss/normalization kernels need IEEE division and sqrt.
    return (["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
             "-lineinfo"] + gencode_flags() + [f"-I{p}" for p in inc])


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(HERE, "*.cu")))


def output_name() -> str:
    return "_C" + sysconfig.get_config_var("EXT_SUFFIX")


def build(output: str, build_dir: str, verbose: bool = False) -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set NVCC or CUDA_HOME, or MAEFAST_SKIP_CUDA_BUILD=1 to skip)")
    os.makedirs(build_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    cflags = compile_flags()
    srcs = sources()
    objs = [os.path.join(build_dir, os.path.basename(s) + ".o") for s in srcs]
    link = [nvcc, "-shared", "-cudart", "static"] + gencode_flags()
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as _ninja  # the PyPI package ships the binary
            ninja = os.path.join(_ninja.BIN_DIR, "ninja")
        except Exception:
            ninja = None
    if ninja:
        q = shlex.quote
        lines = [
            f"nvcc = {q(nvcc)}",
            "cflags = " + " ".join(q(f) for f in cflags),
            "rule cu",
            "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = NVCC $in",
            "rule link",
            "  command = " + " ".join(q(f) for f in link) + " $in -o $out",
            "  description = LINK $out",
        ]
        for s, o in zip(srcs, objs):
            lines.append(f"build {q(o)}: cu {q(s)}")
        lines.append(f"build {q(os.path.abspath(output))}: link " + " ".join(q(o) for o in objs))
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        cmd = [ninja, "-C", build_dir]
        jobs = os.environ.get("MAEFAST_BUILD_JOBS")
        if jobs:
            cmd += ["-j", jobs]
        if verbose:
            cmd.append("-v")
        subprocess.run(cmd, check=True)
    else:
        for s, o in zip(srcs, objs):
            subprocess.run([nvcc] + cflags + ["-c", s, "-o", o], check=True)
        subprocess.run(link + objs + ["-o", output], check=True)
    return output


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inplace", action="store_true", help="write maefast/_C<suffix> in the source tree")
    ap.add_argument("--output", help="output path of the extension")
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build", "csrc"))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    out = args.output or os.path.join(ROOT, "maefast", output_name())
    build(out, args.build_dir, args.verbose)
    print(f"built {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
