"""StopControl's agreement group: made once per run, destroyed at the run's end (also inside a process
group the caller owns, where nothing else would destroy it). Signals and the agreement under torchrun:
tests/test_train_signals.py."""
import types

import torch.distributed as dist

from maefast.train.control import StopControl


def test_the_agreement_group_is_destroyed_at_exit(tmp_path):
    """Three runs inside a caller's (one-process gloo) group: each makes its gloo group, agrees on it
    and destroys it at exit; the caller's group lives on, no group is left behind."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        groups = set(dist.distributed_c10d._world.pg_map)
        info = types.SimpleNamespace(distributed=True)  # the agreement as under torchrun
        for _ in range(3):
            with StopControl(info) as ctl:
                ctl.setup()
                assert ctl._group in dist.distributed_c10d._world.pg_map
                assert ctl.agree() is None
        assert set(dist.distributed_c10d._world.pg_map) == groups and dist.is_initialized()
    finally:
        dist.destroy_process_group()
