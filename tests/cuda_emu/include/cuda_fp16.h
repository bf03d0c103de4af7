// The CPU emulation's stand-in for CUDA's <cuda_fp16.h> (tests/cuda_emu).
#pragma once
#include "cuda_emu.h"
