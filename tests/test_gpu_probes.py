"""The Python of two scripts a GPU session runs, without a GPU: scripts/capture_probe.py's record and exit
code (its checks faked), scripts/diagnose_dispatch.py's rows on the CPU (MAEFAST_DIAG_CPU, the timing and
maefast's ops stubbed: each way's route and autograd threading, the record written row by row)."""
from __future__ import annotations

import inspect
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import capture_probe as cp  # noqa: E402
import diagnose_dispatch as dd  # noqa: E402


def test_capture_probe_usage_and_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cp, "run", lambda checks, dev: pytest.fail("the probe ran"))
    assert cp.main([]) == 2 and cp.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cp.main([str(tmp_path / "a.json")]) == 2 and not os.listdir(tmp_path)


@pytest.mark.parametrize("case", ["all ok", "one failed", "ended early", "raised"])
def test_capture_probe_record_and_exit_code(tmp_path, monkeypatch, case):
    """Exit 0 only when all four checks ran and passed; an error inside the probe is recorded (the checks
    before it kept), not a traceback without a record."""
    names = ("refused", "memory", "empty_cache", "captures")

    def run(checks, dev):
        for name in names[:3] if case == "ended early" else names:
            checks[name] = {"ok": not (case == "one failed" and name == "memory")}
            if case == "raised" and name == "memory":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H100")
    monkeypatch.setattr(cp, "run", run)
    out = tmp_path / "probe.json"
    assert cp.main([str(out)]) == (0 if case == "all ok" else 1)
    rec = json.loads(out.read_text())
    assert rec["ok"] is (case == "all ok") and rec["card"] == "Fake H100"
    if case == "raised":
        assert rec["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
        assert list(rec["checks"]) == ["refused", "memory"]


def test_diagnose_dispatch_rows_on_the_cpu(tmp_path, monkeypatch):
    """Every case and way gets a row, written as it lands; "op-custom" runs through the custom-op dispatcher
    and the others directly; "-st" rows run autograd on one thread and the rows after them on its threads
    again (the ops and timers stubbed: the route is what is checked, not the kernels)."""
    from maefast import ops, timing
    from maefast.kernels import layernorm
    from maefast.ops import _dispatch

    monkeypatch.setenv("MAEFAST_DIAG_CPU", "1")
    seen = []

    def routed(fn):  # a stubbed op: records the route it was called on
        def op(*a, **k):
            seen[-1]["route"] = _dispatch.get_eager_dispatch()
            return fn(*a)
        return op

    monkeypatch.setattr(ops, "layer_norm", routed(lambda x, w, b, eps: x * w + b))
    monkeypatch.setattr(ops, "visible_attention", routed(lambda qkv, h: qkv[..., :1024] * 2))
    monkeypatch.setattr(ops, "unshuffle", routed(lambda x, tok, ids, pos: torch.cat(
        (x, tok.expand(x.shape[0], ids.shape[1] + 1 - x.shape[1], -1)), 1) + pos))
    monkeypatch.setattr(layernorm, "add_layer_norm_fwd", lambda x, r, w, b, eps: (x, None, None, None))
    monkeypatch.setattr(layernorm, "layer_norm_bwd", lambda *a: None)
    out = tmp_path / "diagnose.json"

    def time_fn(fn, dev):
        seen.append({"threads": torch.autograd.is_multithreading_enabled(),
                     "rows_on_file": len(json.loads(out.read_text())["rows"]) if out.exists() else 0})
        if inspect.isfunction(fn):  # the op rows (a training step row is built, not run: its ops are stubbed)
            fn()
        return {"median_ms": 1.0}

    monkeypatch.setattr(timing, "time_fn", time_fn)
    monkeypatch.setattr(dd, "host_us", lambda fn, dev, n=50: 1.0)
    assert torch.autograd.is_multithreading_enabled()
    assert dd.main(str(out)) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(seen) == 19 and [s["rows_on_file"] for s in seen] == list(range(19))
    assert [r["way"] for r in rows[:6]] == ["raw", "op", "op-custom", "op-st", "eager", "eager-st"]
    assert [r["way"] for r in rows[-6:]] == ["reference", "reference-st", "maefast", "maefast-st", "maefast-custom-op",
                                             "maefast-block"]
    for r, s in zip(rows, seen):
        assert s["threads"] is not r["way"].endswith("-st"), (r, s)
        if "route" in s:
            assert s["route"] == ("custom_op" if r["way"] == "op-custom" else "direct"), (r, s)
    assert sum("route" in s for s in seen) == 9 and torch.autograd.is_multithreading_enabled()
