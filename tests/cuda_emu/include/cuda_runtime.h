// CUDA emulator shim: cuda_runtime.h is cuda_runtime_api.h plus the device builtins.
#pragma once
#include "cuda_runtime_api.h"
