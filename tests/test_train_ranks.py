"""maefast.train.distributed's decisions without starting processes: `agreed`'s verdict from the ranks'
gathered reports (who raises what, quiet where), the heartbeat's watch over a stand-in store (a silent
rank is named, a finished one is not), the device checks of init_distributed, and where FSDP shards
per block. The same under real gloo processes: tests/test_train_distributed.py, test_train_faults.py."""
import threading

import pytest
import torch

from maefast.train import distributed as dist_lib
from maefast.train import train
from maefast.train.errors import RunError


def _agreed(monkeypatch, rank: int, others: dict, fn):
    """``agreed(fn)`` on ``rank`` of 2, the other rank's report {rank: (message, user error) or None}."""
    def gather(obj, info):
        return [obj if r == rank else others.get(r) for r in range(info.world_size)]

    monkeypatch.setattr(dist_lib, "all_gather_object", gather)
    return dist_lib.agreed(fn, dist_lib.DistInfo(rank=rank, world_size=2))


def _raises(exc):
    def fn():
        raise exc
    return fn


def test_agreed_stops_every_rank_with_the_first_failure(monkeypatch):
    assert _agreed(monkeypatch, 0, {1: None}, lambda: 7) == 7
    # rank 0's user error, rank 1 fine: rank 0 says it (rank-prefixed: not every rank failed), rank 1 quietly
    with pytest.raises(RunError, match="^rank 0: --x is bad$") as got:
        _agreed(monkeypatch, 0, {1: None}, _raises(ValueError("--x is bad")))
    assert not got.value.quiet
    with pytest.raises(RunError, match="^rank 0: --x is bad$") as got:
        _agreed(monkeypatch, 1, {0: ("--x is bad", True)}, lambda: 7)
    assert got.value.quiet
    # every rank with the same message: said once, as is
    with pytest.raises(RunError, match="^--x is bad$"):
        _agreed(monkeypatch, 0, {1: ("--x is bad", True)}, _raises(ValueError("--x is bad")))
    # a RunError (a full disk) is the user's to act on too
    with pytest.raises(RunError, match="^rank 0: no space$"):
        _agreed(monkeypatch, 0, {1: None}, _raises(RunError("no space")))
    # a bug of ours: its own traceback on the rank it happened on, "failed" on the others
    with pytest.raises(KeyError, match="oops"):
        _agreed(monkeypatch, 1, {0: None}, _raises(KeyError("oops")))
    with pytest.raises(RunError, match="^rank 1 failed: 'oops'$"):
        _agreed(monkeypatch, 0, {1: ("'oops'", False)}, lambda: 7)


class _Store:
    """The rendezvous store's calls the heartbeat makes."""

    def __init__(self, values):
        self.values = dict(values)

    def set(self, key, value):
        self.values[key] = value.encode()

    def check(self, keys):
        return all(k in self.values for k in keys)

    def get(self, key):
        return self.values[key]


@pytest.mark.parametrize("peer, stops", [(b"7", True), (b"done", False)], ids=["silent", "finished"])
def test_the_heartbeat_names_a_silent_rank_and_not_a_finished_one(monkeypatch, capsys, peer, stops):
    """The watched rank's counter stuck for longer than the timeout: one line naming it, exit 2; a rank
    that finished ("done") is never silent."""
    hb = dist_lib.Heartbeat(dist_lib.DistInfo(rank=0, world_size=2), timeout_s=0.1)
    hb.PERIOD = 0.01
    hb.store = _Store({hb._key(1): peer})
    exits = []

    def exit_(code):
        exits.append(code)
        hb._stop.set()

    monkeypatch.setattr(dist_lib.os, "_exit", exit_)
    timer = threading.Timer(0.5, hb._stop.set)  # ends the watch of a peer that never goes silent
    timer.start()
    try:
        hb._run()  # the thread's loop, here on the test's thread
    finally:
        timer.cancel()
    assert exits == ([2] if stops else [])
    err = capsys.readouterr().err
    assert ("rank 1 stopped answering" in err and "--dist-timeout 0.1" in err) if stops else err == ""


def test_init_distributed_refuses_a_device_it_cannot_use(tmp_path):
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu', got 'mps'"):  # the Python API's
        train(model="mae_vit_tiny_test", synthetic_size=4, batch_size=4, workers=0, progress=False, device="mps",
              output_dir=str(tmp_path / "run"))  # (the command line's --device has choices)
    assert not (tmp_path / "run").exists()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch.cuda.is_available\\(\\) is False"):
            dist_lib.init_distributed("cuda")


def test_fsdp_shards_per_block_on_the_reference_path_whatever_the_torch(monkeypatch):
    """FSDP1 (a torch without fully_shard) shards the blocks of the reference model only: maefast's fast
    path reads the block weights itself, outside the blocks' modules."""
    from types import SimpleNamespace

    fast, ref = SimpleNamespace(impl="auto"), SimpleNamespace(impl="reference")
    monkeypatch.setattr(dist_lib, "_fully_shard", lambda: None)
    assert dist_lib.fsdp_per_block(ref) and not dist_lib.fsdp_per_block(fast)
    monkeypatch.setattr(dist_lib, "_fully_shard", lambda: object())
    assert dist_lib.fsdp_per_block(ref) and dist_lib.fsdp_per_block(fast)


def test_node_share_of_run_counts_this_machines_processes_and_their_cpus(monkeypatch, tmp_path):
    """(CPUs, processes) of the run on this machine from every rank's (host name, CPU mask), for the --workers
    default; one process gathers nothing. The gather runs before `agreed(_plan)`, outside it: inside, a rank that
    failed in _plan would pair its error report with the others' masks."""
    import socket

    from maefast.train import config

    here = socket.gethostname()
    monkeypatch.setattr(config, "cpu_mask", lambda: {0, 1})

    def gather(obj, info):
        assert obj == (here, [0, 1])
        return [obj, (here, [1, 2, 3]), ("elsewhere", list(range(64)))]

    monkeypatch.setattr(dist_lib, "all_gather_object", gather)
    assert dist_lib.node_share_of_run(dist_lib.DistInfo(world_size=3)) == (4, 2)
    assert dist_lib.node_share_of_run(dist_lib.DistInfo()) is None
    order = []
    monkeypatch.setattr(dist_lib, "node_share_of_run", lambda info: order.append("gather"))

    def agreed(fn, info):
        order.append(fn.__name__)
        raise KeyboardInterrupt  # (stop the run here)

    monkeypatch.setattr(dist_lib, "agreed", agreed)
    from maefast.train.config import TrainConfig

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(model="mae_vit_tiny_test", device="cpu", progress=False, output_dir=str(tmp_path / "r")))
    assert order == ["gather", "_plan"]
