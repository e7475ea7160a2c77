// TensorRT backend (TensorRT 10 C++ API), compiled only with -DTIMAR_WITH_TENSORRT=ON.
//
// The bundle's engine set for this GPU and TensorRT version (manifest "engines", built by
// timar-build): one engine per graph, one execution context each, all on one CUDA stream shared
// by the model's sessions, one call at a time. Every input lives in a device buffer allocated
// once (sized for one session's two CFG rows: device caches do not stack, so a batch is one
// session); each session's KV cache [L, 2, rows, H, (W-1)*P, hd] stays on the GPU between turns
// and a commit is a device-to-device copy of one slot.
// Written against NVIDIA's TensorRT 10 C++ API documentation (IRuntime::deserializeCudaEngine,
// ICudaEngine::createExecutionContext, IExecutionContext::setInputShape / setTensorAddress /
// enqueueV3). Not built on the machines this SDK is developed on (no TensorRT there).
#include <NvInfer.h>
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "backend.hpp"
#include "error.hpp"

namespace timar {
namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(TIMAR_ERR_BACKEND, std::string("cuda: ") + what + ": " + cudaGetErrorString(e));
}

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR && msg) {
      try {
        last_ = msg;
      } catch (...) {
      }
    }
    if (severity <= Severity::kWARNING && msg) std::fprintf(stderr, "[timar tensorrt] %s\n", msg);
  }
  std::string take() {
    std::string s;
    s.swap(last_);
    return s;
  }

 private:
  std::string last_;
};

// A device allocation owned by the backend.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  void alloc(size_t n) {
    if (ptr) cudaFree(ptr);
    ptr = nullptr;
    bytes = n;
    cuda_check(cudaMalloc(&ptr, n ? n : 1), "cudaMalloc");
  }
  float* f() const { return static_cast<float*>(ptr); }
};

