// ONNX Runtime backend (C++ API): CPU, or the CUDA execution provider when the library has it.
// Inputs are wrapped in place (no copies) and outputs land in preallocated host buffers, so a
// turn allocates nothing; the cache is one host array written in place, slot by slot.
// Runs cached bundles (audio_encoder, encoder_step, denoiser) and window_recompute bundles
// (audio_encoder, token_embed, window_encoder, denoiser; no cache).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "backend.hpp"
#include "error.hpp"

namespace timar {

void host_commit(const float* present, float* cache, int L, int R, int H, int S, int P, int hd, int slot) {
  const size_t block = size_t(P) * hd;   // one (l, kv, row, head) slice of a turn
  for (int l = 0; l < L * 2; ++l)
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < H; ++h) {
        const float* src = present + ((size_t(l) * R + 0) * H + h) * block;
        float* dst = cache + ((size_t(l) * R + r) * H + h) * (size_t(S) * block) + size_t(slot) * block;
        std::memcpy(dst, src, block * sizeof(float));
      }
}

bool host_row0_finite(const float* present, int L, int R, int H, int P, int hd) {
  const size_t row = size_t(H) * P * hd;   // one (l, kv) block of row 0
  for (int lk = 0; lk < L * 2; ++lk) {
    const float* p = present + size_t(lk) * R * row;
    for (size_t i = 0; i < row; ++i)
      if (!std::isfinite(p[i])) return false;
  }
  return true;
}

void host_read_slot(const float* cache, float* out, int L, int R, int H, int S, int P, int hd, int slot) {
  const size_t block = size_t(P) * hd;
  size_t o = 0;
  for (int l = 0; l < L * 2; ++l)
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < H; ++h, o += block)
        std::memcpy(out + o, cache + ((size_t(l) * R + r) * H + h) * (size_t(S) * block) + size_t(slot) * block,
                    block * sizeof(float));
}

void host_write_slot(float* cache, const float* in, int L, int R, int H, int S, int P, int hd, int slot) {
  const size_t block = size_t(P) * hd;
  size_t o = 0;
  for (int l = 0; l < L * 2; ++l)
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < H; ++h, o += block)
        std::memcpy(cache + ((size_t(l) * R + r) * H + h) * (size_t(S) * block) + size_t(slot) * block, in + o,
                    block * sizeof(float));
}

namespace {

Ort::Env& ort_env() {
  static Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "timar");
  return env;
}

