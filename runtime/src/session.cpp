#include "session.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "error.hpp"

namespace timar {
namespace {

std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}
std::string num17(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}

// n values: the index of the first NaN/Inf (nan_at, SIZE_MAX if none), else the largest |x|
// (worst) and its index (worst_at).
struct Scan {
  size_t nan_at = SIZE_MAX, worst_at = 0;
  float worst = 0.0f;
};
Scan scan(const float* x, size_t n) {
  Scan s;
  for (size_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (!std::isfinite(a)) {
      s.nan_at = i;
      return s;
    }
    if (a > s.worst) s.worst = a, s.worst_at = i;
  }
  return s;
}
bool all_finite(const float* x, size_t n) { return scan(x, n).nan_at == SIZE_MAX; }
bool all_within(const float* x, size_t n, float limit) {
  const Scan s = scan(x, n);
  return s.nan_at == SIZE_MAX && s.worst <= limit;
}

// Whole units of `per` in have + more, without overflow.
size_t whole(size_t have, size_t more, size_t per) { return have / per + more / per + (have % per + more % per) / per; }

void check_capacity(const float* out, size_t cap, size_t need) {
  if (need && !out) throw Error(TIMAR_ERR_NULL_POINTER, "out_motion: NULL pointer");
  if (cap < need)
    throw Error(TIMAR_ERR_BUFFER_TOO_SMALL, "out_motion: capacity " + std::to_string(cap) + " frames, need " +
                                                std::to_string(need) + " frames");
}

// The smoothing in effect: the bundle's, none, or the custom time constants (checked).
SmoothingTaus smoothing_taus(const Bundle& b, const timar_session_options& o) {
  if (o.smoothing < TIMAR_SMOOTHING_DEFAULT || o.smoothing > TIMAR_SMOOTHING_CUSTOM)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "smoothing: expected TIMAR_SMOOTHING_DEFAULT, _OFF or _CUSTOM, got " +
                                                std::to_string(o.smoothing));
  const double given[3] = {o.smoothing_expression, o.smoothing_jaw, o.smoothing_neck};
  SmoothingTaus custom;
  for (size_t r = 0; r < 3; ++r) {
    const std::string field = std::string("smoothing_") + kSmoothingRegions[r].name;
    if (o.smoothing != TIMAR_SMOOTHING_CUSTOM && given[r] != 0.0)   // NaN included
      throw Error(TIMAR_ERR_INVALID_ARGUMENT, field + ": " + num(given[r]) + " is read only with smoothing = "
                                              "TIMAR_SMOOTHING_CUSTOM; set smoothing, or leave " + field + " 0");
    if (!valid_tau(given[r]))
      throw Error(TIMAR_ERR_INVALID_ARGUMENT, field + ": expected a time constant in seconds in 0.." +
                                                  num(kSmoothingMaxSeconds) + " (0 = not smoothed), got " +
                                                  num(given[r]));
    custom.seconds[r] = given[r];
  }
  if (o.smoothing == TIMAR_SMOOTHING_DEFAULT) return b.smoothing;
  return custom;   // all 0 with TIMAR_SMOOTHING_OFF
}

}  // namespace

TurnSettings session_settings(const Bundle& b, const timar_session_options& o) {
  TurnSettings s;
  const int T = int(b.alphas_cumprod.size());
  if (o.steps > uint32_t(T))
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "steps: expected an integer in 1.." + std::to_string(T) +
                                                " (0 = the bundle's default), got " + std::to_string(o.steps));
  s.steps = o.steps == 0 ? b.default_steps : int(o.steps);
  s.temperature = std::isnan(o.temperature) ? b.default_temperature : o.temperature;
  if (!(s.temperature >= 0 && s.temperature <= kTemperatureMax))
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "temperature: expected a number in 0.." + num(kTemperatureMax) +
                                                " (NaN = the bundle's default), got " + num(o.temperature));
  s.cfg = std::isnan(o.cfg) ? b.default_cfg : o.cfg;
  if (!(s.cfg >= 0 && s.cfg <= kCfgMax))
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "cfg: expected a number in 0.." + num(kCfgMax) +
                                                " (NaN = the bundle's default), got " + num(o.cfg));
  switch (o.history) {
    case TIMAR_HISTORY_DEFAULT: s.feedback = b.history == "feedback"; break;
    case TIMAR_HISTORY_MASKED: s.feedback = false; break;
    case TIMAR_HISTORY_FEEDBACK: s.feedback = true; break;
    default:
      throw Error(TIMAR_ERR_INVALID_ARGUMENT, "history: expected TIMAR_HISTORY_DEFAULT, _MASKED or _FEEDBACK, got " +
                                                  std::to_string(o.history));
  }
  if (b.window && s.feedback)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "history: window_recompute bundles (the authors' models) support only "
                                            "TIMAR_HISTORY_MASKED (their --mask_history_agent)");
  if (o.context_turns < -1 || o.context_turns > b.context_turns - 1)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "context_turns: expected -1 (all) or 0.." +
                                                std::to_string(b.context_turns - 1) + ", got " +
                                                std::to_string(o.context_turns));
  s.visible = o.context_turns;
  s.rows = s.cfg == 1.0 ? 1 : 2;
  s.schedule = make_schedule(b.alphas_cumprod, respaced_timesteps(s.steps, T));
  s.smoothing = SmoothingFilter(smoothing_taus(b, o), b.fps);
  return s;
}

