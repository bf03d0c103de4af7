// Runtime/driver versions, device count and properties, synchronisation: the first real
// functions of maefast._C, and what the GPU check records about the card.
#include "common.h"

namespace py = pybind11;

namespace {

int runtime_version() {
  int v = 0;
  MAEFAST_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

int driver_version() {
  int v = 0;
  MAEFAST_CUDA_CHECK(cudaDriverGetVersion(&v));
  return v;
}

int device_count() {
  int n = 0;
  cudaError_t st = cudaGetDeviceCount(&n);
  // No driver or no device is "zero devices", not an error, so CPU-only machines import cleanly.
  if (st == cudaErrorNoDevice || st == cudaErrorInsufficientDriver) {
    cudaGetLastError();
    return 0;
  }
  MAEFAST_CUDA_CHECK(st);
  return n;
}

py::dict device_properties(int device) {
  int n = device_count();
  if (device < 0 || device >= n) {
    throw py::value_error("device must be in [0, " + std::to_string(n) + "), got " + std::to_string(device));
  }
  cudaDeviceProp p;
  MAEFAST_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  int clock_khz = 0, mem_clock_khz = 0, bus_width = 0;
  MAEFAST_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
  MAEFAST_CUDA_CHECK(cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, device));
  MAEFAST_CUDA_CHECK(cudaDeviceGetAttribute(&bus_width, cudaDevAttrGlobalMemoryBusWidth, device));
  py::dict d;
  d["name"] = std::string(p.name);
  d["major"] = p.major;
  d["minor"] = p.minor;
  d["multi_processor_count"] = p.multiProcessorCount;
  d["total_memory"] = static_cast<std::uint64_t>(p.totalGlobalMem);
  d["l2_cache_size"] = p.l2CacheSize;
  d["shared_memory_per_block_optin"] = static_cast<std::uint64_t>(p.sharedMemPerBlockOptin);
  d["shared_memory_per_multiprocessor"] = static_cast<std::uint64_t>(p.sharedMemPerMultiprocessor);
  d["registers_per_multiprocessor"] = p.regsPerMultiprocessor;
  d["warp_size"] = p.warpSize;
  d["clock_rate_khz"] = clock_khz;
  d["memory_clock_rate_khz"] = mem_clock_khz;
  d["memory_bus_width"] = bus_width;
  return d;
}

void synchronize(int device) {
  int prev = 0;
  MAEFAST_CUDA_CHECK(cudaGetDevice(&prev));
  MAEFAST_CUDA_CHECK(cudaSetDevice(device));
  const cudaError_t st = cudaDeviceSynchronize();
  MAEFAST_CUDA_CHECK(cudaSetDevice(prev));  // leave the caller's (torch's) current device as it was
  MAEFAST_CUDA_CHECK(st);
}

std::string error_name(int code) { return cudaGetErrorName(static_cast<cudaError_t>(code)); }

// Raises CudaError for a given status; lets tests check the error path without a GPU fault.
void raise_for_status(int code) { MAEFAST_CUDA_CHECK(static_cast<cudaError_t>(code)); }

}  // namespace

MAEFAST_REGISTER(device) {
  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension runs with (e.g. 13000)");
  m.def("driver_version", &driver_version, "CUDA version the installed driver supports (0 without a driver)");
  m.def("device_count", &device_count, "Number of CUDA devices (0 without a driver or device)");
  m.def("device_properties", &device_properties, py::arg("device") = 0, "Properties of one CUDA device");
  m.def("synchronize", &synchronize, py::arg("device") = 0);
  m.def("error_name", &error_name, py::arg("code"));
  m.def("raise_for_status", &raise_for_status, py::arg("code"));
}
