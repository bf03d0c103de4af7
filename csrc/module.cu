// The maefast._C module: a torch-free pybind11 extension. Each csrc/X.cu registers its own
// bindings with MAEFAST_REGISTER; this file creates the module and runs the registrars.
#include "common.h"

namespace py = pybind11;

namespace maefast {
std::vector<std::pair<const char*, Registrar>>& registry() {
  static std::vector<std::pair<const char*, Registrar>> r;
  return r;
}
}  // namespace maefast

PYBIND11_MODULE(_C, m) {
  m.doc() = "maefast CUDA C++ kernels (raw device pointers, sizes, strides and stream as ints)";
  py::register_exception<maefast::CudaError>(m, "CudaError", PyExc_RuntimeError);
  py::list names;
  for (auto& [name, f] : maefast::registry()) {
    f(m);
    names.append(name);
  }
  m.attr("registered") = names;
  m.attr("cuda_version") = CUDART_VERSION;
}
