// The output's optional smoothing (include/timar.h, timar_sdk/runtime/smoothing.py): per motion
// region a causal one-pole low-pass filter with a time constant in seconds, in float32:
//   y[t] = y[t-1] + a * (x[t] - y[t-1]),   a = (float)(1 - exp(-1 / (fps * tau)))
// and y[t] = x[t] exactly where tau = 0. Its state is the last output frame, carried across turns.
#pragma once

#include <array>
#include <cstddef>
#include <string>

#include "timar.h"

namespace timar {

constexpr double kSmoothingMaxSeconds = TIMAR_SMOOTHING_MAX_SECONDS;

// The smoothed regions of a motion frame (timar_sdk.layout EXP, JAW, NECK), in the order of
// SmoothingTaus::seconds.
struct SmoothingRegion {
  const char* name;
  size_t begin, end;
};
constexpr SmoothingRegion kSmoothingRegions[3] = {{"expression", 0, 50}, {"jaw", 50, 53}, {"neck", 53, 56}};

// A time constant per region of kSmoothingRegions, in seconds; 0 = that region is not smoothed.
struct SmoothingTaus {
  std::array<double, 3> seconds{};
  bool operator==(const SmoothingTaus& o) const { return seconds == o.seconds; }
  bool operator!=(const SmoothingTaus& o) const { return !(*this == o); }
  // "off", or e.g. "expression 0.12 s, jaw 0.04 s, neck 0 s", for messages.
  std::string describe() const;
};

// A time constant the runtimes accept: finite, in [0, kSmoothingMaxSeconds].
bool valid_tau(double seconds);

// The filter's state: the last output frame, once a turn has been smoothed since create/reset.
struct SmoothingState {
  bool started = false;
  std::array<float, 56> last{};
};

class SmoothingFilter {
 public:
  SmoothingFilter() = default;   // off
  SmoothingFilter(const SmoothingTaus& taus, int fps);
  const SmoothingTaus& taus() const { return taus_; }
  bool on() const { return on_; }
  // Filters one turn's frames [frames, 56] in place, continuing from `state` and updating it.
  void apply(float* motion, size_t frames, SmoothingState& state) const;

 private:
  SmoothingTaus taus_;
  bool on_ = false;
  std::array<float, 56> a_{};   // per dimension; 1 = passes through exactly
};

}  // namespace timar