std::shared_ptr<Session> Session::create(std::shared_ptr<Model> model, uint64_t seed, TurnSettings settings) {
  Model& m = *model;
  std::shared_ptr<Session> session = std::make_shared<Session>(std::move(model), seed, std::move(settings));
  m.add_session(session);
  return session;
}

Session::Session(std::shared_ptr<Model> model, uint64_t seed, TurnSettings settings)
    : model_(std::move(model)), bundle_(model_->bundle()), seed_(seed), settings_(std::move(settings)),
      window_(bundle_.window) {
  if (const char* f = std::getenv("TIMAR_TEST_FAIL_AFTER_TURNS")) fail_after_ = std::strtoll(f, nullptr, 10);
  if (!window_) cache_ = model_->backend().new_cache(settings_.rows);
  const size_t F = size_t(bundle_.frames), S = size_t(bundle_.samples);
  pad_ua_.resize(S);
  pad_aa_.resize(S);
  pad_um_.resize(F * 56);
  turn_motion_.resize(F * 56);
  reset_locked();
}

Session::Locks Session::lock_all() const {
  std::unique_lock<std::mutex> turn(turn_mutex_);
  std::unique_lock<std::mutex> io(io_mutex_);
  return {std::move(turn), std::move(io)};
}

void Session::info(timar_info* out) const {
  model_->info(out);
  out->steps = settings_.steps;
  out->history = settings_.feedback ? TIMAR_HISTORY_FEEDBACK : TIMAR_HISTORY_MASKED;
  out->temperature = settings_.temperature;
  out->cfg = settings_.cfg;
  out->seed = seed_;
  const SmoothingTaus& taus = settings_.smoothing.taus();
  out->smoothing_expression = taus.seconds[0];
  out->smoothing_jaw = taus.seconds[1];
  out->smoothing_neck = taus.seconds[2];
  std::lock_guard<std::mutex> lock(turn_mutex_);
  out->turns = turns_;
}

void Session::reset() {
  Locks locks = lock_all();
  reset_locked();
}

void Session::reset_locked() {
  if (cache_) cache_->clear();
  ages_.assign(size_t(bundle_.slots), bundle_.context_turns);
  win_ = TokenWindow();
  if (window_) win_.tokens.assign(window_capacity() * turn_token_floats(), 0.0f);
  noise_ = PhiloxNormal(seed_);
  buf_ua_.clear();
  buf_aa_.clear();
  buf_um_.clear();
  tracked_ = false;
  last_um_.fill(0.0f);
  turns_ = 0;
  dropped_turns_ = 0;
  smoothed_ = SmoothingState();
  chunks_.clear();
}

// ---- input checks (messages as the Python runtime's) ----------------------------------------
void Session::check_audio(const float* a, size_t n, const char* name, bool exact) const {
  if (!a && n) throw Error(TIMAR_ERR_NULL_POINTER, std::string(name) + ": NULL pointer with " + std::to_string(n) + " samples");
  if (exact) {
    if (!a) throw Error(TIMAR_ERR_NULL_POINTER, std::string(name) + ": NULL pointer (expected one turn of audio)");
    if (n != size_t(bundle_.samples))
      throw Error(TIMAR_ERR_WRONG_LENGTH, std::string(name) + ": expected " + std::to_string(bundle_.samples) +
                                              " samples (one turn at " + std::to_string(bundle_.sample_rate) +
                                              " Hz), got " + std::to_string(n) + "; use timar_feed() for other lengths");
  }
  const Scan s = scan(a, n);
  if (s.nan_at != SIZE_MAX)
    throw Error(TIMAR_ERR_NOT_FINITE, std::string(name) + ": expected finite samples, found NaN or Inf at sample " +
                                          std::to_string(s.nan_at));
  if (s.worst > TIMAR_AUDIO_LIMIT)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, std::string(name) + ": expected samples within +-" + num(TIMAR_AUDIO_LIMIT) +
                                                " (TIMAR_AUDIO_LIMIT; full scale is 1), the largest |x| is " + num(s.worst) +
                                                " at sample " + std::to_string(s.worst_at) +
                                                "; convert 16-bit PCM with timar_pcm16_to_float()");
}

void Session::check_motion(const float* m, size_t frames, const char* name, bool exact) const {
  if (!m && frames) throw Error(TIMAR_ERR_NULL_POINTER, std::string(name) + ": NULL pointer with " + std::to_string(frames) + " frames");
  if (m && exact && frames != size_t(bundle_.frames))
    throw Error(TIMAR_ERR_WRONG_LENGTH, std::string(name) + ": expected " + std::to_string(bundle_.frames) +
                                            " frames (one turn) of " + std::to_string(TIMAR_MOTION_DIM) +
                                            " floats, got " + std::to_string(frames) +
                                            " frames; pass NULL with 0 frames when the user's face is not tracked");
  if (frames > SIZE_MAX / TIMAR_MOTION_DIM)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, std::string(name) + ": " + std::to_string(frames) + " frames of " +
                                                std::to_string(TIMAR_MOTION_DIM) + " floats overflow size_t");
  const Scan s = scan(m, frames * TIMAR_MOTION_DIM);
  if (s.nan_at != SIZE_MAX)
    throw Error(TIMAR_ERR_NOT_FINITE, std::string(name) + ": contains NaN or Inf (frame " +
                                          std::to_string(s.nan_at / TIMAR_MOTION_DIM) + ", channel " +
                                          std::to_string(s.nan_at % TIMAR_MOTION_DIM) + ")");
  if (s.worst > TIMAR_MOTION_LIMIT)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, std::string(name) + ": expected values within +-" + num(TIMAR_MOTION_LIMIT) +
                                                " (TIMAR_MOTION_LIMIT), the largest |x| is " + num(s.worst) + " (frame " +
                                                std::to_string(s.worst_at / TIMAR_MOTION_DIM) + ", channel " +
                                                std::to_string(s.worst_at % TIMAR_MOTION_DIM) + ")");
}

