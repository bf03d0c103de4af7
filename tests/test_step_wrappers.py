"""`maefast.TrainStep` around what wraps or feeds a model (patched official-layout and transformers models,
DDP, torch.compile, a checkpoint's optimizer and GradScaler), each against the plain hand-written loop: autocast
forward, backward, clip, optimizer.step, zero_grad (a GradScaler for fp16), which must give the same losses and
parameters bit for bit. Found by exploring feature combinations."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import maefast
from maefast.step import TrainStep
from maefast.train.schedule import param_groups_weight_decay, set_group_lrs
from official_layout import TINY, official_class

pytestmark = pytest.mark.usefixtures("one_thread")


def _official():
    torch.manual_seed(0)
    return maefast.patch(official_class()(**TINY))


def _official_loss(m, imgs, noise):
    return m(imgs, 0.75, noise, return_pred=False)[0]


def _data(n, overflow=()):
    """n batches with their noise; the batches in `overflow` overflow fp16 (GradScaler skips their update)."""
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randn(3, 3, 32, 32, generator=g) * (1e6 if i in overflow else 1) for i in range(n)]
    return imgs, [torch.rand(3, 16, generator=g) for _ in range(n)]


def _groups(model, lr_scale=0.5):
    """The official recipe's groups [no decay, decay], the first with an lr_scale (layer-decay style)."""
    groups = param_groups_weight_decay(model, 0.05)
    groups[0]["lr_scale"] = lr_scale
    return groups


def _plain_loop(model, opt, imgs, noises, loss_fn, *, dtype=torch.float32, accum=1, clip=None, scaler=None,
                lrs=None):
    """The hand-written loop; returns its losses."""
    losses = []
    for i, (x, n) in enumerate(zip(imgs, noises)):
        if lrs is not None:
            set_group_lrs(opt, lrs[i])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(model, x, n)
        losses.append(loss.detach())
        scaled = loss / accum if accum > 1 else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if (i + 1) % accum == 0:
            if clip is not None:
                if scaler is not None:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
    return losses


def _same(losses_a, losses_b, a, b):
    assert all(torch.equal(x, y) or (x.isnan() and y.isnan()) for x, y in zip(losses_a, losses_b, strict=True))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Linear(12, 12) for _ in range(4)])
        self.norm = nn.LayerNorm(12)

    def forward(self, imgs, mask_ratio=0.75):
        return (self.norm(self.blocks(imgs.flatten(1))) * 3).pow(2).mean()


@pytest.mark.parametrize("seed", range(6))
def test_clip_grad_sums_the_norms_in_the_models_order(seed):
    """The official groups list the parameters [no decay, decay], not in the model's order; clip_grad_norm_ sums
    the per-parameter norms in the order it is given: the step clipped the groups' order, the official loop
    clip_grad_norm_(model.parameters()), and the parameters parted in the last bits (before 2026-12-07)."""
    torch.manual_seed(seed)
    a = Stack()
    b = copy.deepcopy(a)
    imgs = [torch.randn(4, 3, 2, 2) for _ in range(3)]
    step = TrainStep(a, torch.optim.SGD(param_groups_weight_decay(a, 0.05), lr=0.1), clip_grad=0.1)
    opt = torch.optim.SGD(param_groups_weight_decay(b, 0.05), lr=0.1)
    losses = [step(x) for x in imgs]
    _same(losses, _plain_loop(b, opt, imgs, [None] * 3, lambda m, x, n: m(x), clip=0.1), a, b)


