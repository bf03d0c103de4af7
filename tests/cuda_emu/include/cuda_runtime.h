// The CPU emulation's stand-in for CUDA's <cuda_runtime.h> (tests/cuda_emu).
#pragma once
#include "cuda_emu.h"
