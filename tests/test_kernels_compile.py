"""Every Triton kernel compiles for sm_90 with the launch configs its launcher picks at the paper's
shapes (scripts/compile_kernels.py; no GPU needed): code-generation errors the interpreter cannot
see fail here, on the CPU, before any GPU time is spent. --quick: one shape per family and the
attention tile table's entries (every sweep candidate: test_attention_tiles)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_kernels(tmp_path, *args: str, timeout: int = 900) -> list[dict]:
    """scripts/compile_kernels.py `args` in a process of its own, compiling for real (the interpreter
    off): its rows, after it exited 0."""
    pytest.importorskip("triton.backends.compiler")
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compile_kernels.py"), *args,
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return json.loads(out.read_text())["kernels"]


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    rows = compile_kernels(tmp_path, "--quick")
    families = {r["kernel"].split()[0] for r in rows}
    assert families == {"masking", "layernorm", "bias_gelu", "colsum", "unshuffle", "loss", "patch_embed",
                        "attention"}, families
    assert sum("[table]" in r["kernel"] for r in rows) >= 8  # fwd + bwd of each of the four paper shapes
    assert all("error" not in r and r["shared_bytes"] is not None for r in rows), rows
    assert max(r["shared_bytes"] for r in rows) <= 232448  # what one block may use on an H100/H200 (the script
    # also fails any variant over it)
    # the loss kernels launch without fma contraction (kernels/loss.py LAUNCH_OPTIONS): a uint8 pixel's
    # normalised value is rounded before pred - target uses it, as a float image normalised first
    loss = [r for r in rows if r["kernel"].startswith("loss")]
    assert loss and all(r["fma_f32"] == 0 for r in loss), [(r["kernel"], r["fma_f32"]) for r in loss]
    # Hopper's tensor cores through wgmma where the tile table says so (kernels/attention_tiles.py): every
    # forward and dq tile of the table (>= 64 query rows), the dk/dv tiles of its unfused backwards (the
    # decoder's) and the bf16 patch embedding; only the fused backwards' 16-row steps (L 50, 65) may fall
    # back to warp-level mma.sync
    table = [r for r in rows if r["kernel"].endswith("[table]")]
    want = {"table forward": [r for r in table if r["kernel"].startswith("attention fwd ")],
            "table dq": [r for r in table if r["kernel"].startswith("attention bwd-dq ")],
            "table unfused dk/dv": [r for r in table if r["kernel"].startswith("attention bwd-dkdv ")
                                    and " dq-" in r["kernel"]],
            "bf16 patch embedding": [r for r in rows if r["kernel"].startswith("patch_embed ") and " bf16" in r["kernel"]]}
    assert {k: len(v) for k, v in want.items()} == {"table forward": 4, "table dq": 2, "table unfused dk/dv": 2,
                                                    "bf16 patch embedding": 7}, want
    bad = [(r["kernel"], r["wgmma"], r["mma_sync"]) for v in want.values() for r in v if r["mma_sync"] or not r["wgmma"]]
    assert not bad, bad


# -- the script itself, without compiling: what it asks triton for, how it judges the results --------

@pytest.fixture
def script():
    """scripts/compile_kernels.py as a module; importing it drops TRITON_INTERPRET, which the rest of the
    session needs (kernels imported later must still run under the interpreter)."""
    import importlib.util

    saved = os.environ.get("TRITON_INTERPRET")
    path = os.path.join(ROOT, "scripts", "compile_kernels.py")
    spec = importlib.util.spec_from_file_location("compile_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return mod


class _Compiled:
    """What triton.compile returns, as far as the script reads it."""

    def __init__(self, ptx="", shared=1024):
        self.asm = {"ptx": ptx, "cubin": b""}
        self.metadata = type("M", (), {"shared": shared})()


def test_compile_specialises_the_arguments_as_a_launch_does(script, monkeypatch):
    """Pointers 16-byte aligned, the pixel factors and eps fp32, an int of 1 a constant, a multiple of 16
    known divisible, other ints i32, do_not_specialize ones i64; the kernel module's LAUNCH_OPTIONS passed
    on; the PTX's instructions counted."""
    import types

    import maefast.kernels._aot as aot

    seen = {}

    def fake_compile_for(kernel, sig, consts, *, arch, num_warps, num_stages, attrs, options):
        seen.update(sig=sig, consts=consts, attrs=attrs, options=options, launch=(arch, num_warps, num_stages))
        return _Compiled("fma.rn.f32 a; fma.rn.f32 b; wgmma.mma_async x; mma.sync y; mma.sync z", shared=4096)

    monkeypatch.setattr(aot, "compile_for", fake_compile_for)
    monkeypatch.setattr(aot, "resource_usage", lambda compiled: (96, 8))
    names = ["x_ptr", "px_scale2", "eps", "one", "sixteen", "eight", "seed", "BLOCK"]
    module = types.ModuleType("fake_kernels")
    module.LAUNCH_OPTIONS = {"enable_fp_fusion": False}
    monkeypatch.setitem(sys.modules, "fake_kernels", module)
    kernel = types.SimpleNamespace(arg_names=names, fn=types.SimpleNamespace(__module__="fake_kernels"),
                                   params=[types.SimpleNamespace(name=n, do_not_specialize=n == "seed") for n in names])
    r = script._compile(kernel, dict(BLOCK=64), dict(x_ptr="*bf16"), arch=90, num_warps=8, num_stages=3,
                        ints=dict(one=1, sixteen=48, eight=40, seed=1))
    assert seen["sig"] == dict(x_ptr="*bf16", px_scale2="fp32", eps="fp32", one="constexpr", sixteen="i32", eight="i32",
                               seed="i64", BLOCK="constexpr")
    assert seen["consts"] == dict(BLOCK=64, one=1)
    assert seen["attrs"] == {(0,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]]}
    assert seen["options"] == {"enable_fp_fusion": False} and seen["launch"] == (90, 8, 3)
    assert (r["registers"], r["spill_stack_bytes"], r["shared_bytes"]) == (96, 8, 4096)
    assert (r["fma_f32"], r["wgmma"], r["mma_sync"]) == (2, 1, 2)


