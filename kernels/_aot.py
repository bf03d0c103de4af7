"""Ahead-of-time compilation of a Triton kernel for a GPU architecture, without a GPU: code
generation checks and register/spill reports (scripts/compile_kernels.py compiles every kernel, the
attention tile table's entries and sweep candidates among them, as a launch specialises it). Run
without TRITON_INTERPRET."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton


def compile_for(kernel, signature: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4,
                num_stages: int = 1, attrs: dict | None = None, options: dict | None = None):
    """triton.compile of `kernel` (a JITFunction) for sm_`arch`: signature maps every argument name to
    its type ("*bf16", "i32", "fp32", "constexpr"), constexprs the constexpr ones to their values,
    attrs argument positions to their specialisation (e.g. {(3,): [["tt.divisibility", 16]]}),
    options further compile options of the launch (e.g. enable_fp_fusion)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages,
                                                                                 **(options or {})))


def resource_usage(compiled) -> tuple[int | None, int | None]:
    """(registers per thread, spill stack bytes) of a compiled kernel, read from its cubin with
    triton's bundled cuobjdump; (None, None) where that tool is missing."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)