// ---- the turn -------------------------------------------------------------------------------
int Session::next_slot() const {
  if (ages_.empty()) return -1;
  return int(std::max_element(ages_.begin(), ages_.end()) - ages_.begin());   // first of the oldest
}

TurnJob Session::make_job(const float* ua, const float* um, const float* aa, float* motion) {
  TurnJob job;
  job.settings = &settings_;
  job.ages = &ages_;
  job.cache = cache_.get();
  job.window = &win_;
  job.user_audio = ua;
  job.user_motion = um;
  job.agent_audio = aa;
  job.motion = motion;
  job.noise = noise_;
  if (fail_after_ >= 0 && runs_++ >= fail_after_) {   // tests of the failure paths only
    fail_after_ = -1;
    job.status = TIMAR_ERR_BACKEND;
    job.error = "injected backend failure (TIMAR_TEST_FAIL_AFTER_TURNS)";
  }
  return job;
}

// Append one turn's tokens [P, D] to the window ring, dropping the oldest beyond W-1 turns.
void Session::push_window_turn(const float* tokens) {
  const size_t cap = window_capacity(), PD = turn_token_floats();
  if (cap == 0) return;
  size_t at;
  if (size_t(win_.count) < cap) {
    at = (size_t(win_.oldest) + size_t(win_.count)) % cap;
    ++win_.count;
  } else {
    at = size_t(win_.oldest);
    win_.oldest = int((at + 1) % cap);
  }
  std::copy_n(tokens, PD, win_.tokens.begin() + std::ptrdiff_t(at * PD));
}

void Session::commit_turn(const TurnJob& job, Workspace& ws) {
  if (window_) {
    push_window_turn(turn_tokens(bundle_, ws, job));   // the conditional row
    win_.user = job.user_norm;
    win_.agent = job.agent_norm;
  } else {
    const int slot = next_slot();
    if (slot >= 0) {
      ws.kv->commit(job.row, *cache_, slot);
      const int w = bundle_.context_turns;
      for (int& a : ages_) a = a < w ? std::min(a + 1, w) : w;
      ages_[size_t(slot)] = 1;
    }
  }
  // The motion becomes final here: the smoothing filter's state moves only with committed turns.
  settings_.smoothing.apply(job.motion, size_t(bundle_.frames), smoothed_);
  noise_ = job.noise;
  ++turns_;
}

void Session::run_alone(const float* ua, const float* um, const float* aa, float* motion,
                        std::vector<std::pair<int, std::vector<float>>>* undo) {
  TurnJob job = make_job(ua, um, aa, motion);
  WorkspaceLease ws(*model_);
  run_turns(bundle_, model_->backend(), {&job}, *ws, [&](size_t) {
    if (job.status != TIMAR_OK) return;
    if (undo && !window_ && next_slot() >= 0) {
      std::vector<float> saved;
      cache_->read_slot(next_slot(), saved);
      undo->emplace_back(next_slot(), std::move(saved));
    }
    commit_turn(job, *ws);
  });
  if (job.status != TIMAR_OK) throw Error(job.status, job.error);
}

// ---- direct calls ---------------------------------------------------------------------------
void Session::step(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n,
                   float* out, size_t cap) {
  check_audio(ua, ua_n, "user_audio", true);
  check_audio(aa, aa_n, "agent_audio", true);
  check_motion(um, um_n, "user_motion", true);
  check_capacity(out, cap, size_t(bundle_.frames));
  std::lock_guard<std::mutex> lock(turn_mutex_);
  run_alone(ua, um, aa, out, nullptr);
}

size_t Session::feed_frames(size_t ua_n, size_t um_n, size_t aa_n) const {
  std::lock_guard<std::mutex> lock(io_mutex_);
  return feed_frames_locked(ua_n, um_n, aa_n);
}

size_t Session::feed_frames_locked(size_t ua_n, size_t um_n, size_t aa_n) const {
  const size_t S = size_t(bundle_.samples), F = size_t(bundle_.frames);
  const bool tracked = tracked_ || um_n > 0;
  size_t k = std::min(whole(buf_ua_.size(), ua_n, S), whole(buf_aa_.size(), aa_n, S));
  if (tracked) k = std::min(k, whole(buf_um_.size() / 56, um_n, F));
  if (k > SIZE_MAX / F)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "feed: these lengths complete more frames than size_t counts");
  return k * F;
}

size_t Session::ready_turns_locked() const { return feed_frames_locked(0, 0, 0) / size_t(bundle_.frames); }

Session::InputMark Session::mark_input() const { return {buf_ua_.size(), buf_aa_.size(), buf_um_.size(), tracked_, last_um_}; }

void Session::cut_input(const InputMark& mark) {
  buf_ua_.resize(mark.ua);
  buf_aa_.resize(mark.aa);
  buf_um_.resize(mark.um);
  tracked_ = mark.tracked;
  last_um_ = mark.last;
}

