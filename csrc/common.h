// Shared helpers for maefast._C: CUDA error checking that becomes a Python exception carrying the
// CUDA error name, and self-registration of each op's bindings (no shared binding file to edit).
#pragma once

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace maefast {

// Raised to Python as maefast._C.CudaError (a RuntimeError subclass).
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void check_cuda(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) {
    // reset the runtime's last-error state (a non-sticky error, e.g. an invalid device or a missing kernel
    // image): left set, the next launch check anywhere (another op's, or torch's) would report it as its own
    (void)cudaGetLastError();
    throw CudaError(std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status) + " (in " + what +
                    " at " + file + ":" + std::to_string(line) + ")");
  }
}

using Registrar = void (*)(pybind11::module_&);
std::vector<std::pair<const char*, Registrar>>& registry();
struct RegisterBindings {
  RegisterBindings(const char* name, Registrar f) { registry().emplace_back(name, f); }
};

// Device pointers, streams and sizes cross the boundary as Python ints.
template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace maefast

#define MAEFAST_CUDA_CHECK(expr) ::maefast::check_cuda((expr), #expr, __FILE__, __LINE__)
// After a launch: configuration errors surface at once, asynchronous ones at the next sync.
#define MAEFAST_LAUNCH_CHECK() ::maefast::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

#define MAEFAST_REGISTER(NAME)                                                                   \
  static void maefast_bind_##NAME(pybind11::module_& m);                                        \
  static ::maefast::RegisterBindings maefast_register_##NAME(#NAME, &maefast_bind_##NAME);      \
  static void maefast_bind_##NAME(pybind11::module_& m)
