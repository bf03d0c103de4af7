"""maefast: Masked Autoencoder pre-training kernels (Triton + CUDA C++) and models.

`pip install -e .` works on a CPU-only machine. The CUDA C++ extension `maefast._C` is built with
nvcc + pybind11 (torch-free, see csrc/build.py) whenever nvcc is found, GPU or not (CI checks that it
compiles); the build says so on the terminal, with its progress, although pip hides a build's output
(csrc/build.py `say`). MAEFAST_SKIP_CUDA_BUILD=1 skips it. `maefast._jpeg`, the data loader's windowed
JPEG reader (plain C, csrc/jpeg_region.c), is built with the host C compiler against the system's
libjpeg-turbo where its headers are (Debian/Ubuntu: libjpeg-dev); an optional extension: without it the
install goes on and the loader reads JPEGs with simplejpeg (the same pixels, slower). The top-level
`kernels/` folder ships as `maefast.kernels`.
"""
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build as csrc_build  # noqa: E402  (csrc/build.py)


class NvccBuildExt(build_ext):
    """Builds maefast._C (nvcc) and maefast._jpeg (the host compiler) with csrc/build.py."""

    def build_extension(self, ext):
        out = self.get_ext_fullpath(ext.name)
        if ext.name == "maefast._jpeg":
            try:
                csrc_build.build_jpeg(out)
            except RuntimeError as exc:  # optional: setuptools warns and goes on
                csrc_build.say(f"maefast: maefast._jpeg not built ({exc}); the loader reads JPEGs with simplejpeg")
                raise CompileError(str(exc)) from None
            return
        # an editable install compiles in the checkout's build/csrc, as `csrc/build.py --inplace` does, so ninja
        # recompiles only what changed (setuptools gives every editable build a fresh temporary folder)
        temp = os.path.join(ROOT, "build") if getattr(self, "editable_mode", False) else os.path.abspath(self.build_temp)
        csrc_build.build(out, os.path.join(temp, "csrc"))


def ext_modules():
    # setup.py runs once per build hook: these notes go to the (captured) log, not the terminal
    jpeg = [Extension("maefast._jpeg", sources=[os.path.join("csrc", "jpeg_region.c")], optional=True)]
    if os.environ.get("MAEFAST_SKIP_CUDA_BUILD", "0") == "1":
        print("maefast: MAEFAST_SKIP_CUDA_BUILD=1, not building maefast._C", file=sys.stderr)
        return jpeg
    try:
        nvcc = csrc_build.find_nvcc()
    except RuntimeError as exc:  # NVCC names no compiler
        sys.exit(f"maefast: {exc}")
    if nvcc is None:
        print("maefast: nvcc not found, not building maefast._C (the Triton and reference paths still work)",
              file=sys.stderr)
        return jpeg
    return [Extension("maefast._C", sources=csrc_build.sources())] + jpeg


packages = find_packages(include=["maefast", "maefast.*"]) + ["maefast.kernels"]

setup(
    name="maefast",
    version="0.1.0",
    description="Fast, exact Masked Autoencoder (MAE) pre-training: Triton and CUDA C++ kernels, models, training",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"maefast.kernels": "kernels"},
    ext_modules=ext_modules(),
    cmdclass={"build_ext": NvccBuildExt},
    install_requires=[
        "torch>=2.4",
        "triton>=3.4; platform_system=='Linux'",  # 3.4+: tl.rand's 32-bit Philox on int64 counters
        "pybind11>=2.12",
        "ninja",
        "numpy",
        "pillow",
        "simplejpeg",  # a CPU data path's JPEG reader (maefast/train/jpeg.py); Pillow stands in without it
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # pytest-xdist: the README's test command (3.6.1+ runs tests on each worker's main thread, as the
        # signal tests need); scipy: the crop-box KS tests; transformers 5.9: the oldest the suite passes
        # under (2026-12-07: 5.9.0 passes, 5.8.0, 5.0.0, 4.56.0 and 4.40.0 fail some of its tests)
        "test": ["pytest>=7", "pytest-xdist>=3.6.1", "pytest-benchmark>=4", "transformers>=5.9", "scipy"],
    },
    entry_points={"console_scripts": ["maefast = maefast.cli:main"]},
)
