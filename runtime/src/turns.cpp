#include "turns.hpp"

#include <algorithm>
#include <cmath>

#include "error.hpp"

namespace timar {

// ---- audio statistics (window_recompute) ------------------------------------------------------
RunningNorm RunningNorm::update(const float* x, size_t n) const {
  RunningNorm r = *this;
  r.count += n;
  double s = 0.0, ss = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double v = x[i];
    s += v;
    ss += v * v;
  }
  r.sum += s;
  r.sum_sq += ss;
  return r;
}

// As numpy computes ((audio - mean) / np.sqrt(var + eps)).astype(float32) for float32 audio:
// the subtraction in float32 (mean rounded to float32), the division in float64.
void RunningNorm::apply(const float* x, size_t n, double eps, float* out) const {
  const double c = double(std::max<uint64_t>(count, 1));
  const double mean = sum / c;
  const double var = std::max(sum_sq / c - mean * mean, 0.0);
  const double den = std::sqrt(var + eps);
  const float mean32 = float(mean);
  for (size_t i = 0; i < n; ++i) out[i] = float(double(x[i] - mean32) / den);
}

namespace {

constexpr size_t D = 56;

bool all_finite(const float* x, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

// Past turns in a window job's window: all it holds, or its context_turns.
int visible_past(const TurnJob& job) {
  const int held = job.window->count, visible = job.settings->visible;
  return visible < 0 ? held : std::min(visible, held);
}

// Turns run in one batch only with the same sampler schedule and history, and (window bundles)
// the same window length; GPU caches do not stack, so with them every turn is a batch of its own.
struct GroupKey {
  int steps;
  bool feedback;
  int window_turns;
  size_t alone;
  bool operator==(const GroupKey& o) const {
    return steps == o.steps && feedback == o.feedback && window_turns == o.window_turns && alone == o.alone;
  }
};

std::vector<std::vector<size_t>> group_jobs(const Bundle& bundle, const Backend& backend,
                                            const std::vector<TurnJob*>& jobs) {
  std::vector<GroupKey> keys;
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const TurnJob& job = *jobs[i];
    if (job.status != TIMAR_OK) continue;
    const GroupKey key{job.settings->steps, job.settings->feedback, bundle.window ? visible_past(job) : 0,
                       bundle.window || backend.stacks_caches() ? size_t(-1) : i};
    const size_t g = size_t(std::find(keys.begin(), keys.end(), key) - keys.begin());
    if (g == keys.size()) {
      keys.push_back(key);
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  return groups;
}

// One batch: every graph once for all of its turns.
class Batch {
 public:
  Batch(const Bundle& b, Backend& backend, Workspace& ws, std::vector<TurnJob*> jobs)
      : b_(b), backend_(backend), ws_(ws), jobs_(std::move(jobs)), F_(size_t(b.frames)), S_(size_t(b.samples)) {
    for (TurnJob* job : jobs_) {
      job->row = int(rows_);
      rows_ += size_t(job->settings->rows);
    }
  }

  void run() {
    encode_audio();
    fill_rows();
    if (b_.window)
      encode_window();
    else
      encode_cached();
    sample();
    if (jobs_[0]->settings->feedback) feedback_step();
    finish_motion();
  }

 private:
  // Both speakers' audio of every turn as one batch [2N, S] (window bundles: normalised with the
  // statistics of everything so far, this turn included) -> features [2N, F, Da].
  void encode_audio() {
    ws_.wave.resize(2 * jobs_.size() * S_);
    for (size_t j = 0; j < jobs_.size(); ++j) {
      TurnJob& job = *jobs_[j];
      float* user = ws_.wave.data() + 2 * j * S_;
      float* agent = user + S_;
      if (b_.window) {
        job.user_norm = job.window->user.update(job.user_audio, S_);
        job.agent_norm = job.window->agent.update(job.agent_audio, S_);
        job.user_norm.apply(job.user_audio, S_, b_.audio_norm_eps, user);
        job.agent_norm.apply(job.agent_audio, S_, b_.audio_norm_eps, agent);
      } else {
        std::copy_n(job.user_audio, S_, user);
        std::copy_n(job.agent_audio, S_, agent);
      }
    }
    ws_.feats.resize(2 * jobs_.size() * F_ * size_t(b_.speech_dim));
    backend_.encode_audio(ws_.wave.data(), int(2 * jobs_.size()), ws_.feats.data());
  }

  // Row inputs shared by both graphs' kinds: speech, normalised user motion, the CFG flag
  // (uncond: row 1 of a guided turn) and the absent flag.
  void fill_rows() {
    const size_t Da = size_t(b_.speech_dim), speech = F_ * Da, motion = F_ * D;
    ws_.speech_u.resize(rows_ * speech);
    ws_.speech_a.resize(rows_ * speech);
    ws_.user_motion.resize(rows_ * motion);
    ws_.uncond.resize(rows_);
    ws_.absent.resize(rows_);
    for (size_t j = 0; j < jobs_.size(); ++j) {
      const TurnJob& job = *jobs_[j];
      const size_t first = size_t(job.row);
      // A user whose face is not tracked reads as the neutral face (all-zero FLAME values);
      // cached bundles' models also get the "absent" flag, which replaces those tokens.
      float* um = ws_.user_motion.data() + first * motion;
      for (size_t i = 0; i < motion; ++i)
        um[i] = ((job.user_motion ? job.user_motion[i] : 0.0f) - b_.motion_mean[i % D]) / b_.motion_std[i % D];
      for (size_t r = first; r < first + size_t(job.settings->rows); ++r) {
        std::copy_n(ws_.feats.data() + 2 * j * speech, speech, ws_.speech_u.data() + r * speech);
        std::copy_n(ws_.feats.data() + (2 * j + 1) * speech, speech, ws_.speech_a.data() + r * speech);
        if (r != first) std::copy_n(um, motion, ws_.user_motion.data() + r * motion);
        ws_.uncond[r] = r == first ? 0.0f : 1.0f;
        ws_.absent[r] = job.user_motion ? 0.0f : 1.0f;
      }
    }
  }

  StepInputs step_inputs() {
    StepInputs in;
    in.rows = int(rows_);
    in.user_speech = ws_.speech_u.data();
    in.user_motion = ws_.user_motion.data();
    in.agent_speech = ws_.speech_a.data();
    in.agent_motion = ws_.agent_motion.data();
    in.agent_mask = ws_.agent_mask.data();
    in.uncond = ws_.uncond.data();
    in.user_motion_absent = ws_.absent.data();
    in.past_turn_age = ws_.token_ages.data();
    return in;
  }

  // cached: encoder_step over the committed caches, each row its session's ring ages.
  void encode_cached() {
    const size_t P = size_t(b_.tokens_per_turn), SP = size_t(b_.slots) * P;
    ws_.agent_motion.assign(rows_ * F_ * D, 0.0f);
    ws_.agent_mask.assign(rows_ * F_, 1.0f);
    ws_.token_ages.resize(rows_ * SP);
    for (const TurnJob* job : jobs_) {
      for (size_t s = 0; s < size_t(b_.slots); ++s) {
        int64_t age = (*job->ages)[s];
        const int visible = job->settings->visible;
        if (visible >= 0 && age > visible) age = b_.context_turns;
        for (int r = 0; r < job->settings->rows; ++r)
          std::fill_n(ws_.token_ages.begin() + std::ptrdiff_t((size_t(job->row + r)) * SP + s * P), P, age);
      }
    }
    ws_.z.resize(rows_ * F_ * size_t(b_.z_dim));
    encoder_step(ws_.z);
  }

  // The batch's caches, stacked along the rows by the backend, and its inputs -> z, ws.kv.
  void encoder_step(std::vector<float>& z) {
    std::vector<KvCache*> caches;
    for (const TurnJob* job : jobs_) caches.push_back(job->cache);
    backend_.encoder_step(step_inputs(), caches.data(), caches.size(), z.data(), *ws_.kv);
  }

  // window_recompute: this turn's tokens, then each row's window (its session's visible past
  // turns, oldest first, the same for both CFG rows, and the row's own tokens) through
  // window_encoder. The batch's turns share the window length.
  void encode_window() {
    TokenInputs in;
    in.rows = int(rows_);
    in.user_speech = ws_.speech_u.data();
    in.user_motion = ws_.user_motion.data();
    in.agent_speech = ws_.speech_a.data();
    in.uncond = ws_.uncond.data();
    const size_t PD = size_t(b_.tokens_per_turn) * size_t(b_.token_dim), cap = size_t(b_.context_turns - 1);
    ws_.tokens.resize(rows_ * PD);
    backend_.embed_turn(in, ws_.tokens.data());
    const int n_past = visible_past(*jobs_[0]);
    const size_t n = size_t(n_past) + 1;   // turns in the window
    ws_.window.resize(rows_ * n * PD);
    for (const TurnJob* job : jobs_) {
      const TokenWindow& win = *job->window;
      for (size_t r = size_t(job->row); r < size_t(job->row + job->settings->rows); ++r) {
        float* dst = ws_.window.data() + r * n * PD;
        for (int i = 0; i < n_past; ++i) {   // the last n_past stored turns
          const size_t turn = (size_t(win.oldest) + size_t(win.count - n_past + i)) % cap;
          dst = std::copy_n(win.tokens.data() + turn * PD, PD, dst);
        }
        std::copy_n(ws_.tokens.data() + r * PD, PD, dst);
      }
    }
    ws_.z.resize(rows_ * F_ * size_t(b_.z_dim));
    backend_.encode_window(ws_.window.data(), int(rows_), int(n) * b_.tokens_per_turn, ws_.z.data());
  }

  // z's rows are, turn after turn, its conditional then unconditional frames: the sampler's order.
  void sample() {
    ws_.x.resize(jobs_.size() * F_ * D);
    std::vector<SampleTurn> turns;
    for (size_t j = 0; j < jobs_.size(); ++j) {
      TurnJob& job = *jobs_[j];
      turns.push_back({&job.noise, job.settings->temperature, job.settings->cfg, ws_.x.data() + j * F_ * D});
    }
    const float* z = ws_.z.data();
    Backend& backend = backend_;
    sample_turns([&backend, z](const float* x, const float* t, int n, float* out) { backend.denoise(x, t, z, n, out); },
                 b_.frames, jobs_[0]->settings->schedule, turns, ws_.sampler);
  }

  // history "feedback": the encoder step again with the sampled motion as the agent's (all rows
  // conditional); its keys/values replace the first step's.
  void feedback_step() {
    for (size_t j = 0; j < jobs_.size(); ++j) {
      const TurnJob& job = *jobs_[j];
      for (int r = 0; r < job.settings->rows; ++r) {
        std::copy_n(ws_.x.data() + j * F_ * D, F_ * D, ws_.agent_motion.data() + size_t(job.row + r) * F_ * D);
        ws_.uncond[size_t(job.row + r)] = 0.0f;
      }
    }
    std::fill(ws_.agent_mask.begin(), ws_.agent_mask.end(), 0.0f);
    ws_.feedback_z.resize(ws_.z.size());
    encoder_step(ws_.feedback_z);
  }

  // Denormalised motion, and the finite check: nothing non-finite may enter a session, so a
  // turn whose motion, new cache entries or tokens (or audio statistics) hold NaN/Inf fails.
  void finish_motion() {
    for (size_t j = 0; j < jobs_.size(); ++j) {
      TurnJob& job = *jobs_[j];
      const float* x = ws_.x.data() + j * F_ * D;
      for (size_t i = 0; i < F_ * D; ++i) job.motion[i] = x[i] * b_.motion_std[i % D] + b_.motion_mean[i % D];
      const char* where = nonfinite_part(job);
      if (where) {
        job.status = TIMAR_ERR_NUMERIC;
        job.error = std::string("the model produced NaN or Inf (in ") + where +
                    "); the turn is not committed and the session is unchanged";
      }
    }
  }

  const char* nonfinite_part(const TurnJob& job) const {
    if (!all_finite(job.motion, F_ * D)) return "the motion";
    if (b_.window && !all_finite(turn_tokens(b_, ws_, job), size_t(b_.tokens_per_turn) * size_t(b_.token_dim)))
      return "the turn's tokens";
    if (b_.window && !(std::isfinite(job.user_norm.sum_sq) && std::isfinite(job.agent_norm.sum_sq)))
      return "the audio statistics";
    if (!b_.window && !ws_.kv->row_finite(job.row)) return "the turn's cache entries";
    return nullptr;
  }

  const Bundle& b_;
  Backend& backend_;
  Workspace& ws_;
  std::vector<TurnJob*> jobs_;
  const size_t F_, S_;
  size_t rows_ = 0;
};

}  // namespace

const float* turn_tokens(const Bundle& bundle, const Workspace& ws, const TurnJob& job) {
  return ws.tokens.data() + size_t(job.row) * size_t(bundle.tokens_per_turn) * size_t(bundle.token_dim);
}

size_t run_turns(const Bundle& bundle, Backend& backend, const std::vector<TurnJob*>& jobs, Workspace& ws,
                 const std::function<void(size_t)>& finish) {
  if (!ws.kv && !bundle.window) ws.kv = backend.new_turn_kv();
  for (size_t i = 0; i < jobs.size(); ++i)
    if (jobs[i]->status != TIMAR_OK) finish(i);   // arrived failed: not run
  const std::vector<std::vector<size_t>> groups = group_jobs(bundle, backend, jobs);
  for (const std::vector<size_t>& group : groups) {
    std::vector<TurnJob*> members;
    for (size_t i : group) members.push_back(jobs[i]);
    try {
      Batch(bundle, backend, ws, members).run();
    } catch (...) {   // a backend failure fails the turns of its batch
      const Failure f = current_failure();
      for (TurnJob* job : members) job->status = f.status, job->error = f.message;
    }
    for (size_t i : group) finish(i);
  }
  return groups.size();
}

}  // namespace timar
