"""The paper's recipe pieces of `maefast train`: lr schedule values, which parameters decay, the
augmentation, datasets (corrupt files, empty folders), the resumable sampler, default resolution."""
import math
import os

import numpy as np
import pytest
import torch

from maefast.models import create_model
from maefast.train import schedule
from maefast.train.config import TrainConfig, config_from_args, resolve_config
from maefast.train.data import (IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, PretrainTransform,
                                ResumableDistributedSampler, SyntheticDataset, collate, random_resized_crop_params)


# -- schedule --------------------------------------------------------------------------------------
def official_lr(epoch, lr, warmup, epochs, min_lr=0.0):
    """facebookresearch/mae util/lr_sched.adjust_learning_rate, restated."""
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_scaled_lr_is_blr_times_batch_over_256():
    assert schedule.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # the paper's batch
    assert schedule.scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    with pytest.raises(ValueError, match="effective_batch"):
        schedule.scaled_lr(1.5e-4, 0)


def test_lr_schedule_values():
    lr, warm, ep = 2.4e-3, 40, 800
    assert schedule.lr_at(0.0, lr, warm, ep) == 0.0  # the official first iteration has lr 0
    assert schedule.lr_at(20.0, lr, warm, ep) == pytest.approx(lr / 2)
    assert schedule.lr_at(40.0, lr, warm, ep) == pytest.approx(lr)
    assert schedule.lr_at(420.0, lr, warm, ep) == pytest.approx(lr / 2)  # half way down the cosine
    assert schedule.lr_at(800.0, lr, warm, ep) == pytest.approx(0.0, abs=1e-15)
    assert schedule.lr_at(800.0, lr, warm, ep, min_lr=1e-6) == pytest.approx(1e-6)
    for e in np.linspace(0, 799.99, 97):
        assert schedule.lr_at(float(e), lr, warm, ep, 1e-6) == pytest.approx(official_lr(e, lr, warm, ep, 1e-6))
    # per iteration: 10 iterations per epoch, warm-up 1 epoch -> linear steps of lr/10
    vals = [schedule.lr_at(i / 10, 1.0, 1, 5) for i in range(12)]
    assert vals[:10] == pytest.approx([i / 10 for i in range(10)])
    assert vals[10] == pytest.approx(1.0) and vals[11] < 1.0


