"""Device seeds (masking readable inside a CUDA graph) and the captured training step."""
import os

import pytest
import torch

from maefast import ops


def test_device_seed_kernel_path_is_bit_exact_with_int_seed():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel runs on the CPU only under TRITON_INTERPRET=1")
    from maefast.kernels.masking import random_masking_triton

    for seed in (0, 1, 2**31 + 7, 2**62 + 11):
        a = random_masking_triton(3, 50, 12, None, seed, 17, torch.device("cpu"))
        b = random_masking_triton(3, 50, 12, None, 0, 17, torch.device("cpu"),
                                  seed_tensor=torch.tensor([seed], dtype=torch.int64))
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_seed_tensor_validation():
    with pytest.raises(ValueError, match="1-element int64 tensor"):
        ops.random_masking(2, 16, 0.75, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1-element int64 tensor"):
        ops.random_masking(2, 16, 0.75, seed=torch.tensor([1], dtype=torch.int32))
    a = ops.random_masking(2, 16, 0.75, seed=torch.tensor([5]))
    b = ops.random_masking(2, 16, 0.75, seed=5)
    assert torch.equal(a.ids_keep, b.ids_keep)


def test_graph_step_rejects_cpu_and_reference():
    from maefast.graphs import CUDAGraphTrainStep
    from maefast.models import create_model

    m = create_model("tiny")
    opt = torch.optim.AdamW(m.parameters())
    with pytest.raises(ValueError, match="CUDA tensor"):
        CUDAGraphTrainStep(m, opt, torch.randn(2, 3, 32, 32))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda", "reference"])
def test_gpu_device_seed_equals_int_seed(impl):
    dev = torch.device("cuda")
    for seed in (3, 2**40 + 5):
        a = ops.random_masking(4, 196, 0.75, seed=seed, offset=7, device=dev, impl=impl)
        b = ops.random_masking(4, 196, 0.75, seed=torch.tensor([seed], device=dev), offset=7, device=dev, impl=impl)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_masking_in_a_cuda_graph_draws_fresh_masks(impl):
    dev = torch.device("cuda")
    seed = torch.tensor([10], device=dev)
    ops.random_masking(2, 64, 0.75, seed=seed, device=dev, impl=impl)  # compile before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        seed.add_(1)
        out = ops.random_masking(2, 64, 0.75, seed=seed, device=dev, impl=impl)
    for expect_seed in (11, 12):  # capture records the add_ without running it
        g.replay()
        ref = ops.random_masking(2, 64, 0.75, seed=expect_seed, device=dev, impl=impl)
        assert torch.equal(out.ids_keep, ref.ids_keep) and torch.equal(out.mask, ref.mask)


def _assert_params_close(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if n.endswith("qkv.bias"):
            # the key bias's true gradient is 0 (softmax is shift-invariant): AdamW turns its rounding
            # noise into full-size steps, so compare only the query and value thirds
            d = p.shape[0] // 3
            p, q = torch.cat([p[:d], p[2 * d:]]), torch.cat([q[:d], q[2 * d:]])
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-5), n


@pytest.mark.cuda
def test_gpu_captured_step_matches_eager_steps():
    from maefast.graphs import CUDAGraphTrainStep
    from maefast.models import MaskedAutoencoderViT

    cfg = dict(img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=2, decoder_embed_dim=64,
               decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    torch.manual_seed(0)
    a = MaskedAutoencoderViT(**cfg).cuda()
    b = MaskedAutoencoderViT(**cfg).cuda()
    b.load_state_dict(a.state_dict())
    imgs = [torch.randn(4, 3, 64, 64, device="cuda") for _ in range(3)]
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, capturable=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, capturable=True)
    step = CUDAGraphTrainStep(a, opt_a, imgs[0], seed=100, autocast_dtype=None, warmup_steps=2)
    # building the step trained nothing (the warm-up is undone): replay k draws seed 100 + k, and the
    # eager twin takes the same seeds and batches
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    for i, s in enumerate((100, 101, 102)):
        la = step(imgs[i]).clone()
        opt_b.zero_grad(set_to_none=True)
        lb = b(imgs[i], 0.75, seed=torch.tensor([s], device="cuda"), return_pred=False)[0]
        lb.backward()
        opt_b.step()
        assert torch.allclose(la, lb.detach(), rtol=1e-4, atol=1e-6), (i, la.item(), lb.item())
    _assert_params_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, "block"])
def test_gpu_captured_step_with_noise_and_lr_schedule(fused):
    """example_noise= (masks from the caller's noise) and set_lr: replays equal eager AdamW steps."""
    from maefast.graphs import CUDAGraphTrainStep
    from maefast.models import MaskedAutoencoderViT

    cfg = dict(img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=2, decoder_embed_dim=64,
               decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True, fused=fused)
    torch.manual_seed(0)
    a = MaskedAutoencoderViT(**cfg).cuda()
    b = MaskedAutoencoderViT(**cfg).cuda()
    b.load_state_dict(a.state_dict())
    imgs = [torch.randn(4, 3, 64, 64, device="cuda") for _ in range(3)]
    noise = [torch.rand(4, 64, device="cuda") for _ in range(3)]
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, capturable=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3)
    step = CUDAGraphTrainStep(a, opt_a, imgs[0], example_noise=noise[0], autocast_dtype=None)
    for i, lr in enumerate((1e-3, 5e-4, 2e-4)):
        step.set_lr(lr)
        la = step(imgs[i], noise[i]).clone()
        for g in opt_b.param_groups:
            g["lr"] = lr
        opt_b.zero_grad(set_to_none=True)
        lb = b(imgs[i], 0.75, noise=noise[i], return_pred=False)[0]
        lb.backward()
        opt_b.step()
        assert torch.allclose(la, lb.detach(), rtol=1e-4, atol=1e-6), (i, la.item(), lb.item())
    _assert_params_close(a, b)
    with pytest.raises(ValueError, match="pass noise="):
        step(imgs[0])


def test_graph_step_snapshot_restore_and_set_lr_on_cpu():
    """The warm-up undo and set_lr of CUDAGraphTrainStep are plain tensor code: checked here on the
    CPU on an instance built without its CUDA constructor."""
    from maefast.graphs import CUDAGraphTrainStep
    from maefast.models import create_model

    torch.manual_seed(0)
    m = create_model("tiny")
    opt = torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-3), foreach=False)
    opt.param_groups[0]["lr_scale"] = 0.5
    step = CUDAGraphTrainStep.__new__(CUDAGraphTrainStep)
    step.optimizer = opt

    def train_once():
        opt.zero_grad()
        m(torch.randn(2, 3, 32, 32), seed=1, return_pred=False)[0].backward()
        opt.step()

    fresh = {n: p.detach().clone() for n, p in m.named_parameters()}
    saved = step._snapshot()  # no optimizer state yet
    train_once()
    step._restore(saved)
    for n, p in m.named_parameters():
        assert torch.equal(p, fresh[n]), n
    for st in opt.state.values():  # state created by the warm-up starts from zero, like a fresh AdamW
        assert all(not v.any() for v in st.values() if isinstance(v, torch.Tensor))
    train_once()
    after_one = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()}
    params_one = [p.detach().clone() for p in m.parameters()]
    saved = step._snapshot()
    train_once()
    step._restore(saved)
    for p, q in zip(m.parameters(), params_one):
        assert torch.equal(p, q)
    for p in m.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(v, after_one[p][k]), k
    step.set_lr(2e-4)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(1e-4)
