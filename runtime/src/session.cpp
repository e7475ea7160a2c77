#include "session.hpp"

#include <algorithm>
#include <cmath>
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

int pick_backend(const Bundle& b, int wanted) {
  (void)b;
  if (wanted != TIMAR_BACKEND_AUTO) return wanted;
  const char* force_cpu = std::getenv("TIMAR_FORCE_CPU");
  const bool cpu_only = force_cpu && *force_cpu && std::strcmp(force_cpu, "0") != 0;
#ifdef TIMAR_WITH_TENSORRT
  if (!cpu_only && !b.window && !b.engines.empty()) return TIMAR_BACKEND_TENSORRT;
#endif
  if (!cpu_only && ort_has_cuda()) return TIMAR_BACKEND_ORT_CUDA;
  return TIMAR_BACKEND_ORT_CPU;
}

}  // namespace

Session::Session(const std::string& dir, const timar_options& o) {
  try {
    bundle_ = load_bundle(dir, o.verify_hashes != 0);
  } catch (const BundleError& e) {
    throw Error(TIMAR_ERR_BUNDLE, e.what());
  }
  const Bundle& b = bundle_;
  seed_ = o.seed;
  const int T = int(b.alphas_cumprod.size());
  steps_ = o.steps == 0 ? b.default_steps : int(std::min<uint32_t>(o.steps, 1u << 30));
  if (steps_ < 1 || steps_ > T)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "steps: expected an integer in 1.." + std::to_string(T) + ", got " +
                                                std::to_string(o.steps));
  temperature_ = std::isnan(o.temperature) ? b.default_temperature : o.temperature;
  if (!(temperature_ >= 0))
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "temperature: expected a number >= 0, got " + num(o.temperature));
  cfg_ = std::isnan(o.cfg) ? b.default_cfg : o.cfg;
  if (!std::isfinite(cfg_)) throw Error(TIMAR_ERR_INVALID_ARGUMENT, "cfg: expected a finite number, got " + num(o.cfg));
  switch (o.history) {
    case TIMAR_HISTORY_DEFAULT: feedback_ = b.history == "feedback"; break;
    case TIMAR_HISTORY_MASKED: feedback_ = false; break;
    case TIMAR_HISTORY_FEEDBACK: feedback_ = true; break;
    default:
      throw Error(TIMAR_ERR_INVALID_ARGUMENT, "history: expected TIMAR_HISTORY_DEFAULT, _MASKED or _FEEDBACK, got " +
                                                  std::to_string(o.history));
  }
  window_ = b.window;
  if (window_ && feedback_)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "history: window_recompute bundles (the authors' models) support only "
                                            "TIMAR_HISTORY_MASKED (their --mask_history_agent)");
  if (o.context_turns < -1 || o.context_turns > b.context_turns - 1)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "context_turns: expected -1 (all) or 0.." +
                                                std::to_string(b.context_turns - 1) + ", got " +
                                                std::to_string(o.context_turns));
  visible_ = o.context_turns;
  if (o.threads < 0) throw Error(TIMAR_ERR_INVALID_ARGUMENT, "threads: expected >= 0, got " + std::to_string(o.threads));
  if (o.backend < TIMAR_BACKEND_AUTO || o.backend > TIMAR_BACKEND_TENSORRT)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "backend: unknown value " + std::to_string(o.backend));
  if (window_ && o.backend == TIMAR_BACKEND_TENSORRT)
    throw Error(TIMAR_ERR_UNSUPPORTED, "backend: TensorRT runs cached bundles only; this window_recompute bundle "
                                       "(an authors' model) runs with TIMAR_BACKEND_ORT_CPU or TIMAR_BACKEND_ORT_CUDA");
  rows_ = cfg_ == 1.0 ? 1 : 2;
  if (const char* f = std::getenv("TIMAR_TEST_FAIL_AFTER_TURNS")) fail_after_ = std::strtoll(f, nullptr, 10);
  sched_ = make_schedule(b.alphas_cumprod, respaced_timesteps(steps_, T));

  BackendConfig bc;
  bc.kind = pick_backend(b, o.backend);
  bc.threads = o.threads;
  bc.device_id = o.device_id;
  bc.rows = rows_;
  if (bc.kind == TIMAR_BACKEND_TENSORRT) {
#ifdef TIMAR_WITH_TENSORRT
    std::string why;
    try {
      backend_ = make_trt_backend(b, bc, &why);
    } catch (const BundleError& e) {
      throw Error(TIMAR_ERR_BUNDLE, e.what());
    }
    if (!backend_) {
      if (o.backend == TIMAR_BACKEND_TENSORRT) throw Error(TIMAR_ERR_UNSUPPORTED, "backend: TensorRT unavailable: " + why);
      bc.kind = ort_has_cuda() ? TIMAR_BACKEND_ORT_CUDA : TIMAR_BACKEND_ORT_CPU;
    }
#else
    throw Error(TIMAR_ERR_UNSUPPORTED,
                "backend: TensorRT is not compiled into this library (configure with -DTIMAR_WITH_TENSORRT=ON)");
#endif
  }
  if (!backend_) backend_ = make_ort_backend(b, bc);

  const size_t F = size_t(b.frames), Da = size_t(b.speech_dim), R = size_t(rows_);
  wave_.resize(2 * size_t(b.samples));
  feats_.resize(2 * F * Da);
  speech_u_.resize(R * F * Da);
  speech_a_.resize(R * F * Da);
  user_motion_.resize(R * F * 56);
  agent_motion_.resize(R * F * 56);
  agent_mask_.resize(R * F);
  uncond_.resize(R);
  absent_.resize(R);
  z_.resize(R * F * size_t(b.z_dim));
  x_.resize(F * 56);
  token_ages_.resize(R * size_t(b.slots) * size_t(b.tokens_per_turn));
  if (window_) {
    tokens_.resize(R * turn_token_floats());
    window_buf_.resize(R * size_t(b.context_turns) * turn_token_floats());
  }
  reset();
}

