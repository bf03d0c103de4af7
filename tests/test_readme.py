"""The README's examples, as a new user copies them: every Python block runs (on the CPU, with a tiny model
where the README names a GPU-sized one, and the few names a block leaves to the reader defined first), and
every `maefast train` / `maefast visualize` line of its bash blocks parses with the command's own parser.
A renamed function, argument or flag fails here, naming the block."""
import os
import re
import shlex

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(lang: str) -> list[tuple[int, str]]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return [(text[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"^```" + lang + r"\n(.*?)^```", text, re.S | re.M)]


def _block(first_line: str) -> str:
    """The README's Python block that starts with `first_line` (one, exactly)."""
    found = [code for _, code in _blocks("python") if code.startswith(first_line)]
    assert len(found) == 1, f"README: {len(found)} python blocks start with {first_line!r}"
    return found[0]


def _on_cpu(code: str, subs: dict) -> str:
    """`code` with each of `subs` replaced (each must occur: a README edit that drops one updates this test)."""
    for old, new in subs.items():
        assert old in code, f"README block no longer contains {old!r}:\n{code}"
        code = code.replace(old, new)
    return code


def _tiny():
    from maefast.models import mae_vit_tiny_test

    torch.manual_seed(0)
    return mae_vit_tiny_test(norm_pix_loss=True)


def test_readme_python_blocks_are_all_covered():
    firsts = sorted(code.splitlines()[0] for _, code in _blocks("python"))
    assert firsts == sorted(COVERED), "a README python block without a test here (or one removed): " \
                                      f"{sorted(set(firsts) ^ set(COVERED))}"


def test_readme_reference_block():
    ns = {}
    exec(_block("import torch\nfrom maefast.models import mae_vit_base_patch16"), ns)  # as written: CPU
    assert ns["pred"].shape == (2, 196, 768) and ns["mask"].shape == (2, 196) and ns["mask"].sum() == 2 * 147
    assert torch.isfinite(ns["loss"])


def test_readme_ops_block():
    N, L, p, D, Dd = 2, 4, 16, 32, 16
    K = 1  # L * (1 - 0.75)
    ns = dict(N=N, L=L, K=K, step=0, imgs=torch.randn(N, 3, 32, 32), proj=torch.nn.Conv2d(3, D, p, p),
              pos_embed=torch.randn(1, 1 + L, D), qkv=torch.randn(N, K, 3 * D), num_heads=2,
              x_vis=torch.randn(N, 1 + K, Dd), mask_token=torch.randn(1, 1, Dd),
              decoder_pos_embed=torch.randn(1, 1 + L, Dd), pred=torch.randn(N, L, p * p * 3),
              decoder_pred=torch.nn.Linear(Dd, p * p * 3), dec_out=torch.randn(N, 1 + L, Dd))
    exec(_on_cpu(_block("import torch, maefast.ops as ops"), {'device="cuda"': 'device="cpu"'}), ns)
    assert ns["out"].shape == (N, K, D) and ns["x"].shape == (N, 1 + L, Dd)
    assert ns["loss"].shape == () and ns["loss"].requires_grad  # the masked head's loss: decoder_pred trains


def test_readme_fast_model_and_patch_block():
    from maefast.convert import to_transformers_model
    from official_layout import TINY, official_class

    ns = dict(torch=torch, imgs=torch.randn(2, 3, 32, 32), step=0, official_model=official_class()(**TINY),
              hf_vitmae=to_transformers_model(_tiny()))
    exec(_on_cpu(_block("from maefast.models import mae_vit_large_patch16"),
                 {"mae_vit_large_patch16": "mae_vit_tiny_test", ".cuda()": "", '"cuda"': '"cpu"'}), ns)
    assert ns["_"] is None and ns["mask"].shape == (2, 16) and ns["model"].impl == "auto"


def test_readme_compile_block():
    # the compiled graph itself is tests/test_compile.py's (Inductor); here: the block's calls, traced whole
    ns = dict(torch=torch, model=_tiny(), loader=[torch.randn(2, 3, 32, 32) for _ in range(2)])
    try:
        exec(_on_cpu(_block("step = torch.compile(model, fullgraph=True)"),
                     {"fullgraph=True)": 'fullgraph=True, backend="aot_eager")', '"cuda"': '"cpu"'}), ns)
    finally:
        torch._dynamo.reset()
    assert ns["model"].patch_embed.proj.weight.grad is not None


def test_readme_train_step_block(capsys):
    model = _tiny()
    ns = dict(model=model, loader=[(torch.randn(2, 3, 32, 32), 0) for _ in range(2)],
              lr_schedule=lambda it: 1.5e-4 * (it + 1) / 2)
    exec(_on_cpu(_block("import maefast, torch\nfrom maefast.train.schedule import param_groups_weight_decay"),
                 {"imgs.cuda(non_blocking=True)": "imgs"}), ns)
    out = capsys.readouterr().out
    assert out.startswith("0 ") and "TrainStep(" in out and "eager (" in out  # the CPU steps eagerly, says why
    assert ns["step"].optimizer_steps == 2


def test_readme_checkpoints_block(tmp_path):
    model = _tiny()
    path = str(tmp_path / "mae_pretrain_vit_base.pth")
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith("decoder")
                          and k != "mask_token"}}, path)  # an encoder export, as the official release's
    ns = dict(model=_tiny())
    exec(_on_cpu(_block("from maefast.convert import load_official_state_dict"),
                 {'"mae_pretrain_vit_base.pth"': repr(path)}), ns)
    assert torch.equal(ns["model"].patch_embed.proj.weight, model.patch_embed.proj.weight)
    assert torch.equal(ns["model2"].blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


COVERED = ("import torch", "import torch, maefast.ops as ops", "from maefast.models import mae_vit_large_patch16",
           "step = torch.compile(model, fullgraph=True)", "import maefast, torch",
           "from maefast.convert import load_official_state_dict, to_transformers_model, from_transformers_model")


def _cli_lines() -> list[list[str]]:
    """Each `maefast train|visualize ...` command of the README's bash blocks (continuations joined), as argv."""
    lines = []
    for _, code in _blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if "maefast" in argv:
                argv = argv[argv.index("maefast") + 1:]
                if argv and argv[0] in ("train", "visualize"):
                    lines.append(argv)
    return lines


def test_readme_command_lines_parse():
    from maefast.train.config import build_parser as train_parser
    from maefast.visualize import build_parser as visualize_parser

    lines = _cli_lines()
    assert {argv[0] for argv in lines} == {"train", "visualize"}, lines
    for argv in lines:
        parser = train_parser() if argv[0] == "train" else visualize_parser()
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"README: `maefast {' '.join(argv)}` does not parse")