void Session::append_input(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa,
                           size_t aa_n) {
  const InputMark mark = mark_input();
  try {
    buf_ua_.insert(buf_ua_.end(), ua, ua + ua_n);
    buf_aa_.insert(buf_aa_.end(), aa, aa + aa_n);
    if (um_n) {
      buf_um_.insert(buf_um_.end(), um, um + um_n * 56);
      std::copy_n(um + (um_n - 1) * 56, 56, last_um_.begin());
      tracked_ = true;
    }
  } catch (...) {
    cut_input(mark);
    throw;
  }
}

void Session::drop_front(size_t samples, size_t motion_frames) {
  buf_ua_.erase(buf_ua_.begin(), buf_ua_.begin() + std::ptrdiff_t(samples));
  buf_aa_.erase(buf_aa_.begin(), buf_aa_.begin() + std::ptrdiff_t(samples));
  buf_um_.erase(buf_um_.begin(), buf_um_.begin() + std::ptrdiff_t(motion_frames * 56));
}

size_t Session::feed(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n,
                     float* out, size_t cap) {
  check_audio(ua, ua_n, "user_audio", false);
  check_audio(aa, aa_n, "agent_audio", false);
  check_motion(um, um_n, "user_motion", false);
  Locks locks = lock_all();
  const size_t need = feed_frames_locked(ua_n, um_n, aa_n);
  check_capacity(out, cap, need);
  const size_t S = size_t(bundle_.samples), F = size_t(bundle_.frames);
  const size_t turns = need / F;
  const InputMark mark = mark_input();
  append_input(ua, ua_n, um, um_n, aa, aa_n);
  try {
    run_buffered(turns, false, out, need);
  } catch (...) {   // nothing of this call stays buffered
    cut_input(mark);
    throw;
  }
  drop_front(turns * S, tracked_ ? turns * F : 0);
  return need;
}

// Turn t reads audio [t*S, (t+1)*S) of both streams and, when the user is tracked, motion frames
// [t*F, (t+1)*F). With `pad` (flush), audio past a buffer's end is silence and motion past its
// end repeats the last frame fed. Turn t's frames go to out [t*F, (t+1)*F), cut at out_frames.
// If a turn fails, the turns this call committed are undone (the cache slots they overwrote, or
// the token window; the generator and the turn count) and the error is rethrown.
void Session::run_buffered(size_t turns, bool pad, float* out, size_t out_frames) {
  if (!turns) return;
  const size_t S = size_t(bundle_.samples), F = size_t(bundle_.frames), D = 56;
  const std::vector<int> ages0 = ages_;
  TokenWindow win0;
  if (window_ && turns >= 2) win0 = win_;
  const PhiloxNormal noise0 = noise_;
  const uint64_t turns0 = turns_;
  const SmoothingState smoothed0 = smoothed_;
  std::vector<std::pair<int, std::vector<float>>> undo;
  // Turn t of a buffer of `have` values, `per` a turn: in place when whole, else copied to
  // `scratch` and completed with `fill` (zeros, or repeats of the last motion frame).
  const auto turn_of = [&](const std::vector<float>& buf, size_t t, size_t per, std::vector<float>& scratch,
                           const float* fill, size_t fill_n) -> const float* {
    const size_t begin = t * per, have = buf.size() > begin ? std::min(per, buf.size() - begin) : 0;
    if (have == per) return buf.data() + begin;
    std::copy_n(buf.begin() + std::ptrdiff_t(begin), have, scratch.begin());
    for (size_t i = have; i < per; ++i) scratch[i] = fill ? fill[(i - have) % fill_n] : 0.0f;
    return scratch.data();
  };
  try {
    for (size_t t = 0; t < turns; ++t) {
      const float* ua = pad ? turn_of(buf_ua_, t, S, pad_ua_, nullptr, 0) : buf_ua_.data() + t * S;
      const float* aa = pad ? turn_of(buf_aa_, t, S, pad_aa_, nullptr, 0) : buf_aa_.data() + t * S;
      const float* um = nullptr;
      if (tracked_) um = pad ? turn_of(buf_um_, t, F * D, pad_um_, last_um_.data(), D) : buf_um_.data() + t * F * D;
      const bool whole_out = (t + 1) * F <= out_frames;
      // a later turn may still fail: keep what this one overwrites
      run_alone(ua, um, aa, whole_out ? out + t * F * D : turn_motion_.data(), t + 1 < turns ? &undo : nullptr);
      if (!whole_out) std::copy_n(turn_motion_.begin(), (out_frames - t * F) * D, out + t * F * D);
    }
  } catch (...) {
    for (auto it = undo.rbegin(); it != undo.rend(); ++it) cache_->write_slot(it->first, it->second);
    ages_ = ages0;
    if (window_ && turns >= 2) win_.swap(win0);
    noise_ = noise0;
    turns_ = turns0;
    smoothed_ = smoothed0;
    throw;
  }
}

// Frames flush returns: every whole turn both audio streams hold, then the frames a partial one covers.
size_t Session::flush_frames() const {
  std::lock_guard<std::mutex> lock(io_mutex_);
  return flush_frames_locked();
}

size_t Session::flush_frames_locked() const {
  const size_t S = size_t(bundle_.samples), F = size_t(bundle_.frames);
  const size_t real = std::min(buf_ua_.size(), buf_aa_.size());
  return real / S * F + real % S * F / S;
}

size_t Session::flush(float* out, size_t cap) {
  Locks locks = lock_all();
  const size_t F = size_t(bundle_.frames);
  const size_t n_frames = flush_frames_locked();
  if (n_frames) {
    check_capacity(out, cap, n_frames);
    run_buffered((n_frames + F - 1) / F, true, out, n_frames);
  }
  buf_ua_.clear();
  buf_aa_.clear();
  buf_um_.clear();
  return n_frames;
}

