// The streaming session: the per-turn loop of DESIGN.md section 4, as timar_sdk/runtime/session.py.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "bundle.hpp"
#include "philox.hpp"
#include "sampler.hpp"
#include "timar.h"

namespace timar {

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
  size_t flush(float* out, size_t cap_frames);
  std::vector<uint8_t> get_state() const;
  size_t state_size() const;
  void set_state(const uint8_t* data, size_t size);

 private:
  struct Pending {
    PhiloxNormal noise;
  };
  // One turn without changing the session; `commit_turn` then makes it visible.
  Pending run_turn(const float* ua, const float* um /* nullable */, const float* aa, float* motion);
  void commit_turn(const Pending& p);
  int next_slot() const;
  void check_audio(const float* a, size_t n, const char* name, bool exact) const;
  void check_motion(const float* m, size_t frames, const char* name, bool exact) const;

  Bundle bundle_;
  uint64_t seed_;
  int steps_;
  double temperature_, cfg_;
  bool feedback_;
  int visible_;   // -1: all
  int rows_;
  int64_t fail_after_ = -1;   // test hook: TIMAR_TEST_FAIL_AFTER_TURNS (one injected backend failure)
  int64_t runs_ = 0;
  Schedule sched_;
  std::unique_ptr<Backend> backend_;
  // state
  std::vector<int> ages_;
  PhiloxNormal noise_;
  uint64_t turns_ = 0;
  std::vector<float> buf_ua_, buf_aa_, buf_um_;
  bool tracked_ = false;
  // per-turn scratch (no allocation per turn once sized)
  std::vector<float> wave_, feats_, speech_u_, speech_a_, user_motion_, agent_motion_, agent_mask_, uncond_,
      absent_, z_, x_;
  std::vector<int64_t> token_ages_;
  SamplerWorkspace sampler_ws_;
};

}  // namespace timar
