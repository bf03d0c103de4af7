"""maefast._C: the torch-free CUDA extension (built where nvcc is; its functions work without a GPU)."""
import pytest

from maefast import _cpp_lib
from maefast.ops import choose_impl

C = _cpp_lib.get_C()
needs_C = pytest.mark.skipif(C is None, reason=f"maefast._C not built: {_cpp_lib.load_error}")


@needs_C
def test_versions_and_device_count():
    assert C.cuda_version >= 11000
    assert C.device_count() >= 0
    assert C.driver_version() >= 0
    assert "device" in C.registered


@needs_C
def test_cuda_errors_become_python_exceptions_with_the_name():
    assert issubclass(C.CudaError, RuntimeError)
    with pytest.raises(C.CudaError, match="cudaErrorInvalidValue"):
        C.raise_for_status(1)
    assert C.error_name(2) == "cudaErrorMemoryAllocation"
    C.raise_for_status(0)
    with pytest.raises(ValueError, match="device must be in"):
        C.device_properties(10_000)


@needs_C
@pytest.mark.cuda
def test_device_properties_on_a_gpu():
    import torch

    p = C.device_properties(0)
    assert p["name"] == torch.cuda.get_device_name(0)
    assert p["multi_processor_count"] == torch.cuda.get_device_properties(0).multi_processor_count
    assert C.runtime_version() >= 11000


def test_choose_impl_rules():
    import torch

    cpu = torch.device("cpu")
    assert choose_impl("auto", cpu) == "reference"
    assert choose_impl("reference", cpu) == "reference"
    with pytest.raises(ValueError, match="impl must be one of"):
        choose_impl("fast", cpu)
    with pytest.raises(ValueError, match="impl='cuda' is not available.*CUDA tensors"):
        choose_impl("cuda", cpu, what="test op")
