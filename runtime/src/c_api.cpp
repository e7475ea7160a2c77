// The C ABI (include/timar.h): every entry point catches everything, sets the thread-local
// last error and returns a status. No exception or C++ type leaves this file.
#include <cmath>
#include <cstring>
#include <new>
#include <string>

#include "error.hpp"
#include "philox.hpp"
#include "session.hpp"
#include "timar.h"

#ifndef TIMAR_VERSION_STRING
#define TIMAR_VERSION_STRING "0.1.0"
#endif

struct timar_session {
  timar::Session impl;
  template <class... A>
  explicit timar_session(A&&... a) : impl(std::forward<A>(a)...) {}
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
  } catch (const timar::Error& e) {
    return fail(e.status, e.what());
  } catch (const std::bad_alloc&) {
    return fail(TIMAR_ERR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::invalid_argument& e) {
    return fail(TIMAR_ERR_INVALID_ARGUMENT, e.what());
  } catch (const std::exception& e) {
    return fail(TIMAR_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(TIMAR_ERR_INTERNAL, "internal error: unknown exception");
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
}

timar_status timar_session_create(const char* bundle_dir, const timar_options* options, timar_session** out) {
  return guarded([&] {
    TIMAR_REQUIRE(out, "out_session");
    *out = nullptr;
    TIMAR_REQUIRE(bundle_dir, "bundle_dir");
    timar_options o;
    timar_options_init(&o);
    if (options) {
      if (options->struct_size != sizeof(timar_options))
        throw timar::Error(TIMAR_ERR_INVALID_ARGUMENT,
                           "options: struct_size " + std::to_string(options->struct_size) + ", expected " +
                               std::to_string(sizeof(timar_options)) +
                               " (call timar_options_init; header and library versions differ?)");
      o = *options;
    }
    *out = new timar_session(std::string(bundle_dir), o);
  });
}

void timar_session_destroy(timar_session* s) { delete s; }

timar_status timar_session_info(const timar_session* s, timar_info* info) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(info, "out_info");
    if (info->struct_size != sizeof(timar_info))
      throw timar::Error(TIMAR_ERR_INVALID_ARGUMENT, "out_info: set struct_size to sizeof(timar_info) (" +
                                                         std::to_string(sizeof(timar_info)) + ")");
    s->impl.info(info);
  });
}

const char* timar_session_backend_name(const timar_session* s) { return s ? s->impl.backend_name() : ""; }

timar_status timar_session_reset(timar_session* s) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    s->impl.reset();
  });
}

timar_status timar_step(timar_session* s, const float* ua, size_t ua_n, const float* um, size_t um_n,
                        const float* aa, size_t aa_n, float* out, size_t cap) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    s->impl.step(ua, ua_n, um, um_n, aa, aa_n, out, cap);
  });
}

timar_status timar_feed(timar_session* s, const float* ua, size_t ua_n, const float* um, size_t um_n,
                        const float* aa, size_t aa_n, float* out, size_t cap, size_t* out_frames) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(out_frames, "out_frames");
    *out_frames = 0;
    try {
      *out_frames = s->impl.feed(ua, ua_n, um, um_n, aa, aa_n, out, cap);
    } catch (const timar::Error& e) {
      if (e.status == TIMAR_ERR_BUFFER_TOO_SMALL) *out_frames = s->impl.feed_frames(ua_n, um_n, aa_n);
      throw;
    }
  });
}

timar_status timar_feed_frames(const timar_session* s, size_t ua_n, size_t um_n, size_t aa_n, size_t* out_frames) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(out_frames, "out_frames");
    *out_frames = s->impl.feed_frames(ua_n, um_n, aa_n);
  });
}

timar_status timar_flush(timar_session* s, float* out, size_t cap, size_t* out_frames) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(out_frames, "out_frames");
    *out_frames = 0;
    try {
      *out_frames = s->impl.flush(out, cap);
    } catch (const timar::Error& e) {
      if (e.status == TIMAR_ERR_BUFFER_TOO_SMALL) *out_frames = s->impl.flush_frames();
      throw;
    }
  });
}

timar_status timar_get_state(const timar_session* s, void* buffer, size_t capacity, size_t* out_size) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(out_size, "out_size");
    const size_t need = s->impl.state_size();
    *out_size = need;
    if (!buffer) return;
    if (capacity < need)
      throw timar::Error(TIMAR_ERR_BUFFER_TOO_SMALL, "buffer: capacity " + std::to_string(capacity) +
                                                         " bytes, the state needs " + std::to_string(need));
    const std::vector<uint8_t> blob = s->impl.get_state();
    std::memcpy(buffer, blob.data(), blob.size());
  });
}

timar_status timar_set_state(timar_session* s, const void* buffer, size_t size) {
  return guarded([&] {
    TIMAR_REQUIRE(s, "session");
    TIMAR_REQUIRE(buffer, "buffer");
    s->impl.set_state(static_cast<const uint8_t*>(buffer), size);
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