def _main(script, monkeypatch, capsys, tmp_path, results):
    """Runs main over fake variants k0, k1, ... whose _compile gives `results` in turn (a dict over the
    defaults, or an exception to raise); returns (exit code, JSON rows, stdout)."""
    todo = [(f"k{i}", None, {}, {}, 4, 1, {}) for i in range(len(results))]
    given = iter(results)

    def fake_compile(kernel, consts, ptrs, *, arch, num_warps, num_stages, ints):
        r = next(given)
        if isinstance(r, Exception):
            raise r
        return dict(dict(seconds=0.0, registers=64, spill_stack_bytes=0, shared_bytes=1024, fma_f32=0, wgmma=0,
                         mma_sync=0), **r)

    monkeypatch.setattr(script, "variants", lambda quick=False: todo)
    monkeypatch.setattr(script, "attention_variants", lambda quick=False: [])
    monkeypatch.setattr(script, "_compile", fake_compile)
    out = tmp_path / "rows.json"
    rc = script.main(["--json", str(out)])
    return rc, json.loads(out.read_text())["kernels"], capsys.readouterr().out


def test_main_exit_code_fails_errors_and_shared_memory_over_the_limit(script, monkeypatch, capsys, tmp_path):
    """Exit 1 when a variant fails to compile or needs more shared memory than sm_90 lets a block opt
    into (its launch would fail on the card); a spill is reported (summary and JSON), not failed: the
    tests that care judge the JSON (test_attention_tiles, test_patch_embed)."""
    rc, rows, out = _main(script, monkeypatch, capsys, tmp_path, [{}, dict(spill_stack_bytes=24)])
    assert rc == 0 and rows[1]["spill_stack_bytes"] == 24
    assert "2 compiled, 0 failed; 1 spill registers" in out and "spills: k1" in out
    rc, rows, out = _main(script, monkeypatch, capsys, tmp_path, [{}, RuntimeError("ptxas error\nout of registers")])
    assert rc == 1 and rows[1] == dict(kernel="k1", error="RuntimeError: out of registers")
    assert "1 compiled, 1 failed" in out
    limit = script.SHARED_OPTIN[90]
    rc, rows, _ = _main(script, monkeypatch, capsys, tmp_path, [dict(shared_bytes=limit)])
    assert rc == 0
    rc, rows, _ = _main(script, monkeypatch, capsys, tmp_path, [dict(shared_bytes=limit + 1)])
    assert rc == 1 and "shared memory" in rows[0]["error"]


