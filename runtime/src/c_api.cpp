// The C ABI (include/timar.h): every entry point catches everything, sets the thread-local
// last error and returns a status. No exception or C++ type leaves this file.
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "error.hpp"
#include "model.hpp"
#include "philox.hpp"
#include "session.hpp"
#include "timar.h"

#ifndef TIMAR_VERSION_STRING
#define TIMAR_VERSION_STRING "0.1.0"
#endif

// The handles: a session holds its Session (which holds its Model); a model handle holds the
// Model and its worker, which the handle stops when it goes.
struct timar_session {
  std::shared_ptr<timar::Session> impl;
};

struct timar_model {
  std::shared_ptr<timar::Model> impl;
  std::mutex worker_mutex;
  std::unique_ptr<timar::Worker> worker;
};

namespace {

thread_local std::string g_last_error;

timar_status fail(timar_status s, const std::string& msg) {
  try {
    g_last_error = msg;
  } catch (...) {
  }
  return s;
}

template <class F>
timar_status guarded(F&& f) {
  try {
    f();
    return TIMAR_OK;
  } catch (...) {
    const timar::Failure failure = timar::current_failure();
    return fail(failure.status, failure.message);
  }
}

#define TIMAR_REQUIRE(ptr, name) \
  if (!(ptr)) throw timar::Error(TIMAR_ERR_NULL_POINTER, std::string(name) + ": NULL pointer")

std::string build_info() {
  std::string s = std::string("timar ") + TIMAR_VERSION_STRING + " (abi " + std::to_string(TIMAR_ABI_VERSION) +
                  "); backends: onnxruntime " + timar::ort_version();
#ifdef TIMAR_WITH_TENSORRT
  s += ", tensorrt";
#endif
  s += timar::ort_has_cuda() ? "; onnxruntime has CUDA" : "; onnxruntime CPU only";
  return s;
}

// Options given (checked for struct_size) or the defaults of init.
template <class Options>
Options options_or_defaults(const Options* given, void (*init)(Options*), const char* type) {
  Options o;
  init(&o);
  if (!given) return o;
  if (given->struct_size != sizeof(Options))
    throw timar::Error(TIMAR_ERR_INVALID_ARGUMENT, std::string("options: struct_size ") +
                                                       std::to_string(given->struct_size) + ", expected " +
                                                       std::to_string(sizeof(Options)) + " (call " + type +
                                                       "_init; header and library versions differ?)");
  return *given;
}

void check_info_size(const timar_info* info) {
  if (info->struct_size != sizeof(timar_info))
    throw timar::Error(TIMAR_ERR_INVALID_ARGUMENT, "out_info: set struct_size to sizeof(timar_info) (" +
                                                       std::to_string(sizeof(timar_info)) + ")");
}

timar_model_options model_part(const timar_options& o) {
  timar_model_options m;
  timar_model_options_init(&m);
  m.backend = o.backend;
  m.threads = o.threads;
  m.device_id = o.device_id;
  m.verify_hashes = o.verify_hashes;
  return m;
}

timar_session_options session_part(const timar_options& o) {
  timar_session_options s;
  timar_session_options_init(&s);
  s.steps = o.steps;
  s.seed = o.seed;
  s.temperature = o.temperature;
  s.cfg = o.cfg;
  s.history = o.history;
  s.context_turns = o.context_turns;
  s.smoothing = o.smoothing;
  s.smoothing_expression = o.smoothing_expression;
  s.smoothing_jaw = o.smoothing_jaw;
  s.smoothing_neck = o.smoothing_neck;
  return s;
}

}  // namespace

