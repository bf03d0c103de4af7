// Marks the CPU emulation's build of maefast._C (tests/cuda_emu): `emulated` lets maefast's ops take
// impl="cuda" on CPU tensors; `launches` counts kernel launches (a test parametrized impl="cuda" must
// launch one, as an impl="triton" test must launch a Triton kernel).
#include "common.h"

MAEFAST_REGISTER(emulation) {
  m.attr("emulated") = true;
  m.def("launches", []() { return ::cuda_emu::emu().launches; }, "kernel launches run so far in this thread");
}
