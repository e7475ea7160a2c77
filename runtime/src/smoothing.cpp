#include "smoothing.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace timar {
namespace {

// The shortest of %g and %.17g that reads back as v.
std::string seconds_text(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  if (std::strtod(b, nullptr) != v) std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}

}  // namespace

std::string SmoothingTaus::describe() const {
  if (*this == SmoothingTaus()) return "off";
  std::string out;
  for (size_t r = 0; r < seconds.size(); ++r)
    out += std::string(r ? ", " : "") + kSmoothingRegions[r].name + " " + seconds_text(seconds[r]) + " s";
  return out;
}

bool valid_tau(double seconds) { return std::isfinite(seconds) && seconds >= 0.0 && seconds <= kSmoothingMaxSeconds; }

SmoothingFilter::SmoothingFilter(const SmoothingTaus& taus, int fps) : taus_(taus) {
  a_.fill(1.0f);
  for (size_t r = 0; r < taus.seconds.size(); ++r) {
    const double tau = taus.seconds[r];
    if (tau == 0.0) continue;
    on_ = true;
    // In double, then rounded to float32, as numpy's np.float32(1.0 - math.exp(...)).
    const float a = float(1.0 - std::exp(-1.0 / (double(fps) * tau)));
    const SmoothingRegion& region = kSmoothingRegions[r];
    std::fill(a_.begin() + std::ptrdiff_t(region.begin), a_.begin() + std::ptrdiff_t(region.end), a);
  }
}

void SmoothingFilter::apply(float* motion, size_t frames, SmoothingState& state) const {
  if (!on_ || frames == 0) return;
  if (!state.started) {   // the first frame of a conversation passes through: y[-1] = x[0]
    std::copy_n(motion, 56, state.last.begin());
    state.started = true;
  }
  for (size_t t = 0; t < frames; ++t) {
    float* x = motion + t * 56;
    for (size_t i = 0; i < 56; ++i) {
      // a == 1 also where a tiny tau rounds it to 1: exactly as generated, as in Python.
      if (a_[i] != 1.0f) x[i] = state.last[i] + a_[i] * (x[i] - state.last[i]);
      state.last[i] = x[i];
    }
  }
}

}  // namespace timar