// ---- buffered streaming -----------------------------------------------------------------------
size_t Session::accept(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n) {
  check_audio(ua, ua_n, "user_audio", false);
  check_audio(aa, aa_n, "agent_audio", false);
  check_motion(um, um_n, "user_motion", false);
  size_t before, after;
  {
    std::lock_guard<std::mutex> lock(io_mutex_);
    before = ready_turns_locked();
    append_input(ua, ua_n, um, um_n, aa, aa_n);
    after = ready_turns_locked();
  }
  if (after > before) model_->notify_ready();
  return after;
}

size_t Session::poll_motion(float* out, size_t cap, uint64_t* turn, double* start_seconds) {
  std::lock_guard<std::mutex> lock(io_mutex_);
  if (chunks_.empty()) return 0;
  MotionChunk& chunk = chunks_.front();
  if (turn) *turn = chunk.turn;
  if (start_seconds) *start_seconds = chunk.start_seconds;
  if (chunk.status != TIMAR_OK) {
    const Error failed(chunk.status, "turn " + std::to_string(chunk.turn) + ": " + chunk.error +
                                         " (its input was dropped; the conversation goes on from before it)");
    chunks_.pop_front();
    throw failed;
  }
  const size_t frames = chunk.frames.size() / 56;
  check_capacity(out, cap, frames);
  std::copy(chunk.frames.begin(), chunk.frames.end(), out);
  chunks_.pop_front();
  return frames;
}

bool Session::take_ready_turn(TakenTurn& out) {
  std::unique_lock<std::mutex> hold(turn_mutex_, std::try_to_lock);
  if (!hold) return false;   // busy in a call on another thread: a later round takes it
  const size_t S = size_t(bundle_.samples), M = size_t(bundle_.frames) * 56;
  {
    std::lock_guard<std::mutex> lock(io_mutex_);
    if (!ready_turns_locked()) return false;
    out.user_audio.assign(buf_ua_.begin(), buf_ua_.begin() + std::ptrdiff_t(S));
    out.agent_audio.assign(buf_aa_.begin(), buf_aa_.begin() + std::ptrdiff_t(S));
    if (tracked_)
      out.user_motion.assign(buf_um_.begin(), buf_um_.begin() + std::ptrdiff_t(M));
    else
      out.user_motion.clear();
  }
  out.motion.resize(M);
  out.job = make_job(out.user_audio.data(), out.user_motion.empty() ? nullptr : out.user_motion.data(),
                     out.agent_audio.data(), out.motion.data());
  out.hold = std::move(hold);
  return true;
}

// A failed turn's input is dropped too (it would fail again); the conversation stays as it was.
void Session::finish_taken_turn(TakenTurn& turn, Workspace& ws) {
  MotionChunk chunk;
  chunk.turn = turns_;
  chunk.start_seconds = media_seconds(turns_ + dropped_turns_);
  chunk.status = turn.job.status;
  chunk.error = std::move(turn.job.error);
  if (chunk.status == TIMAR_OK) {
    commit_turn(turn.job, ws);
    chunk.frames = std::move(turn.motion);
  } else {
    ++dropped_turns_;
  }
  std::lock_guard<std::mutex> lock(io_mutex_);
  drop_front(size_t(bundle_.samples), turn.user_motion.empty() ? 0 : size_t(bundle_.frames));
  chunks_.push_back(std::move(chunk));
}

// ---- state blob -----------------------------------------------------------------------------
// Two layouts (native endianness), told apart by their magic, so a snapshot never loads into a
// session of the other attention kind: cached "TIMARST2", window_recompute "TIMARSW2".
//   header: char[8] magic, u32 format (2), char[64] bundle id (sha256 of manifest.json), then the
//     settings: u64 seed, u32 steps, u32 history (1 = feedback), f64 temperature, f64 cfg,
//     i32 context_turns (-1 = all), f64 smoothing time constants [3] (expression, jaw, neck;
//     those in effect, 0 = not smoothed);
//   cached: u32 slots, i32 ages[slots];
//   window: u32 W-1, u32 P, u32 D, u32 past turns n, u64 count + f64 sum + f64 sum_sq of the
//     user's audio statistics, then the agent's;
//   stream: u64 counter_lo, u64 counter_hi, u64 turns, u32 tracked, f32 last user motion
//     frame[56], u32 smoothed (1: the smoothing filter has run since create/reset), f32 its last
//     output frame[56] (zeros when not), u64 n_user_audio, u64 n_agent_audio,
//     u64 n_user_motion_floats, u64 tail floats, then the floats: user audio, agent audio, user motion, and the tail: the cache (cached) or
//     the past turns' tokens [n, P, D] oldest first (window).
// set_state reads and checks all of it before anything in the session changes.
namespace {
const char kMagic[8] = {'T', 'I', 'M', 'A', 'R', 'S', 'T', '2'};
const char kWindowMagic[8] = {'T', 'I', 'M', 'A', 'R', 'S', 'W', '2'};
constexpr size_t kHeaderBytes = 8 + 4 + 64 + 8 + 4 + 4 + 8 + 8 + 4 + 8 * 3;
constexpr size_t kStreamBytes = 8 * 3 + 4 + 4 * 56 + 4 + 4 * 56 + 8 * 4;
// The layout's version: 2 is the layout above. Format 1 (ABI 1, which wrote its ABI version, also
// 1, here, and the first ABI 2 builds) lacks the smoothing time constants and the smoothing
// state; it still loads, as a snapshot taken with smoothing off.
constexpr uint32_t kStateFormat = 2;
constexpr uint32_t kStateFormatBeforeSmoothing = 1;

[[noreturn]] void bad_state(const std::string& what) { throw Error(TIMAR_ERR_STATE, "state: " + what); }
}  // namespace

