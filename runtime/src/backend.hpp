// A backend runs the bundle's graphs and owns the KV cache (host or device memory) of cached
// bundles. Everything else (ring, token window, sampler, generator, buffers) is shared in
// session.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "error.hpp"

namespace timar {

// Inputs of encoder_step for `rows` rows (1, or 2 with classifier-free guidance).
struct StepInputs {
  int rows = 1;
  const float* user_speech = nullptr;    // [rows, F, Da]
  const float* user_motion = nullptr;    // [rows, F, 56] normalised
  const float* agent_speech = nullptr;   // [rows, F, Da]
  const float* agent_motion = nullptr;   // [rows, F, 56]
  const float* agent_mask = nullptr;     // [rows, F]
  const float* uncond = nullptr;         // [rows]
  const float* user_motion_absent = nullptr;  // [rows]
  const int64_t* past_turn_age = nullptr;     // [rows, (W-1)*P]
};

// Inputs of token_embed (window_recompute bundles) for `rows` rows.
struct TokenInputs {
  int rows = 1;
  const float* user_speech = nullptr;    // [rows, F, Da]
  const float* user_motion = nullptr;    // [rows, F, 56] normalised
  const float* agent_speech = nullptr;   // [rows, F, Da]
  const float* uncond = nullptr;         // [rows]
};

struct BackendConfig {
  int kind = 0;          // timar_backend (never AUTO here)
  int threads = 0;
  int device_id = 0;
  int rows = 1;          // rows of the cache (2 with CFG)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual int kind() const = 0;

  // waveform [2, samples] (user, agent) -> speech features [2, F, Da]
  virtual void encode_audio(const float* waveform, float* features) = 0;
  // One encoder step reading the committed cache. z [rows, F, Dz] goes to `z`; the present
  // keys/values stay in the backend as the pending turn (the last call wins).
  virtual void encoder_step(const StepInputs& in, float* z) = 0;
  // Bind z [n, Dz] for the following denoise calls (constant over a turn's steps).
  virtual void bind_z(const float* z, int n) = 0;
  // x_t [n, 56], t [n] -> model output [n, 112]
  virtual void denoise(const float* x, const float* t, int n, float* out) = 0;

  // window_recompute bundles (the backends that run them override these):
  // one turn's tokens [rows, P, D] from token_embed;
  virtual void embed_turn(const TokenInputs& in, float* tokens) {
    (void)in, (void)tokens;
    throw Error(TIMAR_ERR_UNSUPPORTED, std::string("backend: ") + name() + " does not run window_recompute bundles");
  }
  // the window's tokens [rows, n, D] (n = k * P, k = 1..W) -> z [rows, F, Dz] of its last turn.
  virtual void encode_window(const float* tokens, int rows, int n, float* z) {
    (void)tokens, (void)rows, (void)n, (void)z;
    throw Error(TIMAR_ERR_UNSUPPORTED, std::string("backend: ") + name() + " does not run window_recompute bundles");
  }

  // cached bundles: the cache [L, 2, rows, H, (W-1)*P, hd]: zero it; write the pending turn's row 0 into
  // `slot` of every row; read / write one slot (for undo); the whole cache to / from the host.
  virtual void clear_cache() = 0;
  // Are the pending turn's keys/values (row 0: what commit writes) all finite?
  virtual bool pending_finite() = 0;
  virtual void commit(int slot) = 0;
  virtual void read_slot(int slot, std::vector<float>& out) = 0;
  virtual void write_slot(int slot, const std::vector<float>& in) = 0;
  virtual size_t cache_floats() const = 0;
  virtual void cache_to_host(float* out) = 0;
  virtual void cache_from_host(const float* in) = 0;
};

std::unique_ptr<Backend> make_ort_backend(const Bundle& b, const BackendConfig& cfg);
bool ort_has_cuda();
std::string ort_version();
#ifdef TIMAR_WITH_TENSORRT
// nullptr (and a reason) when no engine set matches this GPU and TensorRT version.
std::unique_ptr<Backend> make_trt_backend(const Bundle& b, const BackendConfig& cfg, std::string* why);
#endif

// Shared helper: copy row 0 of present [L, 2, R, H, P, hd] into slot `slot` of every row of
// cache [L, 2, R, H, S*P, hd] (host memory).
void host_commit(const float* present, float* cache, int L, int R, int H, int S, int P, int hd, int slot);
// Are row 0's blocks of present [L, 2, R, H, P, hd] (host memory) all finite?
bool host_row0_finite(const float* present, int L, int R, int H, int P, int hd);
void host_read_slot(const float* cache, float* out, int L, int R, int H, int S, int P, int hd, int slot);
void host_write_slot(float* cache, const float* in, int L, int R, int H, int S, int P, int hd, int slot);

}  // namespace timar