@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
def test_fp16_overflow_steps_are_skipped_as_the_plain_loop_skips_them(fake_capture, captured):
    """A patched official-layout model, fp16 with a GradScaler, accumulation, clipping, lr_scale groups and
    set_lr: the micro-batches that overflow skip the same updates and halve the same scale as the plain loop."""
    a = _official()
    b = copy.deepcopy(a)
    imgs, noises = _data(6, overflow=(1, 4))
    lrs = [1e-3, 2e-3, 3e-3, 1e-3, 5e-4, 4e-4]
    opt_a = torch.optim.AdamW(_groups(a), lr=1e-3, fused=True, capturable=captured)
    opt_b = torch.optim.AdamW(_groups(b), lr=torch.tensor(1e-3) if captured else 1e-3, fused=True,
                              capturable=captured)
    step = TrainStep(a, opt_a, dtype=torch.float16, accum_steps=2, clip_grad=0.5, capture=captured,
                     scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    losses = []
    for i in range(6):
        step.set_lr(lrs[i])
        losses.append(step(imgs[i], noises[i]).clone())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    want = _plain_loop(b, opt_b, imgs, noises, _official_loss, dtype=torch.float16, accum=2, clip=0.5,
                       scaler=scaler, lrs=lrs)
    assert step.captured == captured and step.scaler.get_scale() == scaler.get_scale() == 2.0 ** 8
    _same(losses, want, a, b)


def test_a_ddp_model_syncs_only_the_update_and_steps_as_the_plain_loop(tmp_path):
    """DDP (gloo, one process) around a patched official-layout model, accumulation 3 in fp16: the gradients are
    all-reduced on the updating micro-batch only (no_sync before), and the result is the plain loop's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        a = _official()
        b = copy.deepcopy(a)
        ddp = DDP(a)
        reduced = []

        def hook(state, bucket):  # world size 1: the all-reduce is the identity, counted
            reduced.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        imgs, noises = _data(6)
        step = TrainStep(ddp, torch.optim.AdamW(a.parameters(), lr=1e-3, fused=True), dtype=torch.float16,
                         accum_steps=3, clip_grad=0.5)
        losses = [step(imgs[i], noises[i]) for i in range(6)]
        want = _plain_loop(b, torch.optim.AdamW(b.parameters(), lr=1e-3, fused=True), imgs, noises, _official_loss,
                           dtype=torch.float16, accum=3, clip=0.5, scaler=torch.amp.GradScaler("cpu"))
        assert step.optimizer_steps == 2 and len(reduced) == 2 * len(set(reduced))
        _same(losses, want, a, b)
    finally:
        dist.destroy_process_group()


def test_each_rank_draws_its_own_masks_from_one_seed(monkeypatch):
    """Under torch.distributed rank r draws call k's mask with seed + r * stride + k: ranks seeded alike (as FSDP
    needs, for the same initial weights) once drew the same seed=None, and a seed given (or resumed with, from
    rank 0's checkpoint: seed=old.seed + old.calls) was every rank's, so every rank masked its images alike.
    `step.seed` is the run's seed, the same on every rank (the official code seeds seed + rank)."""
    import torch.distributed as dist

    m = maefast.models.MaskedAutoencoderViT(**TINY)
    drawn = []
    m.register_forward_pre_hook(lambda mod, args, kw: drawn.append(int(kw["seed"])), with_kwargs=True)
    imgs = torch.randn(2, 3, 32, 32)

    def seeds_on(rank, calls=1, **kw):
        """(step.seed, the seeds its first `calls` calls drew) on `rank` (None: no process group)."""
        monkeypatch.setattr(dist, "is_initialized", lambda: rank is not None)
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        torch.manual_seed(0)
        step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.0), capture=False, **kw)
        del drawn[:]
        for _ in range(calls):
            step(imgs)
        return step.seed, list(drawn)

    for kw in ({}, {"seed": 5}):
        runs = [seeds_on(r, **kw) for r in (None, 0, 1, 2, 3)]
        assert len({s for s, _ in runs}) == 1 and runs[0] == runs[1], (kw, runs)
        firsts = [d[0] for _, d in runs[1:]]
        assert len(set(firsts)) == 4, (kw, firsts)
        assert min(abs(a - b) for a in firsts for b in firsts if a != b) > 2 ** 40  # their seed + k streams apart
    assert seeds_on(None, seed=5)[1] == [5]
    for rank in (0, 2):  # a resume from rank 0's seed + calls continues every rank's own stream
        seed, stream = seeds_on(rank, calls=3, seed=5)
        assert stream == [stream[0], stream[0] + 1, stream[0] + 2]
        assert seeds_on(rank, seed=seed + 2)[1] == stream[2:]