struct StateWriter {
  std::vector<uint8_t>& v;
  void raw(const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    v.insert(v.end(), b, b + n);
  }
  template <class T> void put(T x) { raw(&x, sizeof x); }
  void norm(const RunningNorm& n) {
    put<uint64_t>(n.count);
    put<double>(n.sum);
    put<double>(n.sum_sq);
  }
};

struct StateReader {
  const uint8_t* p;
  size_t n, off = 0;
  uint32_t format = kStateFormat;   // the blob's, once its header is read
  void raw(void* out, size_t k) {
    if (n - off < k) bad_state("truncated blob (not from timar_get_state?)");
    std::memcpy(out, p + off, k);
    off += k;
  }
  template <class T> T get() {
    T x;
    raw(&x, sizeof x);
    return x;
  }
  RunningNorm norm() {
    RunningNorm r;
    r.count = get<uint64_t>();
    r.sum = get<double>();
    r.sum_sq = get<double>();
    if (!std::isfinite(r.sum) || !std::isfinite(r.sum_sq) || r.sum_sq < 0) bad_state("corrupt audio statistics");
    return r;
  }
};

// The stream part of a blob, read and checked before anything in the session changes.
struct StreamState {
  uint64_t lo = 0, hi = 0, turns = 0;
  bool tracked = false;
  std::array<float, 56> last{};
  SmoothingState smoothed;
  std::vector<float> ua, aa, um, tail;
};

namespace {
// smoothing_on: the session smooths its output, so after a turn the filter must have a last frame.
StreamState read_stream(StateReader& r, uint64_t tail_floats, bool smoothing_on) {
  StreamState st;
  st.lo = r.get<uint64_t>();
  st.hi = r.get<uint64_t>();
  st.turns = r.get<uint64_t>();
  const uint32_t tracked = r.get<uint32_t>();
  r.raw(st.last.data(), sizeof(float) * 56);
  uint32_t smoothed = 0;
  if (r.format != kStateFormatBeforeSmoothing) {
    smoothed = r.get<uint32_t>();
    r.raw(st.smoothed.last.data(), sizeof(float) * 56);
  }
  if (smoothed > 1 || (smoothed == 1) != (smoothing_on && st.turns > 0))
    bad_state("the smoothing filter's state does not match " + std::to_string(st.turns) + " turns with smoothing " +
              (smoothing_on ? "on" : "off") + " (corrupt blob)");
  st.smoothed.started = smoothed == 1;
  if (!st.smoothed.started) st.smoothed.last.fill(0.0f);
  if (!all_finite(st.smoothed.last.data(), 56))
    bad_state("the smoothing filter's last frame holds NaN or Inf (corrupt blob)");
  const uint64_t nua = r.get<uint64_t>(), naa = r.get<uint64_t>(), num_ = r.get<uint64_t>(), nt = r.get<uint64_t>();
  if (tracked > 1 || num_ % 56 || nt != tail_floats) bad_state("corrupt header");
  const uint64_t rest = r.n - r.off;
  if (nua > rest / 4 || naa > rest / 4 || num_ > rest / 4 || nt > rest / 4 || (nua + naa + num_ + nt) * 4 != rest)
    bad_state("size does not match its header");
  st.tracked = tracked != 0;
  st.ua.resize(nua);
  st.aa.resize(naa);
  st.um.resize(num_);
  st.tail.resize(nt);
  r.raw(st.ua.data(), 4 * nua);
  r.raw(st.aa.data(), 4 * naa);
  r.raw(st.um.data(), 4 * num_);
  r.raw(st.tail.data(), 4 * nt);
  // What timar_feed accepted, and what turns committed: bounded and finite.
  if (!all_within(st.ua.data(), nua, TIMAR_AUDIO_LIMIT) || !all_within(st.aa.data(), naa, TIMAR_AUDIO_LIMIT) ||
      !all_within(st.um.data(), num_, TIMAR_MOTION_LIMIT) || !all_within(st.last.data(), 56, TIMAR_MOTION_LIMIT))
    bad_state("buffered audio or motion out of range or not finite (corrupt blob)");
  if (!all_finite(st.tail.data(), nt)) bad_state("the cache or tokens hold NaN or Inf (corrupt blob)");
  return st;
}

// a * b as a 128-bit (lo, hi) pair, without compiler extensions.
void mul_128(uint64_t a, uint64_t b, uint64_t& lo, uint64_t& hi) {
  const uint64_t a0 = a & 0xFFFFFFFFu, a1 = a >> 32, b0 = b & 0xFFFFFFFFu, b1 = b >> 32;
  const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  const uint64_t mid = (p00 >> 32) + (p01 & 0xFFFFFFFFu) + (p10 & 0xFFFFFFFFu);
  lo = (mid << 32) | (p00 & 0xFFFFFFFFu);
  hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
}

std::string history_name(uint32_t feedback) { return feedback ? "feedback" : "masked"; }
std::string context_name(int32_t c) { return c < 0 ? "all" : std::to_string(c); }
}  // namespace

