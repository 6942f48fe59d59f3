// Small math helpers shared by the C++ CPU kernels (csrc/*.cpp). Header-only, no ATen.
#pragma once

#include <cstdint>
#include <cstring>

namespace tlv_fast {

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, degree-7 Taylor polynomial (relative error
// < 1e-7 < float ulp); branch-free so that loops over it vectorise. exp(-inf) = 0 exactly.
inline float exp_approx(float x) {
  const float lo = -87.0f, hi = 88.5f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  float t = xc * 1.44269504088896341f + 12582912.0f;  // round to nearest via 1.5 * 2^23
  float n = t - 12582912.0f;
  float r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // ln 2 split hi + lo
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667f + r * (0.041666668f + r * (0.008333334f +
            r * (0.0013888889f + r * 0.00019841270f))))));
  int32_t bits = (static_cast<int32_t>(n) + 126) << 23;  // 2^(n-1): n = 128 stays finite
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  float y = p * scale * 2.0f;
  return x < lo ? 0.0f : y;
}
inline double exp_approx(double x) { return std::exp(x); }

// A uniform float in [0, 1) from a 64-bit key and counter (SplitMix64's finaliser): the dropout draws of the CPU
// attention kernels, recomputed in the backward from the same (seed, element index).
inline float uniform_hash(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + counter * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

// Reductions written lane by lane so that they vectorise without -ffast-math (which would also drop the inf/NaN
// semantics the kernels rely on): kLanes partial results, combined at the end.
constexpr int kLanes = 16;

// max_j x[j] (-inf for n = 0)
inline float row_max(const float* x, int64_t n) {
  float acc[kLanes];
  for (int t = 0; t < kLanes; ++t) acc[t] = -__builtin_inff();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int t = 0; t < kLanes; ++t) acc[t] = acc[t] < x[j + t] ? x[j + t] : acc[t];
  float m = -__builtin_inff();
  for (; j < n; ++j) m = m < x[j] ? x[j] : m;
  for (int t = 0; t < kLanes; ++t) m = m < acc[t] ? acc[t] : m;
  return m;
}

// x[j] = exp(x[j] - shift) in place; returns the sum of the new values
inline float exp_shift_sum(float* x, int64_t n, float shift) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int t = 0; t < kLanes; ++t) {
      const float e = exp_approx(x[j + t] - shift);
      x[j + t] = e;
      acc[t] += e;
    }
  float s = 0.0f;
  for (; j < n; ++j) {
    x[j] = exp_approx(x[j] - shift);
    s += x[j];
  }
  for (int t = 0; t < kLanes; ++t) s += acc[t];
  return s;
}

// sum_j x[j] * y[j]
inline float dot(const float* x, const float* y, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int t = 0; t < kLanes; ++t) acc[t] += x[j + t] * y[j + t];
  float s = 0.0f;
  for (; j < n; ++j) s += x[j] * y[j];
  for (int t = 0; t < kLanes; ++t) s += acc[t];
  return s;
}

}  // namespace tlv_fast