@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
def test_a_run_resumed_from_its_checkpoint_continues_as_one_run(fake_capture, captured):
    """Model, optimizer and GradScaler saved after 4 calls (2 updates, one skipped by an fp16 overflow), restored
    into a new model, optimizer and TrainStep with seed=old.seed + old.calls: the masks drawn from the seed, the
    updates and the scale go on as in the uninterrupted run."""
    def build(model):
        return torch.optim.AdamW(_groups(model), lr=1e-3, fused=True, capturable=captured)

    kw = dict(dtype=torch.float16, accum_steps=2, clip_grad=0.5, capture=captured)
    imgs, _ = _data(8, overflow=(2,))
    lrs = [1e-3, 2e-3, 3e-3, 1e-3, 5e-4, 4e-4, 3e-4, 2e-4]
    whole, first = _official(), _official()
    run = TrainStep(whole, build(whole), seed=11, **kw)
    want = []
    for i in range(8):
        run.set_lr(lrs[i])
        want.append(run(imgs[i]).clone())
    old = TrainStep(first, build(first), seed=11, **kw)
    got = []
    for i in range(4):
        old.set_lr(lrs[i])
        got.append(old(imgs[i]).clone())
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": old.optimizer.state_dict(),
                "scaler": old.scaler.state_dict(), "seed": old.seed + old.calls}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = _official()
    resumed.load_state_dict(ckpt["model"])
    opt = build(resumed)
    opt.load_state_dict(ckpt["optimizer"])
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(ckpt["scaler"])
    new = TrainStep(resumed, opt, scaler=scaler, seed=ckpt["seed"], **kw)
    for i in range(4, 8):
        new.set_lr(lrs[i])
        got.append(new(imgs[i]).clone())
    assert new.mask_source == "seed" and new.captured == captured
    assert new.scaler.get_scale() == run.scaler.get_scale() == 2.0 ** 15
    _same(got, want, resumed, whole)


def test_a_compiled_model_takes_each_calls_seed_without_recompiling(fake_capture):
    """torch.compile (aot_eager) of a patched official-layout model inside a captured step with accumulation:
    one graph for the seed-drawn masks of every call (the seed is a tensor), the eager step's losses."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    a = _official()
    b = copy.deepcopy(a)
    imgs, _ = _data(4)
    cap = TrainStep(torch.compile(a, backend="aot_eager"),
                    torch.optim.AdamW(a.parameters(), lr=1e-3, fused=True, capturable=True),
                    accum_steps=2, seed=4, capture=True)
    eager = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True),
                      accum_steps=2, seed=4, capture=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in imgs:
            torch.testing.assert_close(cap(x), eager(x), rtol=1e-5, atol=1e-6)
    assert cap.captured and cap.mask_source == "seed" and counters["stats"]["unique_graphs"] == 1
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


def test_zero_grad_drops_a_partial_accumulation_under_fsdp2(tmp_path):
    """fully_shard (FSDP2, gloo, one process) per block and the root, accumulation 2: the micro-batches run without
    gradient sync keep their gradients on FSDP2's unsharded parameters, where the optimizer's zero_grad does not
    reach; step.zero_grad() after one of them must still drop it, as for the plain model (before 2026-12-07 the
    dropped micro-batch was summed into the next update)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        a = Stack()
        b = copy.deepcopy(a)
        for block in a.blocks:
            fully_shard(block)
        fully_shard(a)
        imgs = [torch.randn(4, 3, 2, 2) for _ in range(3)]
        steps = [TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), accum_steps=2) for m in (a, b)]
        for step in steps:
            step(imgs[0])
            step.zero_grad()  # the first micro-batch dropped: one update, from the other two
            for x in imgs[1:]:
                step(x)
            assert step.optimizer_steps == 1
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p.full_tensor(), q, rtol=0, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def _fsdp1_rank(rank, store, out):
    """One rank of the FSDP1 test below: four fp16 steps, each rank on its own images; writes its scales."""
    import json
    import warnings

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (FSDP1's deprecation)
            model = FSDP(maefast.models.MaskedAutoencoderViT(**TINY), device_id=torch.device("cpu"),
                         use_orig_params=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        try:  # a plain GradScaler given there is refused (a disabled one checks nothing: fine)
            TrainStep(model, opt, dtype=torch.float16, capture=False, scaler=torch.amp.GradScaler("cpu"))
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        TrainStep(model, opt, dtype=torch.float16, capture=False, scaler=torch.amp.GradScaler("cpu", enabled=False))
        try:  # a fused optimizer: GradScaler.step skips ShardedGradScaler.unscale_'s all-reduce (ranks parted)
            TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), dtype=torch.float16,
                      capture=False)
        except ValueError as exc:
            refused += " | " + str(exc)
        inner = maefast.models.MaskedAutoencoderViT(**TINY)  # FSDP1 on a block under a plain root: found too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inner.blocks[0] = FSDP(inner.blocks[0], device_id=torch.device("cpu"), use_orig_params=True)
        part = TrainStep(inner, torch.optim.AdamW(inner.parameters()), dtype=torch.float16, capture=False).scaler
        refused += " | " + type(part).__name__
        step = TrainStep(model, opt, dtype=torch.float16, capture=False)
        # a scale that overflows decoder_pred's gradients only (in the last rank's shard), as a checkpoint restores it
        step.scaler.load_state_dict({**step.scaler.state_dict(), "scale": 2.0 ** 22})
        g = torch.Generator().manual_seed(10 + rank)
        scales = []
        for _ in range(4):
            step(torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 16, generator=g))
            scales.append(step.scaler.get_scale())
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"scaler": type(step.scaler).__name__, "scales": scales, "refused": refused}, f)
    finally:
        dist.destroy_process_group()