def test_adjust_learning_rate_sets_groups_and_lr_scale():
    p1, p2 = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([{"params": [p1]}, {"params": [p2], "lr_scale": 0.5}], lr=1.0)
    got = schedule.adjust_learning_rate(opt, 0.5, 1e-3, 1, 10)
    assert got == pytest.approx(5e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(2.5e-4)


def test_weight_decay_groups_match_official_rule():
    model = create_model("mae_vit_tiny_test")
    decayed, plain = schedule.decay_split(model)
    # cls_token / mask_token are 3-D: decayed, as in timm 0.3.2 add_weight_decay
    assert "cls_token" in decayed and "mask_token" in decayed
    assert "patch_embed.proj.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert "decoder_pred.weight" in decayed and "decoder_embed.weight" in decayed
    assert all(not n.endswith(".bias") for n in decayed)
    assert "blocks.0.norm1.weight" in plain and "norm.weight" in plain and "decoder_norm.weight" in plain
    assert "patch_embed.proj.bias" in plain
    # the fixed sin-cos tables are not trained at all
    assert "pos_embed" not in decayed + plain and "decoder_pos_embed" not in decayed + plain
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (name in plain) == (p.ndim <= 1 or name.endswith(".bias")), name
    from maefast.train.config import TrainConfig
    from maefast.train.setup import build_optimizer

    opt = build_optimizer(model, model, TrainConfig(), lr=1e-3)  # what maefast train builds
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(decayed) + len(plain)


def test_optimizer_groups_are_named_on_the_bare_model_through_wrappers():
    """DDP (module.), FSDP (_fsdp_wrapped_module.) and activation checkpointing (_checkpoint_wrapped_module.)
    prefix the parameters' names: the groups are those of the bare model; a frozen parameter is in none."""
    import torch.nn as nn

    from maefast.train.setup import build_optimizer

    class Wrapper(nn.Module):
        def __init__(self, attr, inner):
            super().__init__()
            setattr(self, attr, inner)

    def shapes(opt):
        return [[tuple(p.shape) for p in g["params"]] for g in opt.param_groups]

    model = create_model("mae_vit_tiny_test")
    want = shapes(build_optimizer(model, model, TrainConfig(), lr=1e-3))
    inner = create_model("mae_vit_tiny_test")
    for i, block in enumerate(inner.blocks):
        inner.blocks[i] = Wrapper("_fsdp_wrapped_module", Wrapper("_checkpoint_wrapped_module", block))
    wrapped = Wrapper("module", Wrapper("_fsdp_wrapped_module", inner))
    assert shapes(build_optimizer(model, wrapped, TrainConfig(), lr=1e-3)) == want
    inner.blocks[0]._fsdp_wrapped_module._checkpoint_wrapped_module.norm1.weight.requires_grad_(False)
    inner.patch_embed.proj.weight.requires_grad_(False)
    got = build_optimizer(model, wrapped, TrainConfig(), lr=1e-3)
    assert [len(g["params"]) for g in got.param_groups] == [len(want[0]) - 1, len(want[1]) - 1]
    assert all(p.requires_grad for g in got.param_groups for p in g["params"])


def test_the_folder_probe_tries_files_spread_over_it_to_the_last(tmp_path):
    """A folder is refused before the first step when none of the files tried reads; the tries are spread
    over the folder, its last file included."""
    from PIL import Image

    from maefast.train.setup import PROBE_FILES, probe_readable

    assert PROBE_FILES == 16
    for i in range(40):
        (tmp_path / f"img{i:02d}.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (40, 30), (9, 99, 199)).save(tmp_path / "z_last.png")
    probe_readable(ImageFolderDataset(str(tmp_path), 32, 16))  # the last file reads: accepted
    (tmp_path / "z_last.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"^--data .* 16 files tried of its 41 image files.*img00\.jpg: Unidentified"):
        probe_readable(ImageFolderDataset(str(tmp_path), 32, 16))
    with pytest.raises(ValueError, match=r"^--data .* any of its 41 image files"):
        probe_readable(ImageFolderDataset(str(tmp_path), 32, 16), tries=50)


def test_checkpoint_space_is_the_weights_adamws_moments_and_the_export():
    from maefast.train.setup import checkpoint_bytes

    model = create_model("mae_vit_tiny_test")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # the sin-cos tables too
    moments = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert checkpoint_bytes(model, save=False, export=False) == 2 ** 20
    assert checkpoint_bytes(model, save=True, export=False) == int(1.05 * (weights + moments)) + 2 ** 20
    assert checkpoint_bytes(model, save=False, export=True) == int(1.05 * weights) + 2 ** 20
    assert checkpoint_bytes(model) == int(1.05 * (2 * weights + moments)) + 2 ** 20


def test_a_graph_break_is_found_in_the_exception_chain():
    from torch._dynamo.exc import Unsupported

    from maefast.train.setup import fullgraph_failure

    cause = Unsupported("data-dependent branching\nmore")
    raised = RuntimeError("backend failed")
    raised.__context__ = cause  # raised while handling it
    assert fullgraph_failure(raised) == "data-dependent branching"
    chained = RuntimeError("x")
    chained.__cause__ = Unsupported("")
    assert fullgraph_failure(chained) == "Unsupported"
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a  # a cycle ends the walk
    assert fullgraph_failure(a) is None and fullgraph_failure(ValueError("no break")) is None


# -- augmentation ----------------------------------------------------------------------------------
def test_random_resized_crop_params_follow_torchvision_rules():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(400):
        W, H = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        top, left, h, w = random_resized_crop_params(W, H, rng)
        assert 0 <= top and 0 <= left and top + h <= H and left + w <= W and h > 0 and w > 0
        areas.append(h * w / (H * W))
    areas = np.array(areas)
    # scale (0.2, 1.0) up to rounding; the fallback (a central crop) is area <= 1
    assert areas.min() > 0.17 and areas.max() <= 1.0
    assert 0.3 < np.median(areas) < 0.65  # large crops are often rejected by the aspect ratio
    # fallback: an extreme aspect ratio never fits 10 tries -> central crop clamped to ratio 4/3
    top, left, h, w = random_resized_crop_params(1000, 10, np.random.default_rng(1))
    assert (h, w) == (10, 13) and left == (1000 - 13) // 2 and top == 0


def test_pretrain_transform_shape_normalisation_and_determinism():
    from PIL import Image

    img = Image.fromarray(np.full((50, 70, 3), (255, 128, 0), np.uint8))
    t = PretrainTransform(32)
    x = t(img, np.random.default_rng(3))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expect = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(x.mean((1, 2)), torch.tensor(expect), atol=1e-4, rtol=0)
    assert torch.equal(x, t(img, np.random.default_rng(3)))
    # horizontal flip happens about half the time
    ramp = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3)))
    flips = sum(bool(t(ramp, np.random.default_rng(s))[0, 0, 0] > t(ramp, np.random.default_rng(s))[0, 0, -1])
                for s in range(60))
    assert 15 < flips < 45


