// The CPU emulation's stand-in for CUDA's <mma.h> (tests/cuda_emu).
#pragma once
#include "cuda_emu_wmma.h"