void Session::info(timar_info* out) const {
  const Bundle& b = bundle_;
  out->fps = b.fps;
  out->sample_rate = b.sample_rate;
  out->frames_per_turn = b.frames;
  out->samples_per_turn = b.samples;
  out->motion_dim = TIMAR_MOTION_DIM;
  out->context_turns = b.context_turns;
  out->steps = steps_;
  out->history = feedback_ ? TIMAR_HISTORY_FEEDBACK : TIMAR_HISTORY_MASKED;
  out->backend = backend_->kind();
  out->temperature = temperature_;
  out->cfg = cfg_;
  out->seed = seed_;
  out->turns = turns_;
  out->exp_begin = b.exp_range[0];
  out->exp_end = b.exp_range[1];
  out->jaw_begin = b.jaw_range[0];
  out->jaw_end = b.jaw_range[1];
  out->neck_begin = b.neck_range[0];
  out->neck_end = b.neck_range[1];
}

void Session::reset() {
  backend_->clear_cache();
  ages_.assign(size_t(bundle_.slots), bundle_.context_turns);
  win_ = TokenWindow();
  if (window_) win_.tokens.assign(window_capacity() * turn_token_floats(), 0.0f);
  noise_ = PhiloxNormal(seed_);
  buf_ua_.clear();
  buf_aa_.clear();
  buf_um_.clear();
  tracked_ = false;
  turns_ = 0;
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
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(a[i]))
      throw Error(TIMAR_ERR_NOT_FINITE, std::string(name) + ": expected finite samples, found NaN or Inf at sample " +
                                            std::to_string(i));
}