nvinfer1::Dims dims(std::initializer_list<int64_t> d) {
  nvinfer1::Dims out{};
  out.nbDims = int32_t(d.size());
  int i = 0;
  for (int64_t v : d) out.d[i++] = v;
  return out;
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(TIMAR_ERR_BUNDLE, path + ": cannot be read");
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string linked_version() {
  const int32_t v = getInferLibVersion();   // MAJOR * 10000 + MINOR * 100 + PATCH (TensorRT 10)
  return std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." + std::to_string(v % 100);
}

// "10.3.0.26" matches "10.3.0": the first three components.
bool same_version(const std::string& manifest, const std::string& linked) {
  std::string m = manifest;
  int dots = 0;
  for (size_t i = 0; i < m.size(); ++i)
    if (m[i] == '.' && ++dots == 3) {
      m.resize(i);
      break;
    }
  return m == linked;
}

class TrtBackend;

// A session's cache in GPU memory, written by device-to-device copies on the backend's stream.
class TrtKvCache final : public KvCache {
 public:
  TrtKvCache(TrtBackend& owner, const KvShape& shape, int rows);
  int rows() const override { return rows_; }
  size_t floats() const override { return shape_.cache_floats(rows_); }
  void clear() override;
  void to_host(float* out) const override;
  void from_host(const float* in) override;
  void read_slot(int slot, std::vector<float>& out) const override;
  void write_slot(int slot, const std::vector<float>& in) override;
  void* device() const { return data_.ptr; }

 private:
  TrtBackend& owner_;
  KvShape shape_;
  int rows_;
  DeviceBuffer data_;
};

// One call's present keys/values [L, 2, rows, H, P, hd] in GPU memory (at most kMaxRows rows).
class TrtTurnKv final : public TurnKv {
 public:
  TrtTurnKv(TrtBackend& owner, const KvShape& shape);
  bool row_finite(int row) override;
  void commit(int row, KvCache& cache, int slot) override;
  int rows = 0;
  DeviceBuffer present;

 private:
  TrtBackend& owner_;
  KvShape shape_;
  std::vector<float> host_;   // row_finite's copy of one row
};

// Device caches do not stack: every batch is one session, whose rows are at most kMaxRows.
constexpr int kMaxRows = 2;

class TrtBackend final : public Backend {
 public:
  TrtBackend(const Bundle& b, const BackendConfig& cfg, const EngineSet& set)
      : F_(b.frames), S_(b.samples), Da_(b.speech_dim), Dz_(b.z_dim), kv_(b), cache_inputs_(b.cache_inputs) {
    cuda_check(cudaSetDevice(cfg.device_id), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw Error(TIMAR_ERR_BACKEND, "tensorrt: createInferRuntime failed: " + logger_.take());
    for (const char* name : {"audio_encoder", "encoder_step", "denoiser"}) {
      auto it = set.files.find(name);
      if (it == set.files.end()) throw Error(TIMAR_ERR_BUNDLE, "engine set " + set.dir + " has no " + name + " engine");
      const std::vector<char> plan = read_all(it->second.path);
      std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
      if (!engine)
        throw Error(TIMAR_ERR_BUNDLE, it->second.path + ": TensorRT cannot deserialize this engine (" + logger_.take() +
                                          "); rebuild it with timar-build on this GPU");
      std::unique_ptr<nvinfer1::IExecutionContext> ctx(engine->createExecutionContext());
      if (!ctx) throw Error(TIMAR_ERR_BACKEND, std::string("tensorrt: createExecutionContext failed for ") + name);
      engines_.push_back(std::move(engine));
      contexts_.push_back(std::move(ctx));
    }
    const size_t R = kMaxRows, F = size_t(F_), SP = size_t(kv_.S) * size_t(kv_.P);
    wave_.alloc(sizeof(float) * 2 * size_t(S_));
    feats_.alloc(sizeof(float) * 2 * F * size_t(Da_));
    user_speech_.alloc(sizeof(float) * R * F * size_t(Da_));
    agent_speech_.alloc(sizeof(float) * R * F * size_t(Da_));
    user_motion_.alloc(sizeof(float) * R * F * 56);
    agent_motion_.alloc(sizeof(float) * R * F * 56);
    agent_mask_.alloc(sizeof(float) * R * F);
    uncond_.alloc(sizeof(float) * R);
    absent_.alloc(sizeof(float) * R);
    age_is_int64_ = engines_[1]->getTensorDataType("past_turn_age") == nvinfer1::DataType::kINT64;
    ages_.alloc((age_is_int64_ ? 8 : 4) * R * SP);
    z_.alloc(sizeof(float) * R * F * size_t(Dz_));
    step_z_.alloc(sizeof(float) * R * F * size_t(Dz_));
    x_.alloc(sizeof(float) * R * F * 56);
    t_.alloc(sizeof(float) * R * F);
    out_.alloc(sizeof(float) * R * F * 112);
  }

  ~TrtBackend() override {
    contexts_.clear();   // contexts before engines, engines before the runtime
    engines_.clear();
    runtime_.reset();
    if (stream_) cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "tensorrt"; }
  int kind() const override { return TIMAR_BACKEND_TENSORRT; }
  bool stacks_caches() const override { return false; }
  std::unique_ptr<KvCache> new_cache(int rows) override {
    return std::unique_ptr<KvCache>(new TrtKvCache(*this, kv_, rows));
  }
  std::unique_ptr<TurnKv> new_turn_kv() override { return std::unique_ptr<TurnKv>(new TrtTurnKv(*this, kv_)); }

  void encode_audio(const float* waveforms, int n, float* features) override {
    if (n != 2) throw Error(TIMAR_ERR_INTERNAL, "tensorrt: audio_encoder runs one session's two waveforms at a time");
    std::lock_guard<std::mutex> lock(mutex_);
    upload(wave_, waveforms, sizeof(float) * 2 * size_t(S_));
    auto* ctx = contexts_[0].get();
    set_shape(ctx, "waveform", dims({2, S_}));
    bind(ctx, "waveform", wave_.ptr);
    bind(ctx, "speech_features", feats_.ptr);
    enqueue(ctx, "audio_encoder");
    download(features, feats_, sizeof(float) * 2 * size_t(F_) * size_t(Da_));
    sync();
  }

  void encoder_step(const StepInputs& in, KvCache* const* caches, size_t n_caches, float* z, TurnKv& turn_kv) override {
    const int64_t r = in.rows;
    if (n_caches != 1 || caches[0]->rows() != in.rows || in.rows > kMaxRows)
      throw Error(TIMAR_ERR_INTERNAL, "tensorrt: encoder_step runs one session's cache at a time");
    auto& kv = static_cast<TrtTurnKv&>(turn_kv);
    const auto* cache = static_cast<const TrtKvCache*>(caches[0]);
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t R = size_t(r), F = size_t(F_), SP = size_t(kv_.S) * size_t(kv_.P);
    upload(user_speech_, in.user_speech, sizeof(float) * R * F * size_t(Da_));
    upload(agent_speech_, in.agent_speech, sizeof(float) * R * F * size_t(Da_));
    upload(user_motion_, in.user_motion, sizeof(float) * R * F * 56);
    upload(agent_motion_, in.agent_motion, sizeof(float) * R * F * 56);
    upload(agent_mask_, in.agent_mask, sizeof(float) * R * F);
    upload(uncond_, in.uncond, sizeof(float) * R);
    upload(absent_, in.user_motion_absent, sizeof(float) * R);
    if (age_is_int64_) {
      upload(ages_, in.past_turn_age, sizeof(int64_t) * R * SP);
    } else {
      ages32_.assign(in.past_turn_age, in.past_turn_age + R * SP);
      upload(ages_, ages32_.data(), sizeof(int32_t) * R * SP);
    }
    auto* ctx = contexts_[1].get();
    set_shape(ctx, "user_speech", dims({r, F_, Da_}));
    set_shape(ctx, "user_motion", dims({r, F_, 56}));
    set_shape(ctx, "agent_speech", dims({r, F_, Da_}));
    set_shape(ctx, "agent_motion", dims({r, F_, 56}));
    set_shape(ctx, "agent_mask", dims({r, F_}));
    set_shape(ctx, "uncond", dims({r}));
    set_shape(ctx, "user_motion_absent", dims({r}));
    for (const std::string& n : cache_inputs_) set_shape(ctx, n.c_str(), dims({r, kv_.H, int64_t(SP), kv_.hd}));
    set_shape(ctx, "past_turn_age", dims({r, int64_t(SP)}));
    bind(ctx, "user_speech", user_speech_.ptr);
    bind(ctx, "user_motion", user_motion_.ptr);
    bind(ctx, "agent_speech", agent_speech_.ptr);
    bind(ctx, "agent_motion", agent_motion_.ptr);
    bind(ctx, "agent_mask", agent_mask_.ptr);
    bind(ctx, "uncond", uncond_.ptr);
    bind(ctx, "user_motion_absent", absent_.ptr);
    // Read in place: input i is the block cache[i / 2][i % 2]; the cache never leaves the GPU.
    const size_t block = sizeof(float) * R * size_t(kv_.H) * SP * size_t(kv_.hd);
    for (size_t i = 0; i < cache_inputs_.size(); ++i)
      bind(ctx, cache_inputs_[i].c_str(), static_cast<char*>(cache->device()) + i * block);
    bind(ctx, "past_turn_age", ages_.ptr);
    bind(ctx, "z", step_z_.ptr);
    bind(ctx, "present_key_values", kv.present.ptr);
    enqueue(ctx, "encoder_step");
    download(z, step_z_, sizeof(float) * R * F * size_t(Dz_));
    sync();
    kv.rows = in.rows;
  }

  void denoise(const float* x, const float* t, const float* z, int n, float* out) override {
    if (n > kMaxRows * F_) throw Error(TIMAR_ERR_INTERNAL, "tensorrt: denoise runs one session's rows at a time");
    std::lock_guard<std::mutex> lock(mutex_);
    upload(z_, z, sizeof(float) * size_t(n) * size_t(Dz_));   // a few KB per step
    upload(x_, x, sizeof(float) * size_t(n) * 56);
    upload(t_, t, sizeof(float) * size_t(n));
    auto* ctx = contexts_[2].get();
    set_shape(ctx, "x_t", dims({n, 56}));
    set_shape(ctx, "t", dims({n}));
    set_shape(ctx, "z", dims({n, Dz_}));
    bind(ctx, "x_t", x_.ptr);
    bind(ctx, "t", t_.ptr);
    bind(ctx, "z", z_.ptr);
    bind(ctx, "model_output", out_.ptr);
    enqueue(ctx, "denoiser");
    download(out, out_, sizeof(float) * size_t(n) * 112);
    sync();
  }

  // The stream, the execution contexts and the input buffers are shared by the model's
  // sessions: every use holds this lock (callers on several threads take turns).
  std::mutex& mutex() { return mutex_; }
  cudaStream_t stream() const { return stream_; }
  void upload(DeviceBuffer& d, const void* h, size_t n) {
    cuda_check(cudaMemcpyAsync(d.ptr, h, n, cudaMemcpyHostToDevice, stream_), "upload");
  }
  void download(void* h, const DeviceBuffer& d, size_t n) {
    cuda_check(cudaMemcpyAsync(h, d.ptr, n, cudaMemcpyDeviceToHost, stream_), "download");
  }
  void sync() { cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  void set_shape(nvinfer1::IExecutionContext* ctx, const char* tensor, const nvinfer1::Dims& d) {
    if (!ctx->setInputShape(tensor, d))
      throw Error(TIMAR_ERR_BACKEND, std::string("tensorrt: setInputShape(") + tensor + ") refused: " + logger_.take() +
                                         " (engine built with a smaller max batch?)");
  }
  void bind(nvinfer1::IExecutionContext* ctx, const char* tensor, void* ptr) {
    if (!ctx->setTensorAddress(tensor, ptr))
      throw Error(TIMAR_ERR_BACKEND, std::string("tensorrt: setTensorAddress(") + tensor + ") failed: " + logger_.take());
  }
  void enqueue(nvinfer1::IExecutionContext* ctx, const char* graph) {
    if (!ctx->enqueueV3(stream_))
      throw Error(TIMAR_ERR_BACKEND, std::string("tensorrt: ") + graph + " enqueueV3 failed: " + logger_.take());
  }

  int64_t F_, S_, Da_, Dz_;
  KvShape kv_;
  std::vector<std::string> cache_inputs_;
  bool age_is_int64_ = true;
  std::mutex mutex_;
  Logger logger_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::vector<std::unique_ptr<nvinfer1::ICudaEngine>> engines_;
  std::vector<std::unique_ptr<nvinfer1::IExecutionContext>> contexts_;
  DeviceBuffer wave_, feats_, user_speech_, agent_speech_, user_motion_, agent_motion_, agent_mask_, uncond_, absent_,
      ages_, step_z_, z_, x_, t_, out_;
  std::vector<int32_t> ages32_;
};

// A slot of every (layer, k/v, row) of a device cache [L, 2, rows, H, S*P, hd], H blocks of
// P*hd floats apart by S blocks: one 2-D copy each, to or from packed [L, 2, rows, H, P, hd].
size_t slot_bytes(const KvShape& s) { return s.block() * sizeof(float); }
char* slot_at(void* cache, const KvShape& s, int64_t lr, int slot) {
  return static_cast<char*>(cache) + (size_t(lr) * size_t(s.H) * size_t(s.S) + size_t(slot)) * slot_bytes(s);
}

TrtKvCache::TrtKvCache(TrtBackend& owner, const KvShape& shape, int rows) : owner_(owner), shape_(shape), rows_(rows) {
  data_.alloc(sizeof(float) * floats());
  clear();
}

void TrtKvCache::clear() {
  std::lock_guard<std::mutex> lock(owner_.mutex());
  cuda_check(cudaMemsetAsync(data_.ptr, 0, data_.bytes, owner_.stream()), "cudaMemsetAsync");
  owner_.sync();
}

void TrtKvCache::to_host(float* out) const {
  std::lock_guard<std::mutex> lock(owner_.mutex());
  owner_.download(out, data_, data_.bytes);
  owner_.sync();
}

void TrtKvCache::from_host(const float* in) {
  std::lock_guard<std::mutex> lock(owner_.mutex());
  owner_.upload(data_, in, data_.bytes);
  owner_.sync();
}

void TrtKvCache::read_slot(int slot, std::vector<float>& out) const {
  const size_t block = slot_bytes(shape_);
  out.resize(shape_.turn_floats(rows_));
  char* host = reinterpret_cast<char*>(out.data());
  std::lock_guard<std::mutex> lock(owner_.mutex());
  for (int64_t lr = 0; lr < int64_t(shape_.L) * 2 * rows_; ++lr)
    cuda_check(cudaMemcpy2DAsync(host + size_t(lr) * size_t(shape_.H) * block, block, slot_at(data_.ptr, shape_, lr, slot),
                                 block * size_t(shape_.S), block, size_t(shape_.H), cudaMemcpyDeviceToHost,
                                 owner_.stream()), "read_slot");
  owner_.sync();
}

void TrtKvCache::write_slot(int slot, const std::vector<float>& in) {
  const size_t block = slot_bytes(shape_);
  const char* host = reinterpret_cast<const char*>(in.data());
  std::lock_guard<std::mutex> lock(owner_.mutex());
  for (int64_t lr = 0; lr < int64_t(shape_.L) * 2 * rows_; ++lr)
    cuda_check(cudaMemcpy2DAsync(slot_at(data_.ptr, shape_, lr, slot), block * size_t(shape_.S),
                                 host + size_t(lr) * size_t(shape_.H) * block, block, block, size_t(shape_.H),
                                 cudaMemcpyHostToDevice, owner_.stream()), "write_slot");
  owner_.sync();
}

TrtTurnKv::TrtTurnKv(TrtBackend& owner, const KvShape& shape) : owner_(owner), shape_(shape) {
  present.alloc(sizeof(float) * shape.turn_floats(kMaxRows));
}

// Row `row` of present to the host, then checked there.
bool TrtTurnKv::row_finite(int row) {
  const size_t n = size_t(shape_.H) * shape_.block();   // one (layer, k/v) block of a row
  host_.resize(size_t(shape_.L) * 2 * n);
  std::lock_guard<std::mutex> lock(owner_.mutex());
  for (int64_t lk = 0; lk < int64_t(shape_.L) * 2; ++lk)
    cuda_check(cudaMemcpyAsync(host_.data() + size_t(lk) * n, present.f() + (size_t(lk) * size_t(rows) + size_t(row)) * n,
                               n * sizeof(float), cudaMemcpyDeviceToHost, owner_.stream()), "row_finite");
  owner_.sync();
  return host_row_finite(shape_, host_.data(), 1, 0);
}

// present [L, 2, rows, H, P, hd] row `row` -> cache [L, 2, R, H, S*P, hd] slot `slot`, every
// row R: per (layer, k/v, row) one 2-D copy of H blocks of P*hd floats.
void TrtTurnKv::commit(int row, KvCache& cache, int slot) {
  auto& device = static_cast<TrtKvCache&>(cache);
  const size_t block = slot_bytes(shape_);
  std::lock_guard<std::mutex> lock(owner_.mutex());
  for (int64_t lk = 0; lk < int64_t(shape_.L) * 2; ++lk)
    for (int64_t r = 0; r < device.rows(); ++r) {
      const char* src = static_cast<const char*>(present.ptr) + size_t(lk * rows + row) * size_t(shape_.H) * block;
      cuda_check(cudaMemcpy2DAsync(slot_at(device.device(), shape_, lk * device.rows() + r, slot), block * size_t(shape_.S),
                                   src, block, block, size_t(shape_.H), cudaMemcpyDeviceToDevice, owner_.stream()),
                 "commit");
    }
  owner_.sync();
}

}  // namespace

std::unique_ptr<Backend> make_trt_backend(const Bundle& b, const BackendConfig& cfg, std::string* why) {
  if (b.window) {   // no engines for the token_embed / window_encoder graphs
    *why = "TensorRT runs cached bundles only; this window_recompute bundle runs with ONNX Runtime";
    return nullptr;
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count <= cfg.device_id) {
    *why = "no CUDA device " + std::to_string(cfg.device_id);
    return nullptr;
  }
  cudaDeviceProp prop{};
  cuda_check(cudaGetDeviceProperties(&prop, cfg.device_id), "cudaGetDeviceProperties");
  const std::string gpu = prop.name, version = linked_version();
  for (const EngineSet& set : b.engines) {
    if (set.gpu == gpu && same_version(set.tensorrt, version)) {
      b.verify_engine_set(set);   // sha256 of every plan (throws BundleError)
      return std::unique_ptr<Backend>(new TrtBackend(b, cfg, set));
    }
  }
  std::string have;
  for (const EngineSet& set : b.engines) have += " [" + set.gpu + ", TensorRT " + set.tensorrt + "]";
  *why = "no engine set for " + gpu + " with TensorRT " + version + " (bundle has:" + (have.empty() ? " none" : have) +
         "); build one with timar-build";
  return nullptr;
}

}  // namespace timar
