// A backend runs a bundle's graphs for a Model: loaded once and shared by all of the model's
// sessions, on any threads. What belongs to one conversation (the KV cache of a cached bundle)
// lives in a KvCache the backend makes for each session; what belongs to one call (the present
// keys/values of an encoder step) lives in a TurnKv the caller owns. So every method below may
// run on several threads at once. Everything else (ring, token window, sampler, generator,
// buffers) is shared in turns.cpp and session.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "error.hpp"

namespace timar {

// Inputs of encoder_step for `rows` rows: the rows of every session of a batch (1 each, or 2
// with classifier-free guidance), session after session.
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
  bool spin = false;     // ONNX Runtime: intra-op threads spin between operators
};

// The cache geometry of a cached bundle: L layers, H heads, S slots of P tokens, hd per head.
struct KvShape {
  int L = 0, H = 0, S = 0, P = 0, hd = 0;
  explicit KvShape(const Bundle& b) : L(b.layers), H(b.heads), S(b.slots), P(b.tokens_per_turn), hd(b.head_dim) {}
  size_t block() const { return size_t(P) * size_t(hd); }   // one (layer, k/v, row, head) slice of a turn
  size_t turn_floats(int rows) const { return size_t(L) * 2 * size_t(rows) * size_t(H) * block(); }
  size_t cache_floats(int rows) const { return turn_floats(rows) * size_t(S); }
};

// One session's KV cache [L, 2, rows, H, S*P, hd], in the backend's memory (host or GPU). Its
// rows are identical copies (the CFG rows read the same past). Made zeroed by Backend::new_cache.
class KvCache {
 public:
  virtual ~KvCache() = default;
  virtual int rows() const = 0;
  virtual size_t floats() const = 0;
  virtual void clear() = 0;
  virtual void to_host(float* out) const = 0;
  virtual void from_host(const float* in) = 0;
  // One slot of every row, [L, 2, rows, H, P, hd] (to undo a commit).
  virtual void read_slot(int slot, std::vector<float>& out) const = 0;
  virtual void write_slot(int slot, const std::vector<float>& in) = 0;
};

// The present keys/values [L, 2, B, H, P, hd] an encoder step computed for its B rows.
class TurnKv {
 public:
  virtual ~TurnKv() = default;
  virtual bool row_finite(int row) = 0;
  // Row `row` into slot `slot` of every row of `cache`.
  virtual void commit(int row, KvCache& cache, int slot) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual int kind() const = 0;
  // Can one encoder_step read the caches of several sessions, stacked along the rows? (Host
  // caches can; GPU caches, which never leave their buffers, cannot.)
  virtual bool stacks_caches() const = 0;
  virtual std::unique_ptr<KvCache> new_cache(int rows) = 0;
  virtual std::unique_ptr<TurnKv> new_turn_kv() = 0;

  // waveforms [n, samples] -> speech features [n, F, Da]
  virtual void encode_audio(const float* waveforms, int n, float* features) = 0;
  // One encoder step reading `caches` (their rows, in order, are the in.rows rows; one cache
  // unless stacks_caches()). z [rows, F, Dz] goes to `z`, the present keys/values to `kv`.
  virtual void encoder_step(const StepInputs& in, KvCache* const* caches, size_t n_caches, float* z, TurnKv& kv) = 0;
  // x_t [n, 56], t [n], z [n, Dz] -> model output [n, 112]
  virtual void denoise(const float* x, const float* t, const float* z, int n, float* out) = 0;

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
};

std::unique_ptr<Backend> make_ort_backend(const Bundle& b, const BackendConfig& cfg);
bool ort_has_cuda();
std::string ort_version();
#ifdef TIMAR_WITH_TENSORRT
// nullptr (and a reason) when no engine set matches this GPU and TensorRT version.
std::unique_ptr<Backend> make_trt_backend(const Bundle& b, const BackendConfig& cfg, std::string* why);
#endif

// Host-memory helpers. present [L, 2, B, H, P, hd]; cache [L, 2, R, H, S*P, hd].
// Row `row` of present into slot `slot` of every row of the cache:
void host_commit(const KvShape& s, const float* present, int present_rows, int row, float* cache, int cache_rows,
                 int slot);
// Are row `row`'s keys/values of present all finite?
bool host_row_finite(const KvShape& s, const float* present, int present_rows, int row);
void host_read_slot(const KvShape& s, const float* cache, int rows, int slot, float* out);
void host_write_slot(const KvShape& s, float* cache, int rows, int slot, const float* in);

}  // namespace timar