void Session::check_motion(const float* m, size_t frames, const char* name, bool exact) const {
  if (!m && frames) throw Error(TIMAR_ERR_NULL_POINTER, std::string(name) + ": NULL pointer with " + std::to_string(frames) + " frames");
  if (m && exact && frames != size_t(bundle_.frames))
    throw Error(TIMAR_ERR_WRONG_LENGTH, std::string(name) + ": expected " + std::to_string(bundle_.frames) +
                                            " frames (one turn) of " + std::to_string(TIMAR_MOTION_DIM) +
                                            " floats, got " + std::to_string(frames) +
                                            " frames; pass NULL with 0 frames when the user's face is not tracked");
  for (size_t i = 0; i < frames * TIMAR_MOTION_DIM; ++i)
    if (!std::isfinite(m[i]))
      throw Error(TIMAR_ERR_NOT_FINITE, std::string(name) + ": contains NaN or Inf (frame " +
                                            std::to_string(i / TIMAR_MOTION_DIM) + ", channel " +
                                            std::to_string(i % TIMAR_MOTION_DIM) + ")");
}

static void check_capacity(const float* out, size_t cap, size_t need) {
  if (need && !out) throw Error(TIMAR_ERR_NULL_POINTER, "out_motion: NULL pointer");
  if (cap < need)
    throw Error(TIMAR_ERR_BUFFER_TOO_SMALL, "out_motion: capacity " + std::to_string(cap) + " frames, need " +
                                                std::to_string(need) + " frames");
}

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

// ---- the turn -------------------------------------------------------------------------------
int Session::next_slot() const {
  if (ages_.empty()) return -1;
  return int(std::max_element(ages_.begin(), ages_.end()) - ages_.begin());   // first of the oldest
}

Session::Pending Session::run_turn(const float* ua, const float* um, const float* aa, float* motion) {
  if (fail_after_ >= 0 && runs_++ >= fail_after_) {   // tests of the rollback paths only
    fail_after_ = -1;
    throw Error(TIMAR_ERR_BACKEND, "injected backend failure (TIMAR_TEST_FAIL_AFTER_TURNS)");
  }
  const Bundle& b = bundle_;
  const size_t F = size_t(b.frames), S = size_t(b.samples), Da = size_t(b.speech_dim), R = size_t(rows_);
  const size_t D = 56;
  Pending p{noise_, win_.user, win_.agent};
  if (window_) {   // audio normalised with the statistics of everything so far, this turn included
    p.user = win_.user.update(ua, S);
    p.agent = win_.agent.update(aa, S);
    p.user.apply(ua, S, b.audio_norm_eps, wave_.data());
    p.agent.apply(aa, S, b.audio_norm_eps, wave_.data() + S);
  } else {
    std::copy(ua, ua + S, wave_.begin());
    std::copy(aa, aa + S, wave_.begin() + std::ptrdiff_t(S));
  }
  backend_->encode_audio(wave_.data(), feats_.data());
  for (size_t r = 0; r < R; ++r) {
    std::copy(feats_.begin(), feats_.begin() + std::ptrdiff_t(F * Da), speech_u_.begin() + std::ptrdiff_t(r * F * Da));
    std::copy(feats_.begin() + std::ptrdiff_t(F * Da), feats_.end(), speech_a_.begin() + std::ptrdiff_t(r * F * Da));
    // A user whose face is not tracked reads as the neutral face (all-zero FLAME values); cached
    // bundles' models also get the "absent" flag, which replaces those tokens.
    for (size_t i = 0; i < F * D; ++i)
      user_motion_[r * F * D + i] = ((um ? um[i] : 0.0f) - b.motion_mean[i % D]) / b.motion_std[i % D];
    uncond_[r] = r == 0 ? 0.0f : 1.0f;
    absent_[r] = um ? 0.0f : 1.0f;
  }
  if (window_)
    encode_window();
  else
    encode_cached();
  backend_->bind_z(z_.data(), rows_ * b.frames);

  Backend* be = backend_.get();
  sample_turn([be](const float* x, const float* t, int n, float* out) { be->denoise(x, t, n, out); },
              b.frames, sched_, p.noise, temperature_, cfg_, x_.data(), sampler_ws_);
  if (feedback_) {
    for (size_t r = 0; r < R; ++r) {
      std::copy(x_.begin(), x_.end(), agent_motion_.begin() + std::ptrdiff_t(r * F * D));
      uncond_[r] = 0.0f;
    }
    std::fill(agent_mask_.begin(), agent_mask_.end(), 0.0f);
    backend_->encoder_step(step_inputs(), z_.data());
  }
  for (size_t i = 0; i < F * D; ++i) motion[i] = x_[i] * b.motion_std[i % D] + b.motion_mean[i % D];
  return p;
}

