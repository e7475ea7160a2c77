// Turns of several sessions of one model in one batch: the per-turn loop of docs/DESIGN.md
// section 4 for a list of turns, as timar_sdk/runtime/session.py (_run_turns_together): each
// graph runs once for all of them, rows = sessions x CFG rows, each row with its own inputs,
// ring ages and cache; the sampler draws each turn's noise from its own generator. A session's
// own turns (step, feed, flush) are the list of one.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend.hpp"
#include "bundle.hpp"
#include "philox.hpp"
#include "sampler.hpp"
#include "smoothing.hpp"
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

// A session's settings that shape its turns (fixed when it is created).
struct TurnSettings {
  int steps = 5;
  double temperature = 1.0, cfg = 1.0;
  bool feedback = false;   // history "feedback" (else "masked")
  int visible = -1;        // context_turns: past turns kept visible (-1: all)
  int rows = 1;            // 1, or 2 with classifier-free guidance (cfg != 1)
  Schedule schedule;
  SmoothingFilter smoothing;   // of the output; the session runs it on commit (its state is the session's)
};

// One session's turn inside a batch: what it reads and, once run, what the session commits.
struct TurnJob {
  const TurnSettings* settings = nullptr;
  // The session's conversation, read only here.
  const std::vector<int>* ages = nullptr;     // cached bundles: the ages of the cache slots
  KvCache* cache = nullptr;                   // cached bundles
  const TokenWindow* window = nullptr;        // window_recompute bundles
  // The turn's input: one turn of each audio, and of user motion or nullptr (not tracked).
  const float *user_audio = nullptr, *user_motion = nullptr, *agent_audio = nullptr;
  float* motion = nullptr;                    // out: [F, 56]
  // In: the session's generator. Out: after the turn's draws.
  PhiloxNormal noise;
  // Out (window_recompute): the statistics with this turn's audio.
  RunningNorm user_norm, agent_norm;
  int row = 0;                     // out: the turn's first row in its batch (its present keys/values, its tokens)
  timar_status status = TIMAR_OK;  // a job that arrives failed is not run
  std::string error;
};

// Buffers of one batched call, reused from call to call (a Model keeps a pool of them).
struct Workspace {
  std::vector<float> wave, feats, speech_u, speech_a, user_motion, agent_motion, agent_mask, uncond, absent, z,
      feedback_z, tokens, window, x;
  std::vector<int64_t> token_ages;
  SamplerWorkspace sampler;
  std::unique_ptr<TurnKv> kv;
};

// Runs the jobs (turns of sessions of one model) in as few batches as their settings allow:
// turns that share the number of steps, the history mode and (window bundles) the window length
// run together, and turns with GPU caches one by one. After each batch, `finish(i)` is called
// for each of its jobs (index into `jobs`) while `ws` still holds their keys/values and tokens
// (see commit_turn). A failed job gets its status and message and is otherwise untouched: a
// backend error fails the jobs of its batch, a non-finite result only its own job.
// Returns the number of batches run.
size_t run_turns(const Bundle& bundle, Backend& backend, const std::vector<TurnJob*>& jobs, Workspace& ws,
                 const std::function<void(size_t)>& finish);

// What commit writes, from a job that succeeded: its present keys/values (ws.kv row job.row)
// into `slot` of its cache (cached bundles), or its tokens (ws.tokens row job.row,
// window_recompute bundles). The token row is [P, D] at this address:
const float* turn_tokens(const Bundle& bundle, const Workspace& ws, const TurnJob& job);

}  // namespace timar