extern "C" {

int32_t timar_abi_version(void) { return TIMAR_ABI_VERSION; }
const char* timar_version(void) { return TIMAR_VERSION_STRING; }

const char* timar_build_info(void) {
  static const std::string info = [] {
    try {
      return build_info();
    } catch (...) {
      return std::string("timar ") + TIMAR_VERSION_STRING;
    }
  }();
  return info.c_str();
}

const char* timar_status_string(timar_status s) {
  switch (s) {
    case TIMAR_OK: return "ok";
    case TIMAR_ERR_NULL_POINTER: return "null pointer";
    case TIMAR_ERR_INVALID_ARGUMENT: return "invalid argument";
    case TIMAR_ERR_WRONG_LENGTH: return "wrong length";
    case TIMAR_ERR_NOT_FINITE: return "NaN or Inf in input";
    case TIMAR_ERR_BUFFER_TOO_SMALL: return "output buffer too small";
    case TIMAR_ERR_BUNDLE: return "bad bundle";
    case TIMAR_ERR_UNSUPPORTED: return "unsupported";
    case TIMAR_ERR_BACKEND: return "backend error";
    case TIMAR_ERR_STATE: return "bad state blob";
    case TIMAR_ERR_OUT_OF_MEMORY: return "out of memory";
    case TIMAR_ERR_INTERNAL: return "internal error";
    case TIMAR_ERR_NUMERIC: return "NaN or Inf in the model's output";
  }
  return "unknown status";
}

const char* timar_last_error(void) { return g_last_error.c_str(); }

void timar_options_init(timar_options* o) {
  if (!o) return;
  std::memset(o, 0, sizeof *o);
  o->struct_size = sizeof(timar_options);
  o->steps = 0;
  o->seed = 0;
  o->temperature = NAN;
  o->cfg = NAN;
  o->history = TIMAR_HISTORY_DEFAULT;
  o->threads = 0;
  o->context_turns = -1;
  o->backend = TIMAR_BACKEND_AUTO;
  o->verify_hashes = 1;
  o->device_id = 0;
  o->smoothing = TIMAR_SMOOTHING_DEFAULT;   // the custom time constants stay 0
}

void timar_model_options_init(timar_model_options* o) {
  if (!o) return;
  std::memset(o, 0, sizeof *o);
  o->struct_size = sizeof(timar_model_options);
  o->backend = TIMAR_BACKEND_AUTO;
  o->threads = 0;
  o->device_id = 0;
  o->verify_hashes = 1;
  o->spin = 0;
}

void timar_session_options_init(timar_session_options* o) {
  if (!o) return;
  std::memset(o, 0, sizeof *o);
  o->struct_size = sizeof(timar_session_options);
  o->steps = 0;
  o->seed = 0;
  o->temperature = NAN;
  o->cfg = NAN;
  o->history = TIMAR_HISTORY_DEFAULT;
  o->context_turns = -1;
  o->smoothing = TIMAR_SMOOTHING_DEFAULT;   // the custom time constants stay 0
}

// ---- model ------------------------------------------------------------------------------------
timar_status timar_model_create(const char* bundle_dir, const timar_model_options* options, timar_model** out) {
  return guarded([&] {
    TIMAR_REQUIRE(out, "out_model");
    *out = nullptr;
    TIMAR_REQUIRE(bundle_dir, "bundle_dir");
    const timar_model_options o = options_or_defaults(options, timar_model_options_init, "timar_model_options");
    std::unique_ptr<timar_model> handle(new timar_model());
    handle->impl = std::make_shared<timar::Model>(timar::open_bundle(bundle_dir, o.verify_hashes != 0), o);
    *out = handle.release();
  });
}

void timar_model_destroy(timar_model* m) { delete m; }   // the worker's destructor stops it

timar_status timar_model_info(const timar_model* m, timar_info* info) {
  return guarded([&] {
    TIMAR_REQUIRE(m, "model");
    TIMAR_REQUIRE(info, "out_info");
    check_info_size(info);
    m->impl->info(info);
  });
}

const char* timar_model_backend_name(const timar_model* m) { return m ? m->impl->backend().name() : ""; }

timar_status timar_model_run_ready(timar_model* m, size_t max_batch, size_t* out_turns, size_t* out_batches) {
  if (out_turns) *out_turns = 0;
  if (out_batches) *out_batches = 0;
  return guarded([&] {
    TIMAR_REQUIRE(m, "model");
    const timar::Model::Round round = m->impl->run_round(max_batch);
    if (out_turns) *out_turns = round.turns;
    if (out_batches) *out_batches = round.batches;
  });
}

timar_status timar_model_start_worker(timar_model* m, size_t max_batch) {
  return guarded([&] {
    TIMAR_REQUIRE(m, "model");
    std::lock_guard<std::mutex> lock(m->worker_mutex);
    if (m->worker)
      throw timar::Error(TIMAR_ERR_INVALID_ARGUMENT,
                         "model: its worker is already running (timar_model_stop_worker first)");
    m->worker.reset(new timar::Worker(m->impl, max_batch));
  });
}

timar_status timar_model_stop_worker(timar_model* m) {
  return guarded([&] {
    TIMAR_REQUIRE(m, "model");
    std::lock_guard<std::mutex> lock(m->worker_mutex);
    m->worker.reset();
  });
}

// ---- session ----------------------------------------------------------------------------------
timar_status timar_session_create_from_model(timar_model* m, const timar_session_options* options,
                                             timar_session** out) {
  return guarded([&] {
    TIMAR_REQUIRE(out, "out_session");
    *out = nullptr;
    TIMAR_REQUIRE(m, "model");
    const timar_session_options o =
        options_or_defaults(options, timar_session_options_init, "timar_session_options");
    std::unique_ptr<timar_session> handle(new timar_session());
    handle->impl = timar::Session::create(m->impl, o.seed, timar::session_settings(m->impl->bundle(), o));
    *out = handle.release();
  });
}

// The session's settings are checked before the graphs load (a typo costs no load).
timar_status timar_session_create(const char* bundle_dir, const timar_options* options, timar_session** out) {
  return guarded([&] {
    TIMAR_REQUIRE(out, "out_session");
    *out = nullptr;
    TIMAR_REQUIRE(bundle_dir, "bundle_dir");
    const timar_options o = options_or_defaults(options, timar_options_init, "timar_options");
    timar::Bundle bundle = timar::open_bundle(bundle_dir, o.verify_hashes != 0);
    const timar_session_options so = session_part(o);
    timar::TurnSettings settings = timar::session_settings(bundle, so);
    auto model = std::make_shared<timar::Model>(std::move(bundle), model_part(o));
    std::unique_ptr<timar_session> handle(new timar_session());
    handle->impl = timar::Session::create(std::move(model), so.seed, std::move(settings));
    *out = handle.release();
  });
}

void timar_session_destroy(timar_session* s) { delete s; }

timar_status timar_session_info(const timar_session* s, timar_info* info) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(info, "out_info");
    check_info_size(info);
    s->impl->info(info);
  });
}