def test_patch_embed_variants_use_the_launchers_gpu_tiles(script):
    """The patch-embedding variants compile with the tiles, warps and stages the launchers pick on a GPU
    (kernels/patch_embed.py `_fwd_config` / `_dw_config` for a CUDA device), not the interpreter's, and
    read the image in its dtype (uint8: normalised in the prologue)."""
    import torch

    from maefast.kernels import patch_embed as pe

    cuda = torch.device("cuda")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    rows = [v for v in script.variants(quick=False) if v[0].startswith("patch_embed")]
    assert len(rows) == 34, [v[0] for v in rows]
    for name, kernel, consts, ptrs, warps, stages, ints in rows:
        dt = next(t for t in name.split() if t in dtypes)
        uint8 = "uint8" in name
        if " dpos " in name:
            continue  # its tiles are the launcher's inline constants
        # the GEMM in the weight's dtype (exact "ieee" dots in fp32), the image read as it is stored
        assert consts["NORMALIZE"] == uint8 and consts["IEEE"] == (dt == "fp32"), name
        assert ptrs["imgs_ptr"] == ("*u8" if uint8 else f"*{dt}"), name
        assert ptrs["w_ptr" if " fwd " in name else "g_ptr"] == f"*{dt}", name
        if " fwd " in name:
            got = (consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"], warps, stages)
            assert got == pe._fwd_config(dtypes[dt], cuda), name
            # the models' fp32 pos_embed promotes the tokens to fp32 (the launcher's out dtype)
            assert ptrs["out_ptr"] == ("*fp32" if consts["HAS_POS"] else f"*{dt}"), name
        else:
            got = (consts["BLOCK_D"], consts["BLOCK_KD"], consts["BLOCK_M"], warps, stages)
            assert got == pe._dw_config(dtypes[dt], uint8, cuda), name


AOT_PROBE = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import triton
import triton.language as tl
import maefast  # noqa: F401  (maps the checkout's kernels/ to maefast.kernels)
from maefast.kernels._aot import compile_for, resource_usage


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)


c = compile_for(_scale_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 256},
                arch=80, num_warps=2)
print(json.dumps(dict(usage=resource_usage(c), num_warps=c.metadata.num_warps, arch=c.metadata.target.arch,
                      ptx_target=".target sm_80" in c.asm["ptx"])))
