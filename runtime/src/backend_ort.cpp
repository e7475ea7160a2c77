// ONNX Runtime backend (C++ API): CPU, or the CUDA execution provider when the library has it.
// Inputs are wrapped in place (no copies) and outputs land in the caller's buffers; a session's
// cache is one host array written in place, slot by slot. The graphs are loaded once per model
// and run from any thread (Ort::Session::Run is thread-safe).
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

void host_commit(const KvShape& s, const float* present, int present_rows, int row, float* cache, int cache_rows,
                 int slot) {
  const size_t block = s.block();
  for (int lk = 0; lk < s.L * 2; ++lk)
    for (int r = 0; r < cache_rows; ++r)
      for (int h = 0; h < s.H; ++h) {
        const float* src = present + ((size_t(lk) * present_rows + size_t(row)) * s.H + h) * block;
        float* dst = cache + ((size_t(lk) * cache_rows + r) * s.H + h) * (size_t(s.S) * block) + size_t(slot) * block;
        std::memcpy(dst, src, block * sizeof(float));
      }
}

bool host_row_finite(const KvShape& s, const float* present, int present_rows, int row) {
  const size_t n = size_t(s.H) * s.block();   // one (layer, k/v) block of a row
  for (int lk = 0; lk < s.L * 2; ++lk) {
    const float* p = present + (size_t(lk) * present_rows + size_t(row)) * n;
    for (size_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i])) return false;
  }
  return true;
}

// Slot `slot` of every (layer, k/v, row, head) of a cache, to or from a packed [L, 2, rows, H, P, hd].
template <class Copy>
void for_each_slot_block(const KvShape& s, int rows, int slot, Copy copy) {
  const size_t block = s.block();
  size_t packed = 0;
  for (int lrh = 0; lrh < s.L * 2 * rows * s.H; ++lrh, packed += block)
    copy(size_t(lrh) * (size_t(s.S) * block) + size_t(slot) * block, packed, block);
}

void host_read_slot(const KvShape& s, const float* cache, int rows, int slot, float* out) {
  for_each_slot_block(s, rows, slot, [&](size_t at, size_t packed, size_t n) {
    std::memcpy(out + packed, cache + at, n * sizeof(float));
  });
}

void host_write_slot(const KvShape& s, float* cache, int rows, int slot, const float* in) {
  for_each_slot_block(s, rows, slot, [&](size_t at, size_t packed, size_t n) {
    std::memcpy(cache + at, in + packed, n * sizeof(float));
  });
}

namespace {

Ort::Env& ort_env() {
  static Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "timar");
  return env;
}

// A session's cache in host memory: input i of encoder_step is the block cache[i / 2][i % 2]
// [rows, H, S*P, hd], a view into the one buffer.
class HostKvCache final : public KvCache {
 public:
  HostKvCache(const KvShape& shape, int rows) : shape_(shape), rows_(rows), data_(shape.cache_floats(rows), 0.0f) {}
  int rows() const override { return rows_; }
  size_t floats() const override { return data_.size(); }
  void clear() override { std::fill(data_.begin(), data_.end(), 0.0f); }
  void to_host(float* out) const override { std::copy(data_.begin(), data_.end(), out); }
  void from_host(const float* in) override { std::copy(in, in + data_.size(), data_.begin()); }
  void read_slot(int slot, std::vector<float>& out) const override {
    out.resize(shape_.turn_floats(rows_));
    host_read_slot(shape_, data_.data(), rows_, slot, out.data());
  }
  void write_slot(int slot, const std::vector<float>& in) override {
    host_write_slot(shape_, data_.data(), rows_, slot, in.data());
  }
  float* data() { return data_.data(); }
  size_t block_floats() const { return data_.size() / (size_t(shape_.L) * 2); }   // one input's [rows, H, S*P, hd]

 private:
  KvShape shape_;
  int rows_;
  std::vector<float> data_;
};

// One call's present keys/values, and the caches of a batch stacked along the rows.
class HostTurnKv final : public TurnKv {
 public:
  explicit HostTurnKv(const KvShape& shape) : shape_(shape) {}
  bool row_finite(int row) override { return host_row_finite(shape_, present.data(), rows, row); }
  void commit(int row, KvCache& cache, int slot) override {
    auto& host = static_cast<HostKvCache&>(cache);
    host_commit(shape_, present.data(), rows, row, host.data(), host.rows(), slot);
  }
  int rows = 0;
  std::vector<float> present, stacked;
  std::vector<Ort::Float16_t> half_cache, half_present;   // float16-cache bundles: the graph's side

 private:
  KvShape shape_;
};