class OrtBackend final : public Backend {
 public:
  OrtBackend(const Bundle& b, const BackendConfig& cfg)
      : kind_(cfg.kind), rows_(cfg.rows), F_(b.frames), S_(b.samples), Da_(b.speech_dim), Dz_(b.z_dim),
        L_(b.layers), H_(b.heads), hd_(b.head_dim), slots_(b.slots), P_(b.tokens_per_turn), D_(b.token_dim),
        graphs_(b.graph_names()), cache_inputs_(b.cache_inputs), mem_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    Ort::SessionOptions opts;
    opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    opts.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);   // one turn at a time: no inter-op pool
    opts.SetInterOpNumThreads(1);
    if (cfg.threads > 0) opts.SetIntraOpNumThreads(cfg.threads);
    // Pool threads sleep between a graph's many small operators, as in the Python runtime: threads
    // that spin save 3-4 ms of a tiny turn on an idle machine but make it 2-3x slower beside any
    // other busy process (BENCHMARKS.md, contention). Spinning, where enabled, stops when a run
    // returns, so one graph's threads never steal the cores from the next graph of the turn.
    opts.AddConfigEntry("session.intra_op.allow_spinning", "0");
    opts.AddConfigEntry("session.force_spinning_stop", "1");
    if (kind_ == TIMAR_BACKEND_ORT_CUDA) {
      OrtCUDAProviderOptions cuda{};
      cuda.device_id = cfg.device_id;
      try {
        opts.AppendExecutionProvider_CUDA(cuda);
      } catch (const Ort::Exception& e) {
        throw Error(TIMAR_ERR_UNSUPPORTED, std::string("backend: the CUDA provider is not usable in this "
                                                       "ONNX Runtime (") + e.what() + ")");
      }
    }
    for (const char* name : graphs_) {
      const std::string path = b.graph_path(name);
      try {
#ifdef _WIN32
        sessions_.emplace_back(ort_env(), std::filesystem::u8path(path).wstring().c_str(), opts);
#else
        sessions_.emplace_back(ort_env(), path.c_str(), opts);
#endif
      } catch (const Ort::Exception& e) {
        throw Error(TIMAR_ERR_BUNDLE, path + ": ONNX Runtime cannot load this graph (" + e.what() + ")");
      }
    }
    cache_.assign(cache_floats(), 0.0f);
    present_.assign(size_t(L_) * 2 * rows_ * H_ * P_ * hd_, 0.0f);
    step_in_names_ = {"user_speech", "user_motion", "agent_speech", "agent_motion", "agent_mask",
                      "uncond", "user_motion_absent", "past_turn_age"};
    for (const std::string& n : cache_inputs_) step_in_names_.push_back(n.c_str());
    step_in_.reserve(step_in_names_.size());
  }

  const char* name() const override { return kind_ == TIMAR_BACKEND_ORT_CUDA ? "onnxruntime-cuda" : "onnxruntime-cpu"; }
  int kind() const override { return kind_; }

  void encode_audio(const float* waveform, float* features) override {
    const std::array<int64_t, 2> in_shape{2, S_};
    const std::array<int64_t, 3> out_shape{2, F_, Da_};
    Ort::Value in = tensor(const_cast<float*>(waveform), size_t(2) * S_, in_shape.data(), 2);
    Ort::Value out = tensor(features, size_t(2) * F_ * Da_, out_shape.data(), 3);
    const char* in_names[] = {"waveform"};
    const char* out_names[] = {"speech_features"};
    run(graph("audio_encoder"), in_names, &in, 1, out_names, &out, 1);
  }

  void embed_turn(const TokenInputs& x, float* tokens) override {
    const int64_t r = x.rows;
    const std::array<int64_t, 3> speech{r, F_, Da_}, motion{r, F_, 56}, out_shape{r, P_, D_};
    const std::array<int64_t, 1> row{r};
    std::array<Ort::Value, 4> in{tensor(const_cast<float*>(x.user_speech), size_t(r) * F_ * Da_, speech.data(), 3),
                                 tensor(const_cast<float*>(x.user_motion), size_t(r) * F_ * 56, motion.data(), 3),
                                 tensor(const_cast<float*>(x.agent_speech), size_t(r) * F_ * Da_, speech.data(), 3),
                                 tensor(const_cast<float*>(x.uncond), size_t(r), row.data(), 1)};
    const char* in_names[] = {"user_speech", "user_motion", "agent_speech", "uncond"};
    Ort::Value out = tensor(tokens, size_t(r) * P_ * D_, out_shape.data(), 3);
    const char* out_names[] = {"tokens"};
    run(graph("token_embed"), in_names, in.data(), in.size(), out_names, &out, 1);
  }

  void encode_window(const float* tokens, int rows, int n, float* z) override {
    const std::array<int64_t, 3> in_shape{rows, n, D_}, out_shape{rows, F_, Dz_};
    Ort::Value in = tensor(const_cast<float*>(tokens), size_t(rows) * size_t(n) * D_, in_shape.data(), 3);
    Ort::Value out = tensor(z, size_t(rows) * F_ * Dz_, out_shape.data(), 3);
    const char* in_names[] = {"tokens"};
    const char* out_names[] = {"z"};
    run(graph("window_encoder"), in_names, &in, 1, out_names, &out, 1);
  }

  void encoder_step(const StepInputs& x, float* z) override {
    const int64_t r = x.rows;
    if (r != rows_) throw Error(TIMAR_ERR_INTERNAL, "encoder_step: rows differ from the cache's");
    const int64_t sp = int64_t(slots_) * P_;
    const std::array<int64_t, 3> speech{r, F_, Da_}, motion{r, F_, 56};
    const std::array<int64_t, 2> mask{r, F_}, ages{r, sp};
    const std::array<int64_t, 1> row{r};
    const std::array<int64_t, 4> past{r, H_, sp, hd_};
    const std::array<int64_t, 6> present{L_, 2, r, H_, P_, hd_};
    const std::array<int64_t, 3> zs{r, F_, Dz_};
    std::vector<Ort::Value>& in = step_in_;   // reused: its capacity was reserved at construction
    in.clear();
    in.push_back(tensor(const_cast<float*>(x.user_speech), size_t(r) * F_ * Da_, speech.data(), 3));
    in.push_back(tensor(const_cast<float*>(x.user_motion), size_t(r) * F_ * 56, motion.data(), 3));
    in.push_back(tensor(const_cast<float*>(x.agent_speech), size_t(r) * F_ * Da_, speech.data(), 3));
    in.push_back(tensor(const_cast<float*>(x.agent_motion), size_t(r) * F_ * 56, motion.data(), 3));
    in.push_back(tensor(const_cast<float*>(x.agent_mask), size_t(r) * F_, mask.data(), 2));
    in.push_back(tensor(const_cast<float*>(x.uncond), size_t(r), row.data(), 1));
    in.push_back(tensor(const_cast<float*>(x.user_motion_absent), size_t(r), row.data(), 1));
    in.push_back(Ort::Value::CreateTensor<int64_t>(mem_, const_cast<int64_t*>(x.past_turn_age), size_t(r * sp),
                                                   ages.data(), 2));
    // Input i of the cache is the block cache[i / 2][i % 2]: a view into the one buffer.
    const size_t block = size_t(r) * H_ * sp * hd_;
    for (size_t i = 0; i < cache_inputs_.size(); ++i) in.push_back(tensor(cache_.data() + i * block, block, past.data(), 4));
    std::array<Ort::Value, 2> out{tensor(z, size_t(r) * F_ * Dz_, zs.data(), 3),
                                  tensor(present_.data(), present_.size(), present.data(), 6)};
    const char* out_names[] = {"z", "present_key_values"};
    run(graph("encoder_step"), step_in_names_.data(), in.data(), in.size(), out_names, out.data(), out.size());
  }

  void bind_z(const float* z, int n) override { z_.assign(z, z + size_t(n) * Dz_); }

  void denoise(const float* x, const float* t, int n, float* out) override {
    if (size_t(n) * Dz_ != z_.size()) throw Error(TIMAR_ERR_INTERNAL, "denoise: z rows differ");
    const std::array<int64_t, 2> xs{n, 56}, zs{n, Dz_}, os{n, 112};
    const std::array<int64_t, 1> ts{n};
    std::array<Ort::Value, 3> in{tensor(const_cast<float*>(x), size_t(n) * 56, xs.data(), 2),
                                 tensor(const_cast<float*>(t), size_t(n), ts.data(), 1),
                                 tensor(z_.data(), z_.size(), zs.data(), 2)};
    const char* in_names[] = {"x_t", "t", "z"};
    Ort::Value o = tensor(out, size_t(n) * 112, os.data(), 2);
    const char* out_names[] = {"model_output"};
    run(graph("denoiser"), in_names, in.data(), in.size(), out_names, &o, 1);
  }

  void clear_cache() override { std::fill(cache_.begin(), cache_.end(), 0.0f); }
  bool pending_finite() override { return host_row0_finite(present_.data(), L_, rows_, H_, P_, hd_); }
  void commit(int slot) override { host_commit(present_.data(), cache_.data(), L_, rows_, H_, slots_, P_, hd_, slot); }
  void read_slot(int slot, std::vector<float>& out) override {
    out.resize(size_t(L_) * 2 * rows_ * H_ * P_ * hd_);
    host_read_slot(cache_.data(), out.data(), L_, rows_, H_, slots_, P_, hd_, slot);
  }
  void write_slot(int slot, const std::vector<float>& in) override {
    host_write_slot(cache_.data(), in.data(), L_, rows_, H_, slots_, P_, hd_, slot);
  }
  size_t cache_floats() const override { return size_t(L_) * 2 * rows_ * H_ * slots_ * P_ * hd_; }
  void cache_to_host(float* out) override { std::copy(cache_.begin(), cache_.end(), out); }
  void cache_from_host(const float* in) override { std::copy(in, in + cache_.size(), cache_.begin()); }

 private:
  Ort::Value tensor(float* p, size_t n, const int64_t* shape, size_t rank) {
    return Ort::Value::CreateTensor<float>(mem_, p, n, shape, rank);
  }
  // Index of a graph in sessions_ (the bundle's graph_names() order).
  size_t graph(const char* name) const {
    for (size_t i = 0; i < graphs_.size(); ++i)
      if (std::strcmp(graphs_[i], name) == 0) return i;
    throw Error(TIMAR_ERR_INTERNAL, std::string("onnxruntime: this bundle has no graph ") + name);
  }
  void run(size_t graph, const char* const* in_names, const Ort::Value* in, size_t n_in,
           const char* const* out_names, Ort::Value* out, size_t n_out) {
    try {
      sessions_[graph].Run(Ort::RunOptions{nullptr}, in_names, in, n_in, out_names, out, n_out);
    } catch (const Ort::Exception& e) {
      throw Error(TIMAR_ERR_BACKEND, std::string("onnxruntime: ") + graphs_[graph] + " failed: " + e.what());
    }
  }

  int kind_, rows_;
  int64_t F_, S_, Da_, Dz_, L_, H_, hd_, slots_, P_, D_;
  std::vector<const char*> graphs_;
  std::vector<std::string> cache_inputs_;
  std::vector<const char*> step_in_names_;   // encoder_step's inputs in order; the last point into cache_inputs_
  Ort::MemoryInfo mem_;
  std::vector<Ort::Session> sessions_;
  std::vector<float> cache_, present_, z_;
  std::vector<Ort::Value> step_in_;          // encoder_step's input values, views rebuilt each turn
};

}  // namespace

bool ort_has_cuda() {
  for (const std::string& p : Ort::GetAvailableProviders())
    if (p == "CUDAExecutionProvider") return true;
  return false;
}

std::string ort_version() { return Ort::GetVersionString(); }

std::unique_ptr<Backend> make_ort_backend(const Bundle& b, const BackendConfig& cfg) {
  try {
    return std::unique_ptr<Backend>(new OrtBackend(b, cfg));
  } catch (const Ort::Exception& e) {
    throw Error(TIMAR_ERR_BACKEND, std::string("onnxruntime: ") + e.what());
  }
}

}  // namespace timar
