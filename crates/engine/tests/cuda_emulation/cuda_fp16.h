// Emulation of CUDA's half type (cuda_emulation.h): IEEE binary16 by way of GCC's _Float16.
#pragma once
#include <cstdint>
struct __half {
  _Float16 v;
};
inline float __half2float(__half x) { return (float)x.v; }
inline __half __float2half(float x) { return __half{(_Float16)x}; }
