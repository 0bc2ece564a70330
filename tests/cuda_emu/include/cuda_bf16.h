// Stand-in for the CUDA toolkit header of the same name (CPU emulation harness).
#pragma once
#include "../cuda_emu.h"