StepInputs Session::step_inputs() {
  StepInputs in;
  in.rows = rows_;
  in.user_speech = speech_u_.data();
  in.user_motion = user_motion_.data();
  in.agent_speech = speech_a_.data();
  in.agent_motion = agent_motion_.data();
  in.agent_mask = agent_mask_.data();
  in.uncond = uncond_.data();
  in.user_motion_absent = absent_.data();
  in.past_turn_age = token_ages_.data();
  return in;
}

// cached: encoder_step over the committed cache, the ring ages as past_turn_age.
void Session::encode_cached() {
  const Bundle& b = bundle_;
  const size_t R = size_t(rows_), P = size_t(b.tokens_per_turn), SP = size_t(b.slots) * P;
  std::fill(agent_motion_.begin(), agent_motion_.end(), 0.0f);
  std::fill(agent_mask_.begin(), agent_mask_.end(), 1.0f);
  for (size_t s = 0; s < size_t(b.slots); ++s) {
    int64_t age = ages_[s];
    if (visible_ >= 0 && age > visible_) age = b.context_turns;
    for (size_t r = 0; r < R; ++r) std::fill_n(token_ages_.begin() + std::ptrdiff_t(r * SP + s * P), P, age);
  }
  backend_->encoder_step(step_inputs(), z_.data());
}