class OrtBackend final : public Backend {
 public:
  OrtBackend(const Bundle& b, const BackendConfig& cfg)
      : kind_(cfg.kind), F_(b.frames), S_(b.samples), Da_(b.speech_dim), Dz_(b.z_dim), P_(b.tokens_per_turn),
        D_(b.token_dim), kv_(b),
        graphs_(b.graph_names()), cache_inputs_(b.cache_inputs), cache_fp16_(b.cache_fp16),
        mem_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    Ort::SessionOptions opts;
    opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    opts.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);   // one graph at a time: no inter-op pool
    opts.SetInterOpNumThreads(1);
    if (cfg.threads > 0) opts.SetIntraOpNumThreads(cfg.threads);
    // Pool threads sleep between a graph's many small operators unless asked to spin, as in the
    // Python runtime: threads that spin save 3-4 ms of a tiny turn on an idle machine but make
    // it 2-3x slower beside any other busy process (BENCHMARKS.md, contention). Spinning stops
    // when a run returns, so one graph's threads never steal the cores from the next graph.
    opts.AddConfigEntry("session.intra_op.allow_spinning", cfg.spin ? "1" : "0");
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
    step_in_names_ = {"user_speech", "user_motion", "agent_speech", "agent_motion", "agent_mask",
                      "uncond", "user_motion_absent", "past_turn_age"};
    for (const std::string& n : cache_inputs_) step_in_names_.push_back(n.c_str());
  }

  const char* name() const override { return kind_ == TIMAR_BACKEND_ORT_CUDA ? "onnxruntime-cuda" : "onnxruntime-cpu"; }
  int kind() const override { return kind_; }
  bool stacks_caches() const override { return true; }
  std::unique_ptr<KvCache> new_cache(int rows) override { return std::unique_ptr<KvCache>(new HostKvCache(kv_, rows)); }
  std::unique_ptr<TurnKv> new_turn_kv() override { return std::unique_ptr<TurnKv>(new HostTurnKv(kv_)); }

  void encode_audio(const float* waveforms, int n, float* features) override {
    const std::array<int64_t, 2> in_shape{n, S_};
    const std::array<int64_t, 3> out_shape{n, F_, Da_};
    Ort::Value in = tensor(const_cast<float*>(waveforms), size_t(n) * S_, in_shape.data(), 2);
    Ort::Value out = tensor(features, size_t(n) * F_ * Da_, out_shape.data(), 3);
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

  void encoder_step(const StepInputs& x, KvCache* const* caches, size_t n_caches, float* z, TurnKv& turn_kv) override {
    auto& kv = static_cast<HostTurnKv&>(turn_kv);
    const int64_t r = x.rows;
    const float* cache = stacked_caches(caches, n_caches, x.rows, kv);
    kv.rows = x.rows;
    kv.present.resize(kv_.turn_floats(x.rows));
    const int64_t sp = int64_t(kv_.S) * kv_.P;
    const std::array<int64_t, 3> speech{r, F_, Da_}, motion{r, F_, 56};
    const std::array<int64_t, 2> mask{r, F_}, ages{r, sp};
    const std::array<int64_t, 1> row{r};
    const std::array<int64_t, 4> past{r, kv_.H, sp, kv_.hd};
    const std::array<int64_t, 6> present{kv_.L, 2, r, kv_.H, kv_.P, kv_.hd};
    const std::array<int64_t, 3> zs{r, F_, Dz_};
    std::vector<Ort::Value> in;
    in.reserve(step_in_names_.size());
    in.push_back(tensor(const_cast<float*>(x.user_speech), size_t(r) * F_ * Da_, speech.data(), 3));
    in.push_back(tensor(const_cast<float*>(x.user_motion), size_t(r) * F_ * 56, motion.data(), 3));
    in.push_back(tensor(const_cast<float*>(x.agent_speech), size_t(r) * F_ * Da_, speech.data(), 3));
    in.push_back(tensor(const_cast<float*>(x.agent_motion), size_t(r) * F_ * 56, motion.data(), 3));
    in.push_back(tensor(const_cast<float*>(x.agent_mask), size_t(r) * F_, mask.data(), 2));
    in.push_back(tensor(const_cast<float*>(x.uncond), size_t(r), row.data(), 1));
    in.push_back(tensor(const_cast<float*>(x.user_motion_absent), size_t(r), row.data(), 1));
    in.push_back(Ort::Value::CreateTensor<int64_t>(mem_, const_cast<int64_t*>(x.past_turn_age), size_t(r * sp),
                                                   ages.data(), 2));
    const size_t block = kv_.cache_floats(x.rows) / (size_t(kv_.L) * 2);   // one input: [rows, H, S*P, hd]
    if (cache_fp16_) {   // float16 keys/values in and out (the host cache holds float16 values in float32)
      kv.half_cache.resize(kv_.cache_floats(x.rows));
      kv.half_present.resize(kv.present.size());
      std::transform(cache, cache + kv.half_cache.size(), kv.half_cache.begin(),
                     [](float v) { return Ort::Float16_t(v); });
      for (size_t i = 0; i < cache_inputs_.size(); ++i)
        in.push_back(Ort::Value::CreateTensor<Ort::Float16_t>(mem_, kv.half_cache.data() + i * block, block,
                                                              past.data(), 4));
    } else {
      for (size_t i = 0; i < cache_inputs_.size(); ++i)
        in.push_back(tensor(const_cast<float*>(cache) + i * block, block, past.data(), 4));
    }
    std::array<Ort::Value, 2> out{
        tensor(z, size_t(r) * F_ * Dz_, zs.data(), 3),
        cache_fp16_ ? Ort::Value::CreateTensor<Ort::Float16_t>(mem_, kv.half_present.data(), kv.half_present.size(),
                                                               present.data(), 6)
                    : tensor(kv.present.data(), kv.present.size(), present.data(), 6)};
    const char* out_names[] = {"z", "present_key_values"};
    run(graph("encoder_step"), step_in_names_.data(), in.data(), in.size(), out_names, out.data(), out.size());
    if (cache_fp16_)
      std::transform(kv.half_present.begin(), kv.half_present.end(), kv.present.begin(),
                     [](Ort::Float16_t v) { return v.ToFloat(); });
  }

  void denoise(const float* x, const float* t, const float* z, int n, float* out) override {
    const std::array<int64_t, 2> xs{n, 56}, zs{n, Dz_}, os{n, 112};
    const std::array<int64_t, 1> ts{n};
    std::array<Ort::Value, 3> in{tensor(const_cast<float*>(x), size_t(n) * 56, xs.data(), 2),
                                 tensor(const_cast<float*>(t), size_t(n), ts.data(), 1),
                                 tensor(const_cast<float*>(z), size_t(n) * Dz_, zs.data(), 2)};
    const char* in_names[] = {"x_t", "t", "z"};
    Ort::Value o = tensor(out, size_t(n) * 112, os.data(), 2);
    const char* out_names[] = {"model_output"};
    run(graph("denoiser"), in_names, in.data(), in.size(), out_names, &o, 1);
  }

 private:
  // The caches whose rows make up a batch as one [L, 2, rows, H, S*P, hd] array: a single
  // cache as it is, several copied input block by input block into kv.stacked.
  const float* stacked_caches(KvCache* const* caches, size_t n, int rows, HostTurnKv& kv) {
    int have = 0;
    for (size_t j = 0; j < n; ++j) have += caches[j]->rows();
    if (have != rows) throw Error(TIMAR_ERR_INTERNAL, "encoder_step: the caches' rows differ from the inputs'");
    if (n == 1) return static_cast<HostKvCache*>(caches[0])->data();
    kv.stacked.resize(kv_.cache_floats(rows));
    float* dst = kv.stacked.data();
    for (size_t i = 0; i < cache_inputs_.size(); ++i)
      for (size_t j = 0; j < n; ++j) {
        auto* c = static_cast<HostKvCache*>(caches[j]);
        const size_t block = c->block_floats();
        dst = std::copy_n(c->data() + i * block, block, dst);
      }
    return kv.stacked.data();
  }
  Ort::Value tensor(float* p, size_t n, const int64_t* shape, size_t rank) const {
    return Ort::Value::CreateTensor<float>(mem_, p, n, shape, rank);
  }
  // Index of a graph in sessions_ (the bundle's graph_names() order).
  size_t graph(const char* name) const {
    for (size_t i = 0; i < graphs_.size(); ++i)
      if (std::strcmp(graphs_[i], name) == 0) return i;
    throw Error(TIMAR_ERR_INTERNAL, std::string("onnxruntime: this bundle has no graph ") + name);
  }
  // Ort::Session::Run may be called from several threads at once.
  void run(size_t graph, const char* const* in_names, const Ort::Value* in, size_t n_in,
           const char* const* out_names, Ort::Value* out, size_t n_out) {
    try {
      sessions_[graph].Run(Ort::RunOptions{nullptr}, in_names, in, n_in, out_names, out, n_out);
    } catch (const Ort::Exception& e) {
      throw Error(TIMAR_ERR_BACKEND, std::string("onnxruntime: ") + graphs_[graph] + " failed: " + e.what());
    }
  }

  int kind_;
  int64_t F_, S_, Da_, Dz_, P_, D_;   // P_, D_: a turn's tokens [P, D] (window_recompute)
  KvShape kv_;
  std::vector<const char*> graphs_;
  std::vector<std::string> cache_inputs_;
  bool cache_fp16_ = false;
  std::vector<const char*> step_in_names_;   // encoder_step's inputs in order; the last point into cache_inputs_
  Ort::MemoryInfo mem_;
  std::vector<Ort::Session> sessions_;
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
