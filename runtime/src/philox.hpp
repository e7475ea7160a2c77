// The portable generator of docs/DESIGN.md 4.1: Philox4x32-10 + Box-Muller, bit for bit the Python
// timar_sdk.runtime.rng.PhiloxNormal (see its module docstring for the stream rule).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace timar {

inline void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n1 = uint32_t(p1);
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    const uint32_t n3 = uint32_t(p0);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// Seed + 128-bit block counter; normal(n) consumes ceil(n/4) blocks, leftovers discarded.
class PhiloxNormal {
 public:
  explicit PhiloxNormal(uint64_t seed = 0, uint64_t counter_lo = 0, uint64_t counter_hi = 0)
      : seed_(seed), lo_(counter_lo), hi_(counter_hi) {}

  uint64_t seed() const { return seed_; }
  uint64_t counter_lo() const { return lo_; }
  uint64_t counter_hi() const { return hi_; }

  void normal(float* out, size_t n) {
    const uint32_t key[2] = {uint32_t(seed_), uint32_t(seed_ >> 32)};
    const double two_pi = 2.0 * 3.14159265358979323846;
    size_t i = 0;
    while (i < n) {
      const uint32_t ctr[4] = {uint32_t(lo_), uint32_t(lo_ >> 32), uint32_t(hi_), uint32_t(hi_ >> 32)};
      uint32_t x[4];
      philox4x32_10(ctr, key, x);
      if (++lo_ == 0) ++hi_;   // 128-bit increment, wraps mod 2^128
      for (int pair = 0; pair < 2; ++pair) {
        const double u1 = (double(x[2 * pair] >> 8) + 0.5) * (1.0 / 16777216.0);
        const double u2 = (double(x[2 * pair + 1] >> 8) + 0.5) * (1.0 / 16777216.0);
        const double r = std::sqrt(-2.0 * std::log(u1));
        const double theta = two_pi * u2;
        if (i < n) out[i++] = float(r * std::cos(theta));
        if (i < n) out[i++] = float(r * std::sin(theta));
      }
    }
  }

 private:
  uint64_t seed_, lo_, hi_;
};

}  // namespace timar