// window_recompute: this turn's tokens, then the whole window (the visible past turns' tokens,
// oldest first, the same for every row, and this turn's row) through window_encoder.
void Session::encode_window() {
  TokenInputs in;
  in.rows = rows_;
  in.user_speech = speech_u_.data();
  in.user_motion = user_motion_.data();
  in.agent_speech = speech_a_.data();
  in.uncond = uncond_.data();
  backend_->embed_turn(in, tokens_.data());
  const size_t PD = turn_token_floats(), cap = window_capacity();
  const int n_past = visible_ < 0 ? win_.count : std::min(visible_, win_.count);
  const size_t n = size_t(n_past) + 1;   // turns in the window
  for (size_t r = 0; r < size_t(rows_); ++r) {
    float* dst = window_buf_.data() + r * n * PD;
    for (int i = 0; i < n_past; ++i) {   // the last n_past stored turns
      const size_t turn = (size_t(win_.oldest) + size_t(win_.count - n_past + i)) % cap;
      std::copy_n(win_.tokens.begin() + std::ptrdiff_t(turn * PD), PD, dst + size_t(i) * PD);
    }
    std::copy_n(tokens_.begin() + std::ptrdiff_t(r * PD), PD, dst + size_t(n_past) * PD);
  }
  backend_->encode_window(window_buf_.data(), rows_, int(n) * bundle_.tokens_per_turn, z_.data());
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

void Session::commit_turn(const Pending& p) {
  if (window_) {
    push_window_turn(tokens_.data());   // row 0: the conditional row
    win_.user = p.user;
    win_.agent = p.agent;
  } else {
    const int slot = next_slot();
    if (slot >= 0) {
      backend_->commit(slot);
      const int w = bundle_.context_turns;
      for (int& a : ages_) a = a < w ? std::min(a + 1, w) : w;
      ages_[size_t(slot)] = 1;
    }
  }
  noise_ = p.noise;
  ++turns_;
}

// ---- public calls ---------------------------------------------------------------------------
void Session::step(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n,
                   float* out, size_t cap) {
  check_audio(ua, ua_n, "user_audio", true);
  check_audio(aa, aa_n, "agent_audio", true);
  check_motion(um, um_n, "user_motion", true);
  check_capacity(out, cap, size_t(bundle_.frames));
  Pending p = run_turn(ua, um, aa, out);
  commit_turn(p);
}

size_t Session::feed_frames(size_t ua_n, size_t um_n, size_t aa_n) const {
  const size_t S = size_t(bundle_.samples), F = size_t(bundle_.frames);
  const bool tracked = tracked_ || um_n > 0;
  size_t k = std::min((buf_ua_.size() + ua_n) / S, (buf_aa_.size() + aa_n) / S);
  if (tracked) k = std::min(k, (buf_um_.size() / 56 + um_n) / F);
  return k * F;
}

size_t Session::feed(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n,
                     float* out, size_t cap) {
  check_audio(ua, ua_n, "user_audio", false);
  check_audio(aa, aa_n, "agent_audio", false);
  check_motion(um, um_n, "user_motion", false);
  const size_t need = feed_frames(ua_n, um_n, aa_n);
  check_capacity(out, cap, need);
  const size_t S = size_t(bundle_.samples), F = size_t(bundle_.frames), D = 56;
  const size_t turns = need / F;
  // Append in place; on failure the buffers are cut back to their old sizes.
  const size_t n_ua0 = buf_ua_.size(), n_aa0 = buf_aa_.size(), n_um0 = buf_um_.size();
  const bool tracked0 = tracked_;
  // Undo log for the turns committed by this call (only needed when a later one fails): the
  // cache slots it overwrites, or a copy of the token window.
  std::vector<int> ages0;
  if (turns) ages0 = ages_;
  TokenWindow win0;
  if (window_ && turns >= 2) win0 = win_;
  const PhiloxNormal noise0 = noise_;
  const uint64_t turns0 = turns_;
  std::vector<std::pair<int, std::vector<float>>> undo;
  try {
    if (ua_n) buf_ua_.insert(buf_ua_.end(), ua, ua + ua_n);
    if (aa_n) buf_aa_.insert(buf_aa_.end(), aa, aa + aa_n);
    if (um_n) buf_um_.insert(buf_um_.end(), um, um + um_n * D);
    tracked_ = tracked_ || um_n > 0;
    for (size_t t = 0; t < turns; ++t) {
      Pending p = run_turn(buf_ua_.data() + t * S, tracked_ ? buf_um_.data() + t * F * D : nullptr,
                           buf_aa_.data() + t * S, out + t * F * D);
      if (!window_ && t + 1 < turns && next_slot() >= 0) {   // a later turn may still fail: keep what we overwrite
        undo.emplace_back(next_slot(), std::vector<float>());
        backend_->read_slot(undo.back().first, undo.back().second);
      }
      commit_turn(p);
    }
  } catch (...) {
    for (auto it = undo.rbegin(); it != undo.rend(); ++it) backend_->write_slot(it->first, it->second);
    if (turns) ages_ = ages0;
    if (window_ && turns >= 2) win_.swap(win0);
    noise_ = noise0;
    turns_ = turns0;
    buf_ua_.resize(n_ua0);
    buf_aa_.resize(n_aa0);
    buf_um_.resize(n_um0);
    tracked_ = tracked0;
    throw;
  }
  buf_ua_.erase(buf_ua_.begin(), buf_ua_.begin() + std::ptrdiff_t(turns * S));
  buf_aa_.erase(buf_aa_.begin(), buf_aa_.begin() + std::ptrdiff_t(turns * S));
  if (tracked_) buf_um_.erase(buf_um_.begin(), buf_um_.begin() + std::ptrdiff_t(turns * F * D));
  return need;
}

size_t Session::flush(float* out, size_t cap) {
  const size_t S = size_t(bundle_.samples), F = size_t(bundle_.frames), D = 56;
  const size_t real = std::min(buf_ua_.size(), buf_aa_.size());
  const size_t n_frames = std::min(real * F / S, F);
  if (n_frames == 0) {
    buf_ua_.clear();
    buf_aa_.clear();
    buf_um_.clear();
    return 0;
  }
  check_capacity(out, cap, n_frames);
  std::vector<float> ua(S, 0.0f), aa(S, 0.0f), um;
  std::copy_n(buf_ua_.begin(), std::min(S, buf_ua_.size()), ua.begin());
  std::copy_n(buf_aa_.begin(), std::min(S, buf_aa_.size()), aa.begin());
  const size_t have = std::min(F, buf_um_.size() / D);
  if (tracked_ && have) {
    um.assign(buf_um_.begin(), buf_um_.begin() + std::ptrdiff_t(have * D));
    for (size_t f = have; f < F; ++f) um.insert(um.end(), buf_um_.begin() + std::ptrdiff_t((have - 1) * D),
                                                buf_um_.begin() + std::ptrdiff_t(have * D));
  }
  std::vector<float> motion(F * D);
  Pending p = run_turn(ua.data(), um.empty() ? nullptr : um.data(), aa.data(), motion.data());
  commit_turn(p);
  buf_ua_.clear();
  buf_aa_.clear();
  buf_um_.clear();
  std::copy_n(motion.begin(), n_frames * D, out);
  return n_frames;
}

// ---- state blob -----------------------------------------------------------------------------
// Two layouts (native endianness), told apart by their magic, so a snapshot never loads into a
// session of the other attention kind.
// cached, "TIMARST1": u32 abi, u32 rows, char[64] encoder_step sha256, u32 slots, i32 ages[slots],
//   then the stream part with tail = cache floats, then the cache.
// window_recompute, "TIMARSW1": u32 abi, char[64] token_embed sha256, char[64] window_encoder
//   sha256, u32 W-1, u32 P, u32 D, u32 past turns n, u64 count + f64 sum + f64 sum_sq of the user's
//   audio statistics, then the agent's, then the stream part with tail = n * P * D, then the past
//   turns' tokens [n, P, D] oldest first.
// The stream part: u64 seed, u64 counter_lo, u64 counter_hi, u64 turns, u32 tracked,
//   u64 n_user_audio, u64 n_agent_audio, u64 n_user_motion_floats, u64 tail floats, then the
//   floats: user audio, agent audio, user motion.
namespace {
const char kMagic[8] = {'T', 'I', 'M', 'A', 'R', 'S', 'T', '1'};
const char kWindowMagic[8] = {'T', 'I', 'M', 'A', 'R', 'S', 'W', '1'};
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
  void raw(void* out, size_t k) {
    if (n - off < k) throw Error(TIMAR_ERR_STATE, "state: truncated blob (not from timar_get_state?)");
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
    if (!std::isfinite(r.sum) || !std::isfinite(r.sum_sq) || r.sum_sq < 0)
      throw Error(TIMAR_ERR_STATE, "state: corrupt audio statistics");
    return r;
  }
};

namespace {
void put_sha(StateWriter& w, const std::string& sha) {
  char buf[64] = {0};
  std::memcpy(buf, sha.data(), std::min<size_t>(64, sha.size()));
  w.raw(buf, 64);
}
bool same_sha(StateReader& r, const std::string& sha) {
  char buf[64];
  r.raw(buf, 64);
  return sha.size() == 64 && std::memcmp(buf, sha.data(), 64) == 0;
}

// The stream part of a blob, read and checked before anything in the session changes.
struct StreamState {
  uint64_t seed = 0, lo = 0, hi = 0, turns = 0;
  bool tracked = false;
  std::vector<float> ua, aa, um, tail;
};

StreamState read_stream(StateReader& r, uint64_t tail_floats) {
  StreamState st;
  st.seed = r.get<uint64_t>();
  st.lo = r.get<uint64_t>();
  st.hi = r.get<uint64_t>();
  st.turns = r.get<uint64_t>();
  const uint32_t tracked = r.get<uint32_t>();
  const uint64_t nua = r.get<uint64_t>(), naa = r.get<uint64_t>(), num_ = r.get<uint64_t>(), nt = r.get<uint64_t>();
  if (tracked > 1 || num_ % 56 || nt != tail_floats) throw Error(TIMAR_ERR_STATE, "state: corrupt header");
  const uint64_t rest = r.n - r.off;
  if (nua > rest / 4 || naa > rest / 4 || num_ > rest / 4 || nt > rest / 4 || (nua + naa + num_ + nt) * 4 != rest)
    throw Error(TIMAR_ERR_STATE, "state: size does not match its header");
  st.tracked = tracked != 0;
  st.ua.resize(nua);
  st.aa.resize(naa);
  st.um.resize(num_);
  st.tail.resize(nt);
  r.raw(st.ua.data(), 4 * nua);
  r.raw(st.aa.data(), 4 * naa);
  r.raw(st.um.data(), 4 * num_);
  r.raw(st.tail.data(), 4 * nt);
  return st;
}
}  // namespace

void Session::put_stream(StateWriter& w, uint64_t tail_floats) const {
  w.put<uint64_t>(noise_.seed());
  w.put<uint64_t>(noise_.counter_lo());
  w.put<uint64_t>(noise_.counter_hi());
  w.put<uint64_t>(turns_);
  w.put<uint32_t>(tracked_ ? 1 : 0);
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
  const size_t stream = 8 * 4 + 4 + 8 * 4 + 4 * (buf_ua_.size() + buf_aa_.size() + buf_um_.size());
  if (window_)
    return 8 + 4 + 64 + 64 + 4 * 4 + 2 * (8 * 3) + stream + 4 * size_t(win_.count) * turn_token_floats();
  return 8 + 4 + 4 + 64 + 4 + 4 * ages_.size() + stream + 4 * backend_->cache_floats();
}

std::vector<uint8_t> Session::get_state() const { return window_ ? get_window_state() : get_cached_state(); }

std::vector<uint8_t> Session::get_cached_state() const {
  std::vector<uint8_t> v;
  v.reserve(state_size());
  StateWriter w{v};
  w.raw(kMagic, 8);
  w.put<uint32_t>(TIMAR_ABI_VERSION);
  w.put<uint32_t>(uint32_t(rows_));
  put_sha(w, bundle_.graph_sha256.at("encoder_step"));
  w.put<uint32_t>(uint32_t(ages_.size()));
  for (int a : ages_) w.put<int32_t>(a);
  put_stream(w, backend_->cache_floats());
  put_buffers(w);
  const size_t at = v.size();
  v.resize(at + 4 * backend_->cache_floats());
  backend_->cache_to_host(reinterpret_cast<float*>(v.data() + at));
  return v;
}

std::vector<uint8_t> Session::get_window_state() const {
  std::vector<uint8_t> v;
  v.reserve(state_size());
  StateWriter w{v};
  w.raw(kWindowMagic, 8);
  w.put<uint32_t>(TIMAR_ABI_VERSION);
  put_sha(w, bundle_.graph_sha256.at("token_embed"));
  put_sha(w, bundle_.graph_sha256.at("window_encoder"));
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

void Session::set_state(const uint8_t* data, size_t size) {
  StateReader r{data, size};
  char magic[8];
  r.raw(magic, 8);
  const bool cached = std::memcmp(magic, kMagic, 8) == 0, window = std::memcmp(magic, kWindowMagic, 8) == 0;
  if (!cached && !window) throw Error(TIMAR_ERR_STATE, "state: not a timar_get_state() blob");
  if (window != window_)
    throw Error(TIMAR_ERR_STATE, window ? "state: a snapshot of a window_recompute session (an authors' model); "
                                          "this session runs a cached bundle"
                                        : "state: a snapshot of a cached session; this session runs a "
                                          "window_recompute bundle (an authors' model)");
  if (r.get<uint32_t>() != TIMAR_ABI_VERSION) throw Error(TIMAR_ERR_STATE, "state: from another ABI version");
  if (window_)
    set_window_state(r);
  else
    set_cached_state(r);
}

void Session::set_cached_state(StateReader& r) {
  const uint32_t rows = r.get<uint32_t>();
  if (!same_sha(r, bundle_.graph_sha256.at("encoder_step")))
    throw Error(TIMAR_ERR_STATE, "state: expected a snapshot of a session on this bundle");
  if (rows != uint32_t(rows_))
    throw Error(TIMAR_ERR_STATE, "state: taken with " + std::to_string(rows) + " cache row(s), this session has " +
                                     std::to_string(rows_) + " (same bundle, but another cfg setting?)");
  const uint32_t slots = r.get<uint32_t>();
  if (slots != ages_.size()) throw Error(TIMAR_ERR_STATE, "state: slot count differs from this bundle's");
  std::vector<int> ages(slots);
  for (int& a : ages) {
    a = r.get<int32_t>();
    if (a < 1 || a > bundle_.context_turns) throw Error(TIMAR_ERR_STATE, "state: corrupt ring ages");
  }
  StreamState st = read_stream(r, backend_->cache_floats());
  backend_->cache_from_host(st.tail.data());
  ages_ = ages;
  noise_ = PhiloxNormal(st.seed, st.lo, st.hi);
  turns_ = st.turns;
  tracked_ = st.tracked;
  buf_ua_.swap(st.ua);
  buf_aa_.swap(st.aa);
  buf_um_.swap(st.um);
}

// A window snapshot holds no cache rows: it loads into a session of the same bundle whatever
// its cfg setting (the past turns are the conditional row's tokens either way).
void Session::set_window_state(StateReader& r) {
  const bool embed_ok = same_sha(r, bundle_.graph_sha256.at("token_embed"));
  const bool window_ok = same_sha(r, bundle_.graph_sha256.at("window_encoder"));
  if (!embed_ok || !window_ok) throw Error(TIMAR_ERR_STATE, "state: expected a snapshot of a session on this bundle");
  const uint32_t cap = r.get<uint32_t>(), P = r.get<uint32_t>(), D = r.get<uint32_t>(), n = r.get<uint32_t>();
  if (cap != window_capacity() || P != uint32_t(bundle_.tokens_per_turn) || D != uint32_t(bundle_.token_dim))
    throw Error(TIMAR_ERR_STATE, "state: window size differs from this bundle's");
  if (n > cap) throw Error(TIMAR_ERR_STATE, "state: corrupt window (" + std::to_string(n) + " past turns, at most " +
                                                std::to_string(cap) + ")");
  TokenWindow win;
  win.user = r.norm();
  win.agent = r.norm();
  StreamState st = read_stream(r, uint64_t(n) * turn_token_floats());
  win.tokens.assign(window_capacity() * turn_token_floats(), 0.0f);
  std::copy(st.tail.begin(), st.tail.end(), win.tokens.begin());
  win.oldest = 0;
  win.count = int(n);
  win_.swap(win);
  noise_ = PhiloxNormal(st.seed, st.lo, st.hi);
  turns_ = st.turns;
  tracked_ = st.tracked;
  buf_ua_.swap(st.ua);
  buf_aa_.swap(st.aa);
  buf_um_.swap(st.um);
}

}  // namespace timar