def test_fp16_under_fsdp1_skips_the_same_steps_on_every_rank(tmp_path):
    """FSDP1 (gloo, two processes) shards the gradients: with a plain GradScaler each rank found the infs of its own
    shard only, so one rank skipped the step (and halved its scale) while the other stepped, and the next gradients
    were summed at two scales. The default scaler is torch's ShardedGradScaler there: the ranks agree."""
    import json

    import torch.multiprocessing as mp

    out = str(tmp_path / "scales")
    mp.spawn(_fsdp1_rank, args=(str(tmp_path / "store"), out), nprocs=2)
    ranks = []
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            ranks.append(json.load(f))
    assert ranks[0]["scales"] == ranks[1]["scales"] and ranks[0]["scales"][0] == 2.0 ** 21  # (an overflow backed off)
    assert ranks[0]["scaler"] == ranks[1]["scaler"] == "ShardedGradScaler"
    for r in ranks:
        plain, fused, part = r["refused"].split(" | ")
        assert plain.startswith("scaler: under FSDP1") and fused.startswith("optimizer: a fused AdamW under FSDP1")
        assert part == "ShardedGradScaler"


def test_fsdp1_scaler_rules_hold_for_a_scaler_given_and_for_bf16(tmp_path):
    """FSDP1 (gloo, one process): bf16 and fp32 step without a scaler there too (ShardedGradScaler is fp16's); a
    ShardedGradScaler passed with a fused optimizer is refused as the default one is (GradScaler.step skips its
    all-reduce of the ranks' inf checks for a fused optimizer); a disabled one is no scaler and checks nothing."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (FSDP1's deprecation)
            model = FSDP(Stack(), device_id=torch.device("cpu"), use_orig_params=True)
        plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
        fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        for dtype in (torch.bfloat16, torch.float32):
            assert TrainStep(model, plain, dtype=dtype, capture=False).scaler is None
        assert type(TrainStep(model, plain, dtype=torch.float16, capture=False).scaler) is ShardedGradScaler
        with pytest.raises(ValueError, match="optimizer: a fused AdamW under FSDP1"):
            TrainStep(model, fused, dtype=torch.float16, capture=False, scaler=ShardedGradScaler("cpu"))
        off = ShardedGradScaler("cpu", enabled=False)
        assert TrainStep(model, fused, dtype=torch.float16, capture=False, scaler=off).scaler is off
    finally:
        dist.destroy_process_group()