def test_synthetic_dataset_is_deterministic_per_index_and_epoch():
    ds = SyntheticDataset(10, input_size=32, num_patches=16, seed=5)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["noise"], b["noise"])
    assert a["image"].shape == (3, 32, 32) and a["noise"].shape == (16,)
    c = ds[(1, 3)]  # next epoch: new crop and mask
    assert not torch.equal(a["noise"], c["noise"])
    assert np.array_equal(np.asarray(ds.load(3)), np.asarray(ds.load(3)))
    assert not np.array_equal(np.asarray(ds.load(3)), np.asarray(ds.load(4)))
    assert len(ds) == 10
    with pytest.raises(ValueError, match="size"):
        SyntheticDataset(0, 32, 16)


def _write_images(folder, n, size=40, seed=0):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 6, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"img{i}.png"))


def test_image_folder_with_and_without_classes_and_corrupt_files(tmp_path):
    _write_images(tmp_path / "cls_a", 3)
    _write_images(tmp_path / "cls_b", 2, seed=1)
    (tmp_path / "cls_b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    good = (tmp_path / "cls_a" / "img0.png").read_bytes()
    (tmp_path / "cls_b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.txt").write_text("ignored")
    ds = ImageFolderDataset(str(tmp_path), 32, 16)
    assert len(ds) == 7
    items = [ds[(0, i)] for i in range(len(ds))]
    bad = [it["bad"] for it in items if "bad" in it]
    assert len(bad) == 2 and any("broken.jpg" in b for b in bad) and any("truncated.png" in b for b in bad)
    batch = collate(items)
    assert batch["images"].shape == (5, 3, 32, 32) and batch["noise"].shape == (5, 16) and len(batch["bad"]) == 2
    assert collate([items[i] for i, it in enumerate(items) if "bad" in it])["images"] is None
    flat = ImageFolderDataset(str(tmp_path / "cls_a"), 32, 16)
    assert len(flat) == 3


def test_image_folder_empty_or_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(str(tmp_path), 32, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"), 32, 16)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        ImageFolderDataset(str(tmp_path / "f.png"), 32, 16)


def test_resumable_sampler_shuffles_anew_each_epoch():
    """Epoch e's order is torch.randperm with seed + e (DistributedSampler's rule): a new one every epoch."""
    s = ResumableDistributedSampler(list(range(64)), 1, 0, seed=3)
    orders = []
    for e in (0, 1, 2):
        s.set_epoch(e)
        orders.append([i for _, i in s])
        assert orders[e] == torch.randperm(64, generator=torch.Generator().manual_seed(3 + e)).tolist()
    assert orders[0] != orders[1] != orders[2]


def test_resumable_sampler_without_shuffle_keeps_the_datasets_order():
    """shuffle=False: the dataset's order at every epoch, cut to whole global batches, split across ranks."""
    ds = list(range(10))
    for epoch in (0, 3):
        ranks = []
        for r in range(2):
            s = ResumableDistributedSampler(ds, 2, r, shuffle=False, seed=5, global_batch=4)
            s.set_epoch(epoch)
            ranks.append([i for _, i in s])
        assert ranks == [[0, 2, 4, 6], [1, 3, 5, 7]]  # the tail (8, 9) is less than a global batch
    s = ResumableDistributedSampler(ds, 2, 1, shuffle=False, global_batch=4)
    s.set_position(4)
    assert [i for _, i in s] == [5, 7] and len(s) == 2


def test_resumable_sampler_ranks_and_start():
    ds = list(range(24))
    one = ResumableDistributedSampler(ds, 1, 0, seed=3)
    one.set_epoch(2)
    full = [i for _, i in one]
    assert sorted(full) == ds and all(e == 2 for e, _ in one)
    ranks = []
    for r in range(2):
        s = ResumableDistributedSampler(ds, 2, r, seed=3)
        s.set_epoch(2)
        ranks.append([i for _, i in s])
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2]
    s = ResumableDistributedSampler(ds, 2, 1, seed=3)
    s.set_epoch(2)
    s.set_position(8)  # 8 samples of the epoch done: 4 of each rank's share
    assert [i for _, i in s] == ranks[1][4:] and len(s) == 8
    with pytest.raises(ValueError, match="whole number of global batches"):
        ResumableDistributedSampler(ds, 2, 0, seed=3, global_batch=8).set_position(4)


def test_sampler_position_at_and_past_the_epochs_end():
    """A checkpoint after an epoch's last step resumes at its end (nothing left of it); a position past
    the end is refused, not a negative length."""
    s = ResumableDistributedSampler(list(range(21)), 2, 1, seed=3, global_batch=4)
    assert s.used == 20
    s.set_position(20)
    assert list(s) == [] and len(s) == 0
    with pytest.raises(ValueError, match="whole number of global batches of 4 within the epoch's 20 samples"):
        s.set_position(24)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        ResumableDistributedSampler(list(range(21)), 2, 2, seed=3, global_batch=4)


@pytest.mark.parametrize("size", [31, 32, 37])
def test_sampler_same_steps_and_samples_at_every_world_size(size):
    """Every split of a global batch of 8 (1 x 8, 2 x 4, 4 x 2 processes) gives the same steps per epoch
    and the same samples in each step (the tail of len % 8 dropped everywhere), also when resuming at
    another world size: each sample of the epoch exactly once."""
    ds = list(range(size))

    def steps(world, start=0):
        per_rank = []
        for r in range(world):
            s = ResumableDistributedSampler(ds, world, r, seed=5, global_batch=8)
            s.set_epoch(1)
            s.set_position(start)
            per_rank.append([i for _, i in s])
        b = 8 // world
        n = len(per_rank[0]) // b
        assert all(len(p) == n * b for p in per_rank)
        return [sorted(x for p in per_rank for x in p[k * b:(k + 1) * b]) for k in range(n)]

    want = steps(1)
    assert len(want) == size // 8 and all(len(st) == 8 for st in want)
    assert steps(2) == want and steps(4) == want
    # 2 steps done on 2 processes, the rest on 4 (or 1): the remaining steps are the straight run's
    assert steps(4, start=16) == want[2:] and steps(1, start=16) == want[2:]
    seen = [x for st in want for x in st]
    assert len(seen) == len(set(seen)) == size // 8 * 8


# -- configuration ---------------------------------------------------------------------------------
def test_cpu_defaults_and_paper_defaults():
    cpu = resolve_config(TrainConfig(), cuda=False)
    assert (cpu.model, cpu.input_size, cpu.epochs, cpu.device, cpu.dtype) == (
        "mae_vit_small_cpu", 64, 1, "cpu", "float32")
    assert cpu.synthetic_size > 0 and any("CPU defaults" in n for n in cpu.notes)
    gpu = resolve_config(TrainConfig(data="/imagenet/train"), cuda=True)
    assert (gpu.model, gpu.input_size, gpu.epochs, gpu.warmup_epochs, gpu.batch_size) == (
        "mae_vit_base_patch16", 224, 800, 40, 64)
    assert (gpu.blr, gpu.weight_decay, gpu.mask_ratio, gpu.min_lr) == (1.5e-4, 0.05, 0.75, 0.0)
    args = config_from_args(["--model", "tiny", "--input-size", "48", "--norm-pix-loss", "--accum-iter", "2"])
    args = resolve_config(args, cuda=False)
    assert (args.model, args.input_size, args.norm_pix_loss, args.accum_iter) == ("mae_vit_tiny_test", 48, True, 2)


@pytest.mark.parametrize("field, value, match", [
    ("mask_ratio", 1.0, "mask-ratio"), ("batch_size", 0, "batch-size"), ("dtype", "int8", "dtype"),
    ("impl", "fast", "impl"), ("epochs", -1, "epochs"), ("model", "vit_xxl", "unknown model"),
    ("seed", -1, r"--seed must be in \[0, 2\*\*32\)"), ("seed", 2 ** 32, r"--seed must be in .*got 4294967296"),
    ("lr", float("nan"), "--lr must be a finite number"),
    ("clip_grad", float("nan"), "--clip-grad must be a number > 0"), ("accum_iter", 0, "accum-iter"),
    ("clip_grad", 0.0, "--clip-grad must be a number > 0")])  # else refused by the step, after the folder
def test_bad_options_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(TrainConfig(**{field: value}), cuda=False)


@pytest.mark.parametrize("kw, match", [
    (dict(max_steps=0), "--max-steps must be a finite number > 0"),
    (dict(synthetic_size=0), "--synthetic-size must be a finite number > 0"),
    (dict(log_every=0), "--log-every must be a finite number > 0"),  # else a ZeroDivisionError at step 1
    (dict(workers=-1), "--workers must be a finite number >= 0"),
    (dict(lr=0.0), "--lr must be a finite number > 0"),
    (dict(blr=0.0), "--blr must be a finite number > 0"),  # as --lr: a run that learns nothing
    (dict(data=""), "--data must be an image folder or 'synthetic', got ''"),  # (not the working folder)
    (dict(model="tiny", input_size=36), "--input-size must be a multiple of mae_vit_tiny_test's patch size 8, got 36"),
    (dict(fsdp=True, dtype="fp16"), "--fsdp with --dtype float16 is not supported"),
    (dict(impl="reference", grad_checkpointing=True), "--grad-checkpointing checkpoints .* --impl reference"),
    (dict(overwrite=True, resume="auto"), "--overwrite starts the run in --output-dir over, --resume auto"),
    (dict(save=False, keep_every_epochs=1), "--keep-every-epochs write checkpoints, --no-save writes none"),
    (dict(save=False, save_every_steps=2), "--save-every-steps write checkpoints, --no-save writes none"),
    (dict(save_every_steps=-2), "--save-every-steps must be a finite number >= 0"),
    (dict(keep_every_epochs=-1), "--keep-every-epochs must be a finite number >= 0"),
    (dict(warmup_epochs=-1.0), "--warmup-epochs must be a finite number >= 0"),
    (dict(dist_timeout=2e9), "--dist-timeout must be at most 1e\\+09 seconds, got 2000000000.0"),
    (dict(dist_timeout=-1.0), "--dist-timeout must be a finite number > 0"),
    (dict(data="/imagenet/train", synthetic_size=8, explicit=("synthetic_size",)),
     "--synthetic-size is the size of --data synthetic"),
    # a floor above the peak: the cosine climbed from the peak to 10x it
    (dict(lr=1e-3, min_lr=1e-2), r"--min-lr 0.01 is above the peak learning rate 0.001 \(--lr\)"),
    (dict(batch_size=64, blr=1e-3, min_lr=1e-3), r"--min-lr 0.001 is above .* 0.00025 \(--blr 0.001 x 64 / 256\)"),
    (dict(blr=1e40), r"the peak learning rate .* \(--blr 1e\+40 x 32 / 256\) is beyond float32's range"),
    (dict(warmup_epochs=5.0, epochs=1), "--warmup-epochs 5 is beyond --epochs 1: the learning rate would never"),
    (dict(impl="reference", fused="block"), "--fused block runs maefast's fast path .* --impl reference"),
    (dict(synthetic_size=10 ** 23), r"--synthetic-size must be < 2\*\*63"),
    (dict(model="tiny", input_size=2 ** 40), r"--input-size 1099511627776 makes .* patches per image; at most"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_bad_options_and_combinations_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(TrainConfig(**kw), cuda=False)


def test_auto_defaults_follow_the_machine(monkeypatch):
    """Loader workers by the CPUs (none on a small CPU machine; per process of this machine, one core left, at
    most 10 on a GPU: `node_share`, the union of the CPU masks of the run's processes on each machine, so that two
    machines of 8 GPUs count 8 processes each, and a launcher that binds each process to its own CPUs (torchrun's
    --numa-binding) leaves the others' CPUs counted); the synthetic set on a GPU is 200 global batches
    (accumulation and processes included); the dtype's short spellings are recorded by their names; the warm-up is
    5% of the epochs."""
    from maefast.train import config

    for cpus, want in ((4, 0), (5, 2)):
        monkeypatch.setattr(config, "cpu_mask", lambda: set(range(cpus)))
        assert resolve_config(TrainConfig(), cuda=False).workers == want
    for cpus, world, want in ((16, 2, 7), (64, 1, 10), (2, 2, 1)):
        monkeypatch.setattr(config, "cpu_mask", lambda: set(range(cpus)))
        assert resolve_config(TrainConfig(device="cuda"), world_size=world, cuda=True).workers == want
    shared = [("a", range(64))] * 8 + [("b", range(64))] * 8  # two machines, one container mask each
    bound = [("a", range(28 * i, 28 * (i + 1))) for i in range(8)]  # each process bound to 28 CPUs of its own
    srun = [("a", range(12 * i, 12 * (i + 1))) for i in range(4)] + [("b", range(12 * i, 12 * (i + 1)))
                                                                      for i in range(4)]
    for entries, node, own, want in ((shared, (64, 8), 64, 7), (bound, (224, 8), 28, 10), (srun, (48, 4), 12, 10),
                                     (shared, (64, 8), 4, 3)):  # the last: this process bound to 4 CPUs of them
        monkeypatch.setattr(config, "cpu_mask", lambda: set(range(own)))
        assert config.node_share(entries, "a") == node
        assert resolve_config(TrainConfig(device="cuda"), world_size=len(entries), cuda=True, node=node).workers == \
            want
    monkeypatch.undo()
    assert 1 <= len(config.cpu_mask()) <= (os.cpu_count() or 1)
    gpu = resolve_config(TrainConfig(device="cuda", batch_size=8, accum_iter=2), world_size=2, cuda=True)
    assert gpu.synthetic_size == 200 * 8 * 2 * 2
    assert [resolve_config(TrainConfig(dtype=d), cuda=False).dtype for d in ("fp32", "bf16", "fp16")] == [
        "float32", "bfloat16", "float16"]
    assert resolve_config(TrainConfig(epochs=20), cuda=False).warmup_epochs == pytest.approx(1.0)
    # a GPU without bf16 (before Ampere) trains in fp32 by default, not in a bf16 it emulates slowly
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_config(TrainConfig(device="cuda"), cuda=True).dtype == "float32"


def test_output_dir_inside_data_is_refused_and_beside_it_is_not(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for out in (data, data / "run"):
        with pytest.raises(ValueError, match="is inside --data"):
            resolve_config(TrainConfig(data=str(data), output_dir=str(out)), cuda=False)
    # a sibling whose name starts with the data folder's is elsewhere
    assert resolve_config(TrainConfig(data=str(data), output_dir=str(tmp_path / "images-run")), cuda=False)


def test_what_counts_as_set(tmp_path):
    """The resume contract's "options you set": on the command line each flag given (its value the default or
    not); in Python the fields that differ from the defaults and every keyword override, whatever its value."""
    from pathlib import Path

    from maefast.train.config import as_config

    assert config_from_args(["--seed", "0", "--epochs", "3"]).explicit == ("epochs", "seed")
    assert config_from_args([]).explicit == ()
    assert as_config(TrainConfig(seed=0, epochs=3), {}).explicit == ("epochs",)
    assert as_config(TrainConfig(epochs=3), {"seed": 0}).explicit == ("epochs", "seed")
    # a config that says what was set (the command line's): its overrides are set too
    assert as_config(config_from_args(["--epochs", "3"]), {"seed": 0}).explicit == ("epochs", "seed")
    cfg = as_config(None, {"resume": Path(tmp_path / "ck.pth"), "cuda_graph": False})
    assert cfg.resume == str(tmp_path / "ck.pth") and cfg.cuda_graph is False  # a bool: older runs' value


def test_lr_schedule_past_its_end_and_without_a_cosine_span():
    """`lr_at` (public: maefast.train.lr_at) past the last epoch stays at min_lr instead of climbing back up
    the cosine; a schedule whose warm-up is the whole run (warmup_epochs == epochs) has no cosine to follow:
    after it, the peak lr (not min_lr, and no ZeroDivisionError); without a warm-up the run starts at the peak."""
    lr, min_lr = 1e-3, 1e-5
    for e in (10.0, 10.25, 12.0, 19.0):
        assert schedule.lr_at(e, lr, 1, 10, min_lr) == pytest.approx(min_lr, rel=1e-9)
    assert schedule.lr_at(9.75, lr, 1, 10, min_lr) == pytest.approx(official_lr(9.75, lr, 1, 10, min_lr))
    assert schedule.lr_at(1.5, lr, 2, 2, min_lr) == pytest.approx(official_lr(1.5, lr, 2, 2, min_lr))  # warm-up
    for e in (2.0, 2.5):
        assert schedule.lr_at(e, lr, 2, 2, min_lr) == lr
    assert schedule.lr_at(0.0, lr, 0, 10, min_lr) == pytest.approx(lr)  # --warmup-epochs 0: the peak at once


def test_bad_recipe_arguments_name_themselves():
    """The recipe's public functions (the README's TrainStep example uses them) refuse what torch would take and
    train wrongly with: a NaN or negative weight decay (torch's AdamW checks only its default: NaN filled every
    decayed weight with NaN), a weight decay as a string (a TypeError deep in the first step), a negative epoch
    (a negative lr), a negative blr."""
    model = torch.nn.Linear(2, 2)
    for bad, err in ((float("nan"), ValueError), (-0.05, ValueError), ("0.05", TypeError), (None, TypeError)):
        with pytest.raises(err, match="weight_decay must be"):
            schedule.param_groups_weight_decay(model, bad)
    assert schedule.param_groups_weight_decay(model, 0)[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1.0"):
        schedule.lr_at(-1.0, 1e-3, 1, 10)
    with pytest.raises(ValueError, match="blr must be"):
        schedule.scaled_lr(-1.5e-4, 256)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="effective_batch must be an int >= 1"):
            schedule.scaled_lr(1.5e-4, bad)
    assert schedule.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_adjust_learning_rate_fills_a_tensor_lr_in_place():
    """A captured (CUDA-graph) step reads each group's lr tensor where the graph recorded it: the schedule
    must write into that tensor, not replace it with a float the graph never sees."""
    p1, p2 = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    # one tensor per group, as TrainStep's capture makes them (a tensor given as the optimizer's default is shared)
    opt = torch.optim.AdamW([{"params": [p1], "lr": torch.tensor(1.0)},
                             {"params": [p2], "lr": torch.tensor(1.0), "lr_scale": 0.25}])
    tensors = [g["lr"] for g in opt.param_groups]
    got = schedule.adjust_learning_rate(opt, 3.0, 1e-3, 1, 5, 1e-5)
    assert got == pytest.approx(official_lr(3.0, 1e-3, 1, 5, 1e-5))
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, tensors))
    assert [float(t) for t in tensors] == pytest.approx([got, got * 0.25])


def test_param_groups_leave_frozen_tensors_out_and_honour_skip_list():
    """timm 0.3.2 add_weight_decay, as the official main_pretrain.py calls it: frozen tensors (the sin-cos
    pos_embed) are not optimised at all; names in skip_list are not decayed whatever their rank; the decayed
    group carries the weight decay asked for."""
    model = create_model("mae_vit_tiny_test")
    no_decay, decay = schedule.param_groups_weight_decay(model, 0.3, skip_list=("mask_token",))
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.3)
    named = dict(model.named_parameters())
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert id(named["mask_token"]) in ids(no_decay) and id(named["cls_token"]) in ids(decay)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen and not frozen & (ids(no_decay) | ids(decay))
    assert len(ids(no_decay) | ids(decay)) == sum(p.requires_grad for p in model.parameters())


def test_adjust_learning_rate_with_one_tensor_lr_shared_by_the_groups():
    """torch.optim gives every group the same tensor when the default lr is a tensor (lr=torch.tensor(...), as
    for a capturable or fused AdamW): each group must still get lr x its own lr_scale."""
    p1, p2 = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([{"params": [p1]}, {"params": [p2], "lr_scale": 0.25}], lr=torch.tensor(1.0))
    got = schedule.adjust_learning_rate(opt, 3.0, 1e-3, 1, 5, 1e-5)
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([got, got * 0.25])