const char* timar_session_backend_name(const timar_session* s) { return s ? s->impl->backend_name() : ""; }

timar_status timar_session_reset(timar_session* s) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    s->impl->reset();
  });
}

timar_status timar_step(timar_session* s, const float* ua, size_t ua_n, const float* um, size_t um_n,
                        const float* aa, size_t aa_n, float* out, size_t cap) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    s->impl->step(ua, ua_n, um, um_n, aa, aa_n, out, cap);
  });
}

timar_status timar_feed(timar_session* s, const float* ua, size_t ua_n, const float* um, size_t um_n,
                        const float* aa, size_t aa_n, float* out, size_t cap, size_t* out_frames) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(out_frames, "out_frames");
    *out_frames = 0;
    try {
      *out_frames = s->impl->feed(ua, ua_n, um, um_n, aa, aa_n, out, cap);
    } catch (const timar::Error& e) {
      if (e.status == TIMAR_ERR_BUFFER_TOO_SMALL) *out_frames = s->impl->feed_frames(ua_n, um_n, aa_n);
      throw;
    }
  });
}

timar_status timar_feed_frames(const timar_session* s, size_t ua_n, size_t um_n, size_t aa_n, size_t* out_frames) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(out_frames, "out_frames");
    *out_frames = s->impl->feed_frames(ua_n, um_n, aa_n);
  });
}

timar_status timar_flush(timar_session* s, float* out, size_t cap, size_t* out_frames) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(out_frames, "out_frames");
    *out_frames = 0;
    try {
      *out_frames = s->impl->flush(out, cap);
    } catch (const timar::Error& e) {
      if (e.status == TIMAR_ERR_BUFFER_TOO_SMALL) *out_frames = s->impl->flush_frames();
      throw;
    }
  });
}

timar_status timar_get_state(const timar_session* s, void* buffer, size_t capacity, size_t* out_size) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(out_size, "out_size");
    if (!buffer) {
      *out_size = s->impl->state_size();
      return;
    }
    const std::vector<uint8_t> blob = s->impl->get_state();   // one snapshot: accept may grow the buffers meanwhile
    *out_size = blob.size();
    if (capacity < blob.size())
      throw timar::Error(TIMAR_ERR_BUFFER_TOO_SMALL, "buffer: capacity " + std::to_string(capacity) +
                                                         " bytes, the state needs " + std::to_string(blob.size()));
    std::memcpy(buffer, blob.data(), blob.size());
  });
}

timar_status timar_set_state(timar_session* s, const void* buffer, size_t size) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(buffer, "buffer");
    s->impl->set_state(static_cast<const uint8_t*>(buffer), size);
  });
}

timar_status timar_session_accept(timar_session* s, const float* ua, size_t ua_n, const float* um, size_t um_n,
                                  const float* aa, size_t aa_n, size_t* out_ready_turns) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    const size_t ready = s->impl->accept(ua, ua_n, um, um_n, aa, aa_n);
    if (out_ready_turns) *out_ready_turns = ready;
  });
}

timar_status timar_session_poll_motion(timar_session* s, float* out, size_t cap, size_t* out_frames,
                                       uint64_t* out_turn, double* out_start_seconds) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(out_frames, "out_frames");
    *out_frames = 0;
    try {
      *out_frames = s->impl->poll_motion(out, cap, out_turn, out_start_seconds);
    } catch (const timar::Error& e) {
      if (e.status == TIMAR_ERR_BUFFER_TOO_SMALL) *out_frames = s->impl->frames_per_turn();
      throw;
    }
  });
}

timar_status timar_pcm16_to_float(const int16_t* pcm, size_t n, float* out) {
  return guarded([&] {
    if (!n) return;
    TIMAR_REQUIRE(pcm, "pcm");
    TIMAR_REQUIRE(out, "out");
    for (size_t i = 0; i < n; ++i) out[i] = float(pcm[i]) / 32768.0f;
  });
}

void timar_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  if (!counter || !key || !out) return;
  timar::philox4x32_10(counter, key, out);
}

timar_status timar_philox_normals(uint64_t seed, uint64_t lo, uint64_t hi, float* out, size_t n) {
  return guarded([&] {
    if (!n) return;
    TIMAR_REQUIRE(out, "out");
    timar::PhiloxNormal g(seed, lo, hi);
    g.normal(out, n);
  });
}

}  // extern "C"
