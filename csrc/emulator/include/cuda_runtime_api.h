// Stands in for the CUDA runtime header when the .cu sources are built for the emulator.
#pragma once
#include "../cuda_emulator.h"
