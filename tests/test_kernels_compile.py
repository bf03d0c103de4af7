"""Every Triton kernel compiles for sm_90 with the launch configs its launcher picks at the paper's
shapes (scripts/compile_kernels.py; no GPU needed): code-generation errors the interpreter cannot
see fail here, on the CPU, before any GPU time is spent. --quick: one shape per family and the
attention tile table's entries (every sweep candidate: test_attention)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.compiler")
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compile_kernels.py"), "--quick",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    rows = json.loads(out.read_text())["kernels"]
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