'''


def test_compile_for_and_resource_usage_on_a_small_kernel(tmp_path):
    """kernels/_aot.py itself (the script's tests stub it): the kernel is compiled for the arch and warps
    asked, and its registers per thread and spill stack are read from the cubin, in that order (a kernel
    this small uses a few dozen registers and spills nothing)."""
    pytest.importorskip("triton.backends.compiler")
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("triton's bundled cuobjdump is missing")
    (tmp_path / "probe.py").write_text(AOT_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(tmp_path / "probe.py"), ROOT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    regs, stack = got["usage"]
    assert isinstance(regs, int) and 8 <= regs <= 255 and stack == 0, got
    assert (got["num_warps"], got["arch"], got["ptx_target"]) == (2, 80, True), got


# -- what main compiles, and the attention launches it asks for (no compile) ----------------------------------

def _which(script, monkeypatch, tmp_path, *argv):
    """The variant names main compiles for `argv` (two non-attention variants, one attention one)."""
    todo = [(n, None, {}, {}, 4, 1, {}) for n in ("k0 fwd", "k1 bwd")]
    monkeypatch.setattr(script, "variants", lambda quick=False: list(todo))
    monkeypatch.setattr(script, "attention_variants", lambda quick=False: [("attention fwd", None, {}, {}, 4, 1, {})])
    monkeypatch.setattr(script, "_compile", lambda *a, **k: dict(seconds=0.0, registers=64, spill_stack_bytes=0,
                                                                 shared_bytes=10 ** 6, fma_f32=0, wgmma=0, mma_sync=0))
    out = tmp_path / "rows.json"
    rc = script.main([*argv, "--json", str(out)])
    return rc, [r["kernel"] for r in json.loads(out.read_text())["kernels"]]


def test_main_selects_the_variants_asked_for_and_knows_no_limit_for_other_archs(script, monkeypatch, tmp_path):
    """--attention-only, --no-attention and --match pick the variants; an arch without a known shared-memory
    limit (sm_75) is not failed for it (sm_90's limit is exceeded here)."""
    assert _which(script, monkeypatch, tmp_path, "--arch", "75") == (0, ["k0 fwd", "k1 bwd", "attention fwd"])
    assert _which(script, monkeypatch, tmp_path, "--arch", "75", "--attention-only") == (0, ["attention fwd"])
    assert _which(script, monkeypatch, tmp_path, "--arch", "75", "--no-attention") == (0, ["k0 fwd", "k1 bwd"])
    assert _which(script, monkeypatch, tmp_path, "--arch", "75", "--match", "bwd") == (0, ["k1 bwd"])
    assert _which(script, monkeypatch, tmp_path)[0] == 1  # sm_90: over its limit


def test_attention_variants_specialise_each_launch_as_the_launcher_does(script):
    """Per launch: the grid's block count rounds up (65 rows in 128-row blocks: one block, not none), the
    fused backward's dk/dv kernel computes dq, varlen launches (the first table shape only under --quick)
    see one packed sequence of 64 x L tokens through a cu_seqlens of the named int type, fp32 uses exact
    dots; the generic rule is compiled only where the table does not apply."""
    import re

    import torch

    from maefast.kernels import attention_tiles as tt

    quick = script.attention_variants(quick=True)
    first = next(iter(tt.TILES))
    varlen = {re.search(r"L(\d+) Dh(\d+)", v[0]).group(0) for v in quick if "varlen" in v[0]}
    assert varlen == {f"L{first[0]} Dh{first[1]}"}
    every = script.attention_variants(quick=False)
    assert {(int(m.group(1)), int(m.group(2))) for v in every if "varlen" in v[0]
            for m in [re.search(r"L(\d+) Dh(\d+)", v[0])]} == set(tt.TILES)
    for name, kernel, consts, ptrs, warps, stages, ints in quick + every:
        L, dh = map(int, re.search(r"L(\d+) Dh(\d+)", name).groups())
        vl = "varlen" in name
        assert consts["VARLEN"] is vl and consts["DOT_PREC"] == ("ieee" if " fp32 " in name else "tf32"), name
        assert ptrs["cu_ptr"] == ("*i64" if "varlen i64" in name else "*i32"), name
        assert (ints["seqlen"], ints["max_seqlen"] if vl else L) == ((64 * L if vl else L), L), name
        assert ints["stride_qkv_b"] == (64 if vl else 1) * L * 3 * 16 * dh, name
        if " fwd " in name or " bwd-dq " in name:
            assert ints["num_m_blocks"] == -(-L // consts["BLOCK_M"]), name
        else:
            assert ints["num_n_blocks"] == -(-L // consts["BLOCK_N"]), name
            assert consts["FUSED_DQ"] is (" fused-" in name), name
        if "[generic rule]" in name:
            assert tt.table_entry(L, dh, torch.float32 if " fp32 " in name else torch.bfloat16) is None, name


def test_main_records_a_failure_whose_message_is_blank(script, monkeypatch, capsys, tmp_path):
    """A variant whose exception has a blank message is recorded as failed and the run goes on (it used to
    stop the whole script with an IndexError)."""
    rc, rows, _ = _main(script, monkeypatch, capsys, tmp_path, [RuntimeError("\n"), {}])
    assert rc == 1 and rows[0] == dict(kernel="k0", error="RuntimeError") and "error" not in rows[1]