void Session::put_header(StateWriter& w) const {
  w.raw(window_ ? kWindowMagic : kMagic, 8);
  w.put<uint32_t>(kStateFormat);
  char id[64] = {0};
  std::memcpy(id, bundle_.id.data(), std::min<size_t>(64, bundle_.id.size()));
  w.raw(id, 64);
  w.put<uint64_t>(seed_);
  w.put<uint32_t>(uint32_t(settings_.steps));
  w.put<uint32_t>(settings_.feedback ? 1 : 0);
  w.put<double>(settings_.temperature);
  w.put<double>(settings_.cfg);
  w.put<int32_t>(settings_.visible);
  for (double tau : settings_.smoothing.taus().seconds) w.put<double>(tau);
}

// Magic, ABI, bundle and settings; a blob of other settings is refused naming the setting.
void Session::check_header(StateReader& r) const {
  char magic[8];
  r.raw(magic, 8);
  const bool cached = std::memcmp(magic, kMagic, 8) == 0, window = std::memcmp(magic, kWindowMagic, 8) == 0;
  if (!cached && !window) {
    if (std::memcmp(magic, "TIMARS", 6) == 0) bad_state("a snapshot of an older timar runtime; take it again with this one");
    bad_state("not a timar_get_state() blob");
  }
  if (window != window_)
    bad_state(window ? "a snapshot of a window_recompute session (an authors' model); this session runs a cached bundle"
                     : "a snapshot of a cached session; this session runs a window_recompute bundle (an authors' model)");
  const uint32_t format = r.get<uint32_t>();
  if (format != kStateFormat && format != kStateFormatBeforeSmoothing)
    bad_state("state format " + std::to_string(format) + " of another timar runtime (this one reads formats " +
              std::to_string(kStateFormatBeforeSmoothing) + " and " + std::to_string(kStateFormat) +
              "); take the snapshot again with this runtime");
  r.format = format;
  char id[64];
  r.raw(id, 64);
  if (bundle_.id.size() != 64 || std::memcmp(id, bundle_.id.data(), 64) != 0)
    bad_state("expected a snapshot of a session on this bundle (its manifest.json differs)");
  const auto differs = [](const std::string& name, const std::string& blob, const std::string& mine) {
    bad_state("taken with " + name + " " + blob + ", this session has " + name + " " + mine +
              " (a snapshot continues only in a session with the same " + name + ")");
  };
  const uint64_t seed = r.get<uint64_t>();
  if (seed != seed_) differs("seed", std::to_string(seed), std::to_string(seed_));
  const uint32_t steps = r.get<uint32_t>();
  if (steps != uint32_t(settings_.steps)) differs("steps", std::to_string(steps), std::to_string(settings_.steps));
  const uint32_t feedback = r.get<uint32_t>();
  if (feedback != (settings_.feedback ? 1u : 0u))
    differs("history", history_name(feedback), history_name(settings_.feedback));
  const auto real = [&](const std::string& name, double blob, double mine) {   // all digits when %g hides the difference
    if (blob == mine) return;
    const bool close = num(blob) == num(mine);
    differs(name, close ? num17(blob) : num(blob), close ? num17(mine) : num(mine));
  };
  real("temperature", r.get<double>(), settings_.temperature);
  real("cfg", r.get<double>(), settings_.cfg);
  const int32_t context = r.get<int32_t>();
  if (context != settings_.visible)
    differs("context_turns", context_name(context), context_name(settings_.visible));
  SmoothingTaus smoothing;   // format 1: taken before smoothing existed, so without it
  if (r.format != kStateFormatBeforeSmoothing)
    for (double& tau : smoothing.seconds) tau = r.get<double>();
  if (smoothing != settings_.smoothing.taus())
    differs("smoothing", smoothing.describe(), settings_.smoothing.taus().describe());
}

void Session::put_stream(StateWriter& w, uint64_t tail_floats) const {
  w.put<uint64_t>(noise_.counter_lo());
  w.put<uint64_t>(noise_.counter_hi());
  w.put<uint64_t>(turns_);
  w.put<uint32_t>(tracked_ ? 1 : 0);
  w.raw(last_um_.data(), sizeof(float) * 56);
  w.put<uint32_t>(smoothed_.started ? 1 : 0);
  w.raw(smoothed_.last.data(), sizeof(float) * 56);
  w.put<uint64_t>(buf_ua_.size());
  w.put<uint64_t>(buf_aa_.size());
  w.put<uint64_t>(buf_um_.size());
  w.put<uint64_t>(tail_floats);
}

void Session::put_buffers(StateWriter& w) const {
  w.raw(buf_ua_.data(), 4 * buf_ua_.size());
  w.raw(buf_aa_.data(), 4 * buf_aa_.size());
  w.raw(buf_um_.data(), 4 * buf_um_.size());
}

size_t Session::state_size() const {
  Locks locks = lock_all();
  return state_size_locked();
}

size_t Session::state_size_locked() const {
  const size_t stream = kStreamBytes + 4 * (buf_ua_.size() + buf_aa_.size() + buf_um_.size());
  if (window_) return kHeaderBytes + 4 * 4 + 2 * (8 * 3) + stream + 4 * size_t(win_.count) * turn_token_floats();
  return kHeaderBytes + 4 + 4 * ages_.size() + stream + 4 * cache_->floats();
}

std::vector<uint8_t> Session::get_state() const {
  Locks locks = lock_all();
  std::vector<uint8_t> v = window_ ? get_window_state() : get_cached_state();
  if (v.size() != state_size_locked()) throw Error(TIMAR_ERR_INTERNAL, "state: blob size differs from state_size()");
  return v;
}

