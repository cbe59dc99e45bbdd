// Small vector helpers shared by the CPU kernels (GCC/Clang vector extensions: AVX-512 registers
// where the CPU has them, narrower ones otherwise; loads and stores need only float alignment).
#pragma once

#include <cstdint>

namespace jlora_cpu {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

// a . b over n floats, summed in two 16-lane accumulators (the reduction is reassociated on purpose).
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  v16 acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 += *reinterpret_cast<const v16*>(a + i) * *reinterpret_cast<const v16*>(b + i);
    acc1 += *reinterpret_cast<const v16*>(a + i + 16) * *reinterpret_cast<const v16*>(b + i + 16);
  }
  for (; i + 16 <= n; i += 16)
    acc0 += *reinterpret_cast<const v16*>(a + i) * *reinterpret_cast<const v16*>(b + i);
  acc0 += acc1;
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc0[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += s * b over n floats.
inline void axpy(float s, const float* __restrict b, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += s * b[i];
}

}  // namespace jlora_cpu
