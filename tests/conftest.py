"""Test setup: CPU-only machines run Triton kernels under the interpreter, and maefast's CUDA C++ kernels
under a CPU emulation (tests/cuda_emu) in the tests parametrized impl="cuda" on the `device` fixture's
tensors; other `cuda`-marked tests skip with the reason when no GPU is present; tests taking the `device`
fixture (the kernels on CUDA when present, else the CPU) are marked `device`."""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    # Must be set before triton.jit decorates anything (kernels/ import triton lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Fresh allocations start poisoned (NaN / 0xA5 bytes), as a GPU's recycled memory is never zeros: a
    # kernel leaving part of a torch.empty output unwritten, or reading it first, shows (tests/poison_alloc.py).
    if os.environ.get("MAEFAST_POISON_EMPTY", "1") != "0":
        from poison_alloc import install as poison_allocations

        poison_allocations()
    # Interpreted kernels address raw host memory one program at a time: an access outside every tensor
    # argument, or two programs of a launch racing, pass silently there and not on a GPU. Checked on
    # every interpreted launch (tests/triton_memcheck.py).
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton  # noqa: F401
    except ImportError:  # the tests of maefast without triton
        return
    if os.environ.get("MAEFAST_MEMCHECK", "1") != "0":
        from triton_memcheck import install

        install()
    # The interpreter computes on bf16 values' raw bits (tl.dot, casts, comparisons) and truncates fp32 ->
    # bf16: patched to compute as a GPU does, so the bf16 paths are tested here too (tests/triton_bf16.py).
    if os.environ.get("MAEFAST_INTERP_BF16", "1") != "0":
        from triton_bf16 import install as bf16_as_on_a_gpu

        bf16_as_on_a_gpu()


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown (and ignored) without it
def pytest_xdist_auto_num_workers(config):
    """`-n auto` on a GPU machine: at most 8 workers (each holds a CUDA context and the `cuda` tests'
    paper-sized tensors; scripts/gpu_check.py's tests step runs 8 too). Elsewhere, or with
    PYTEST_XDIST_AUTO_NUM_WORKERS set, xdist's own rule (a worker per core)."""
    if not _HAS_CUDA or os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8)


def pytest_collection_modifyitems(config, items):
    for item in items:  # `-m device` selects them (scripts/gpu_check.py's kernels preset, on a card)
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker("device")
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" not in item.keywords:
            continue
        if _emulated_cuda_case(item) and os.environ.get("MAEFAST_CUDA_EMU", "1") != "0":
            item.add_marker("cuda_emu")
        else:
            item.add_marker(skip)


def _emulated_cuda_case(item) -> bool:
    """A test parametrized impl="cuda" on the `device` fixture's tensors, with no other need of a GPU (no
    `cuda` mark of its own, its class's or its module's): without a GPU it runs maefast's CUDA C++
    kernels under the CPU emulation (tests/cuda_emu) on CPU tensors."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("impl") != "cuda" or "device" not in getattr(item, "fixturenames", ()):
        return False
    owners = (getattr(item, "function", None), getattr(item, "cls", None), getattr(item, "module", None))
    marks = [getattr(o, "pytestmark", []) for o in owners if o is not None]
    return not any(m.name == "cuda" for ms in marks for m in (ms if isinstance(ms, list) else [ms]))


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """For a `cuda_emu` test: the emulated extension in place of maefast._C, and its launches counted (a
    test of impl="cuda" that launched no kernel fails, as one of impl="triton"; see makereport)."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    import cuda_emu

    mod = cuda_emu.module()
    if mod is None:
        if cuda_emu.error() and "no host C++ compiler" not in cuda_emu.error():
            pytest.fail(f"the CUDA emulation did not build: {cuda_emu.error()}")
        pytest.skip(f"needs a CUDA GPU or the CUDA emulation ({cuda_emu.error()})")
    with cuda_emu.installed():
        request.node._maefast_emu = (mod, mod.launches())
        yield


# Triton launches run by the interpreter in this process (counted where the interpreter runs a launch's
# grid, whatever the memory checker does): a test parametrized impl="triton" must launch one.
_LAUNCHES = [0]


def _count_interpreted_launches() -> bool:
    try:
        from triton.runtime import interpreter as itp
    except ImportError:  # the tests of maefast without triton
        return False
    ge = itp.GridExecutor
    if getattr(ge.__call__, "_maefast_counts", False):
        return True
    call = ge.__call__

    def counted(self, *args, **kwargs):
        _LAUNCHES[0] += 1
        return call(self, *args, **kwargs)

    counted._maefast_counts = True
    ge.__call__ = counted
    return True


def _asks_for_triton(item) -> bool:
    """Whether a test is parametrized to run the Triton backend (a parameter whose value is "triton")."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, str) and v == "triton" for v in params.values())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """Starts counting a test's Triton launches, its fixtures' included (see pytest_runtest_makereport)."""
    counting = os.environ.get("TRITON_INTERPRET") == "1" and _asks_for_triton(item) and _count_interpreted_launches()
    item._maefast_launch_base = _LAUNCHES[0] if counting else None
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    base = getattr(item, "_maefast_launch_base", None)
    item._maefast_launches = None if base is None else _LAUNCHES[0] - base
    emu = getattr(item, "_maefast_emu", None)
    if emu is not None:  # an impl="cuda" test under the CUDA emulation: its kernel launches, like Triton's
        item._maefast_launches = (item._maefast_launches or 0) + emu[0].launches() - emu[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test parametrized impl="triton" (any parameter valued "triton") that passed without launching a
    Triton kernel under the interpreter fails: a dispatch that quietly ran the reference instead would
    compare the reference with itself and pass. A test whose "triton" case checks a refusal, or runs on
    meta tensors (nothing launches), says so with @pytest.mark.no_triton_launch. The same for a test of
    impl="cuda" under the CUDA emulation (a kernel of maefast._C must launch)."""
    outcome = yield
    rep = outcome.get_result()
    if (call.when == "call" and rep.passed and getattr(item, "_maefast_launches", None) == 0
            and item.get_closest_marker("no_triton_launch") is None):
        rep.outcome = "failed"
        which = "CUDA C++ (emulated)" if getattr(item, "_maefast_emu", None) else "Triton"
        rep.longrepr = (f"parametrized impl={'cuda' if which != 'Triton' else 'triton'!r}, but no {which} kernel "
                        "was launched: did the op run the reference? (a test of a refusal is marked "
                        "@pytest.mark.no_triton_launch)")


@pytest.fixture
def device():
    """The device kernels are tested on: CUDA when present, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (modules opt in with ``usefixtures``): the CPU here is shared,
    and one thread is faster and steadier than two oversubscribed ones."""
    from maefast.timing import torch_threads  # after TRITON_INTERPRET is set above

    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fake_capture(monkeypatch):
    """CPU 'capture' of `maefast.TrainStep` (tests/fake_capture.py); returns the capture function
    (``.made``, ``.fail``)."""
    import fake_capture as fake_capture_lib

    return fake_capture_lib.install(monkeypatch)


@pytest.fixture
def warn_again():
    """SlowPathWarning is once per reason and process: each test starts with none given (modules opt in
    with ``usefixtures``)."""
    from maefast.models import routing

    routing._WARNED.clear()
    yield
    routing._WARNED.clear()