std::vector<uint8_t> Session::get_cached_state() const {
  std::vector<uint8_t> v;
  v.reserve(state_size_locked());
  StateWriter w{v};
  put_header(w);
  w.put<uint32_t>(uint32_t(ages_.size()));
  for (int a : ages_) w.put<int32_t>(a);
  put_stream(w, cache_->floats());
  put_buffers(w);
  const size_t at = v.size();
  v.resize(at + 4 * cache_->floats());
  cache_->to_host(reinterpret_cast<float*>(v.data() + at));
  return v;
}

std::vector<uint8_t> Session::get_window_state() const {
  std::vector<uint8_t> v;
  v.reserve(state_size_locked());
  StateWriter w{v};
  put_header(w);
  w.put<uint32_t>(uint32_t(window_capacity()));
  w.put<uint32_t>(uint32_t(bundle_.tokens_per_turn));
  w.put<uint32_t>(uint32_t(bundle_.token_dim));
  w.put<uint32_t>(uint32_t(win_.count));
  w.norm(win_.user);
  w.norm(win_.agent);
  const size_t PD = turn_token_floats();
  put_stream(w, uint64_t(win_.count) * PD);
  put_buffers(w);
  for (int i = 0; i < win_.count; ++i) {   // oldest first
    const size_t turn = (size_t(win_.oldest) + size_t(i)) % window_capacity();
    w.raw(win_.tokens.data() + turn * PD, 4 * PD);
  }
  return v;
}

// Motion not yet polled belongs to the conversation it replaces: dropped.
void Session::set_state(const uint8_t* data, size_t size) {
  Locks locks = lock_all();
  StateReader r{data, size};
  check_header(r);
  if (window_)
    set_window_state(r);
  else
    set_cached_state(r);
  dropped_turns_ = 0;
  chunks_.clear();
}

// Each turn draws the start noise and one draw per step, [F, 56] each, in whole Philox blocks of 4.
void Session::check_counter(uint64_t lo, uint64_t hi, uint64_t turns) const {
  const uint64_t per_turn = uint64_t(settings_.steps + 1) * ((uint64_t(bundle_.frames) * 56 + 3) / 4);
  uint64_t want_lo, want_hi;
  mul_128(turns, per_turn, want_lo, want_hi);
  if (lo != want_lo || hi != want_hi)
    bad_state("the generator counter does not match the turn count " + std::to_string(turns) + " (corrupt blob)");
}

void Session::set_cached_state(StateReader& r) {
  const uint32_t slots = r.get<uint32_t>();
  if (slots != ages_.size()) bad_state("slot count differs from this bundle's");
  std::vector<int> ages(slots);
  for (int& a : ages) a = r.get<int32_t>();
  StreamState st = read_stream(r, cache_->floats(), settings_.smoothing.on());
  check_counter(st.lo, st.hi, st.turns);
  // A valid ring: after n turns the m = min(n, slots) filled slots hold the ages 1..m once
  // each, and the empty ones the empty age W.
  const int w = bundle_.context_turns;
  const uint64_t m = std::min<uint64_t>(st.turns, slots);
  std::vector<bool> seen(size_t(w) + 1, false);
  uint64_t filled = 0;
  bool ok = true;
  for (int a : ages) {
    if (a < 1 || a > w || (a < w && seen[size_t(a)])) ok = false;
    if (ok && a < w) seen[size_t(a)] = true, ++filled;
  }
  for (uint64_t a = 1; ok && a <= m; ++a) ok = seen[size_t(a)];
  if (!ok || filled != m)
    bad_state("the ring ages are not a valid ring state after " + std::to_string(st.turns) + " turns (corrupt blob)");
  // Everything checked: apply (only the cache upload can fail, and it goes first).
  cache_->from_host(st.tail.data());
  ages_.swap(ages);
  apply_stream(st);
}

void Session::set_window_state(StateReader& r) {
  const uint32_t cap = r.get<uint32_t>(), P = r.get<uint32_t>(), D = r.get<uint32_t>(), n = r.get<uint32_t>();
  if (cap != window_capacity() || P != uint32_t(bundle_.tokens_per_turn) || D != uint32_t(bundle_.token_dim))
    bad_state("window size differs from this bundle's");
  if (n > cap) bad_state("corrupt window (" + std::to_string(n) + " past turns, at most " + std::to_string(cap) + ")");
  TokenWindow win;
  win.user = r.norm();
  win.agent = r.norm();
  StreamState st = read_stream(r, uint64_t(n) * turn_token_floats(), settings_.smoothing.on());
  check_counter(st.lo, st.hi, st.turns);
  const uint64_t S = uint64_t(bundle_.samples);
  if (n != std::min<uint64_t>(st.turns, cap) || st.turns > UINT64_MAX / S || win.user.count != st.turns * S ||
      win.agent.count != st.turns * S)
    bad_state("the token window or audio statistics do not match " + std::to_string(st.turns) + " turns (corrupt blob)");
  win.tokens.assign(window_capacity() * turn_token_floats(), 0.0f);
  std::copy(st.tail.begin(), st.tail.end(), win.tokens.begin());
  win.oldest = 0;
  win.count = int(n);
  win_.swap(win);
  apply_stream(st);
}

void Session::apply_stream(StreamState& st) {
  noise_ = PhiloxNormal(seed_, st.lo, st.hi);
  turns_ = st.turns;
  smoothed_ = st.smoothed;
  tracked_ = st.tracked;
  last_um_ = st.last;
  buf_ua_.swap(st.ua);
  buf_aa_.swap(st.aa);
  buf_um_.swap(st.um);
}

}  // namespace timar
