// The streaming session: the per-turn loop of docs/DESIGN.md section 4, as timar_sdk/runtime/session.py.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend.hpp"
#include "bundle.hpp"
#include "philox.hpp"
#include "sampler.hpp"
#include "timar.h"

namespace timar {

// Zero-mean, unit-variance audio normalisation over everything a speaker said so far
// (window_recompute bundles), as timar_sdk.audio.RunningNorm: count, sum and sum of squares of
// every sample in double precision. `update` returns new statistics, so a failed turn keeps the
// old ones.
struct RunningNorm {
  uint64_t count = 0;
  double sum = 0.0, sum_sq = 0.0;
  RunningNorm update(const float* x, size_t n) const;
  // out[i] = (x[i] - mean) / sqrt(var + eps), float32, with these statistics.
  void apply(const float* x, size_t n, double eps, float* out) const;
};

// The past of a window_recompute session: the tokens [P, D] of up to W-1 past turns (their
// conditional row) in a ring, oldest at `oldest`, and the two speakers' audio statistics.
struct TokenWindow {
  std::vector<float> tokens;   // [W-1, P, D]
  int oldest = 0, count = 0;
  RunningNorm user, agent;
  void swap(TokenWindow& o) noexcept {
    tokens.swap(o.tokens);
    std::swap(oldest, o.oldest);
    std::swap(count, o.count);
    std::swap(user, o.user);
    std::swap(agent, o.agent);
  }
};

struct StateWriter;
struct StateReader;

class Session {
 public:
  Session(const std::string& bundle_dir, const timar_options& options);

  const Bundle& bundle() const { return bundle_; }
  int frames() const { return bundle_.frames; }
  int samples() const { return bundle_.samples; }
  void info(timar_info* out) const;
  const char* backend_name() const { return backend_->name(); }

  void reset();
  void step(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n,
            float* out, size_t cap_frames);
  size_t feed_frames(size_t ua_n, size_t um_n, size_t aa_n) const;
  size_t feed(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n,
              float* out, size_t cap_frames);
  size_t flush_frames() const;
  size_t flush(float* out, size_t cap_frames);
  std::vector<uint8_t> get_state() const;
  size_t state_size() const;
  void set_state(const uint8_t* data, size_t size);

 private:
  struct Pending {
    PhiloxNormal noise;
    RunningNorm user, agent;   // window_recompute: the statistics with this turn's audio
  };
  // One turn without changing the session; `commit_turn` then makes it visible.
  Pending run_turn(const float* ua, const float* um /* nullable */, const float* aa, float* motion);
  void commit_turn(const Pending& p);
  // Runs `turns` turns from the start of the stream buffers and commits all of them or none.
  void run_buffered(size_t turns, bool pad, float* out, size_t out_frames);
  void check_turn_finite(const Pending& p, const float* motion) const;
  // z_ of the turn whose inputs are in the scratch buffers: through the cache, or the window.
  StepInputs step_inputs();
  void encode_cached();
  void encode_window();
  void push_window_turn(const float* tokens);
  int next_slot() const;
  size_t window_capacity() const { return size_t(bundle_.context_turns - 1); }
  size_t turn_token_floats() const { return size_t(bundle_.tokens_per_turn) * size_t(bundle_.token_dim); }
  // State blobs: the stream part shared by both kinds, then the cache or the token window.
  void put_header(StateWriter& w) const;
  void check_header(StateReader& r) const;
  void put_stream(StateWriter& w, uint64_t tail_floats) const;
  void put_buffers(StateWriter& w) const;
  std::vector<uint8_t> get_cached_state() const;
  std::vector<uint8_t> get_window_state() const;
  void set_cached_state(StateReader& r);
  void set_window_state(StateReader& r);
  void check_counter(uint64_t lo, uint64_t hi, uint64_t turns) const;
  void check_audio(const float* a, size_t n, const char* name, bool exact) const;
  void check_motion(const float* m, size_t frames, const char* name, bool exact) const;

  Bundle bundle_;
  uint64_t seed_;
  int steps_;
  double temperature_, cfg_;
  bool feedback_;
  bool window_;   // attention "window_recompute" (else "cached")
  int visible_;   // -1: all
  int rows_;
  int64_t fail_after_ = -1;   // test hook: TIMAR_TEST_FAIL_AFTER_TURNS (one injected backend failure)
  int64_t runs_ = 0;
  Schedule sched_;
  std::unique_ptr<Backend> backend_;
  // state
  std::vector<int> ages_;    // cached: the cache ring
  TokenWindow win_;          // window_recompute: past tokens and audio statistics
  PhiloxNormal noise_;
  uint64_t turns_ = 0;
  std::vector<float> buf_ua_, buf_aa_, buf_um_;
  bool tracked_ = false;                 // user motion was fed since the last reset
  std::array<float, 56> last_um_{};      // the last user motion frame fed (when tracked_)
  // per-turn scratch (no allocation per turn once sized)
  std::vector<float> wave_, feats_, speech_u_, speech_a_, user_motion_, agent_motion_, agent_mask_, uncond_,
      absent_, z_, x_, tokens_, window_buf_, pad_ua_, pad_aa_, pad_um_, turn_motion_;
  std::vector<int64_t> token_ages_;
  SamplerWorkspace sampler_ws_;
};

}  // namespace timar
