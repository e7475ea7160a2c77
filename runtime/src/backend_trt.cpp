// TensorRT backend (TensorRT 10 C++ API), compiled only with -DTIMAR_WITH_TENSORRT=ON.
//
// The bundle's engine set for this GPU and TensorRT version (manifest "engines", built by
// timar-build): one engine per graph, one execution context each, all on one CUDA stream.
// Every tensor lives in a device buffer allocated once; the KV cache [L, 2, rows, H, (W-1)*P, hd]
// stays on the GPU between turns and a commit is a device-to-device copy of one slot.
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

class TrtBackend final : public Backend {
 public:
  TrtBackend(const Bundle& b, const BackendConfig& cfg, const EngineSet& set)
      : rows_(cfg.rows), F_(b.frames), S_(b.samples), Da_(b.speech_dim), Dz_(b.z_dim), L_(b.layers),
        H_(b.heads), hd_(b.head_dim), slots_(b.slots), P_(b.tokens_per_turn), cache_inputs_(b.cache_inputs) {
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
    const size_t R = size_t(rows_), F = size_t(F_), SP = size_t(slots_) * size_t(P_);
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
    cache_.alloc(sizeof(float) * cache_floats());
    present_.alloc(sizeof(float) * size_t(L_) * 2 * R * size_t(H_) * size_t(P_) * size_t(hd_));
    z_.alloc(sizeof(float) * R * F * size_t(Dz_));
    x_.alloc(sizeof(float) * R * F * 56);
    t_.alloc(sizeof(float) * R * F);
    out_.alloc(sizeof(float) * R * F * 112);
    clear_cache();
  }

  ~TrtBackend() override {
    contexts_.clear();   // contexts before engines, engines before the runtime
    engines_.clear();
    runtime_.reset();
    if (stream_) cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "tensorrt"; }
  int kind() const override { return TIMAR_BACKEND_TENSORRT; }

  void encode_audio(const float* waveform, float* features) override {
    upload(wave_, waveform, sizeof(float) * 2 * size_t(S_));
    auto* ctx = contexts_[0].get();
    set_shape(ctx, "waveform", dims({2, S_}));
    bind(ctx, "waveform", wave_.ptr);
    bind(ctx, "speech_features", feats_.ptr);
    enqueue(ctx, "audio_encoder");
    download(features, feats_, sizeof(float) * 2 * size_t(F_) * size_t(Da_));
    sync();
  }

  void encoder_step(const StepInputs& in, float* z) override {
    const int64_t r = in.rows;
    if (r != rows_) throw Error(TIMAR_ERR_INTERNAL, "encoder_step: rows differ from the cache's");
    const size_t R = size_t(r), F = size_t(F_), SP = size_t(slots_) * size_t(P_);
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
    for (const std::string& n : cache_inputs_) set_shape(ctx, n.c_str(), dims({r, H_, int64_t(SP), hd_}));
    set_shape(ctx, "past_turn_age", dims({r, int64_t(SP)}));
    bind(ctx, "user_speech", user_speech_.ptr);
    bind(ctx, "user_motion", user_motion_.ptr);
    bind(ctx, "agent_speech", agent_speech_.ptr);
    bind(ctx, "agent_motion", agent_motion_.ptr);
    bind(ctx, "agent_mask", agent_mask_.ptr);
    bind(ctx, "uncond", uncond_.ptr);
    bind(ctx, "user_motion_absent", absent_.ptr);
    // Read in place: input i is the block cache[i / 2][i % 2]; the cache never leaves the GPU.
    const size_t block = sizeof(float) * R * size_t(H_) * SP * size_t(hd_);
    for (size_t i = 0; i < cache_inputs_.size(); ++i)
      bind(ctx, cache_inputs_[i].c_str(), static_cast<char*>(cache_.ptr) + i * block);
    bind(ctx, "past_turn_age", ages_.ptr);
    bind(ctx, "z", z_.ptr);
    bind(ctx, "present_key_values", present_.ptr);
    enqueue(ctx, "encoder_step");
    download(z, z_, sizeof(float) * R * F * size_t(Dz_));
    sync();
  }

  void bind_z(const float* z, int n) override {
    // z_ already holds the last encoder_step's z on the device; the host copy is the same data.
    // Upload anyway so bind_z means what it says for any caller (a few KB).
    upload(z_, z, sizeof(float) * size_t(n) * size_t(Dz_));
    z_rows_ = n;
  }

  void denoise(const float* x, const float* t, int n, float* out) override {
    if (n != z_rows_) throw Error(TIMAR_ERR_INTERNAL, "denoise: z rows differ");
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

  void clear_cache() override {
    cuda_check(cudaMemsetAsync(cache_.ptr, 0, cache_.bytes, stream_), "cudaMemsetAsync");
    sync();
  }

  // Row 0 of present (what commit writes) to the host, then checked there.
  bool pending_finite() override {
    const size_t row = size_t(H_) * size_t(P_) * size_t(hd_);
    present_host_.resize(size_t(L_) * 2 * row);
    for (int64_t lk = 0; lk < L_ * 2; ++lk)
      cuda_check(cudaMemcpyAsync(present_host_.data() + size_t(lk) * row, present_.f() + size_t(lk * rows_) * row,
                                 row * sizeof(float), cudaMemcpyDeviceToHost, stream_), "pending_finite");
    sync();
    return host_row0_finite(present_host_.data(), int(L_), 1, int(H_), int(P_), int(hd_));
  }

  // present [L, 2, R, H, P, hd] row 0 -> cache [L, 2, R, H, S*P, hd] slot `slot`, every row:
  // per (layer, k/v, row) one 2-D copy of H blocks of P*hd floats.
  void commit(int slot) override {
    const size_t block = size_t(P_) * size_t(hd_) * sizeof(float);
    for (int64_t lk = 0; lk < L_ * 2; ++lk)
      for (int64_t r = 0; r < rows_; ++r) {
        const char* src = static_cast<const char*>(present_.ptr) + size_t(lk * rows_ + 0) * size_t(H_) * block;
        char* dst = static_cast<char*>(cache_.ptr) + (size_t(lk * rows_ + r) * size_t(H_) * size_t(slots_) + size_t(slot)) * block;
        cuda_check(cudaMemcpy2DAsync(dst, block * size_t(slots_), src, block, block, size_t(H_),
                                     cudaMemcpyDeviceToDevice, stream_), "commit");
      }
    sync();
  }

  void read_slot(int slot, std::vector<float>& out) override {
    const size_t block = size_t(P_) * size_t(hd_) * sizeof(float);
    out.resize(size_t(L_) * 2 * size_t(rows_) * size_t(H_) * size_t(P_) * size_t(hd_));
    char* host = reinterpret_cast<char*>(out.data());
    for (int64_t lr = 0; lr < L_ * 2 * rows_; ++lr) {
      const char* src = static_cast<const char*>(cache_.ptr) + (size_t(lr) * size_t(H_) * size_t(slots_) + size_t(slot)) * block;
      cuda_check(cudaMemcpy2DAsync(host + size_t(lr) * size_t(H_) * block, block, src, block * size_t(slots_), block,
                                   size_t(H_), cudaMemcpyDeviceToHost, stream_), "read_slot");
    }
    sync();
  }

  void write_slot(int slot, const std::vector<float>& in) override {
    const size_t block = size_t(P_) * size_t(hd_) * sizeof(float);
    const char* host = reinterpret_cast<const char*>(in.data());
    for (int64_t lr = 0; lr < L_ * 2 * rows_; ++lr) {
      char* dst = static_cast<char*>(cache_.ptr) + (size_t(lr) * size_t(H_) * size_t(slots_) + size_t(slot)) * block;
      cuda_check(cudaMemcpy2DAsync(dst, block * size_t(slots_), host + size_t(lr) * size_t(H_) * block, block, block,
                                   size_t(H_), cudaMemcpyHostToDevice, stream_), "write_slot");
    }
    sync();
  }

  size_t cache_floats() const override {
    return size_t(L_) * 2 * size_t(rows_) * size_t(H_) * size_t(slots_) * size_t(P_) * size_t(hd_);
  }
  void cache_to_host(float* out) override {
    download(out, cache_, cache_.bytes);
    sync();
  }
  void cache_from_host(const float* in) override {
    upload(cache_, in, cache_.bytes);
    sync();
  }

 private:
  void upload(DeviceBuffer& d, const void* h, size_t n) {
    cuda_check(cudaMemcpyAsync(d.ptr, h, n, cudaMemcpyHostToDevice, stream_), "upload");
  }
  void download(void* h, const DeviceBuffer& d, size_t n) {
    cuda_check(cudaMemcpyAsync(h, d.ptr, n, cudaMemcpyDeviceToHost, stream_), "download");
  }
  void sync() { cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }
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

  int64_t rows_, F_, S_, Da_, Dz_, L_, H_, hd_, slots_, P_;
  std::vector<std::string> cache_inputs_;
  int z_rows_ = 0;
  bool age_is_int64_ = true;
  Logger logger_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::vector<std::unique_ptr<nvinfer1::ICudaEngine>> engines_;
  std::vector<std::unique_ptr<nvinfer1::IExecutionContext>> contexts_;
  DeviceBuffer wave_, feats_, user_speech_, agent_speech_, user_motion_, agent_motion_, agent_mask_, uncond_, absent_,
      ages_, cache_, present_, z_, x_, t_, out_;
  std::vector<int32_t> ages32_;
  std::vector<float> present_host_;   // pending_finite's copy of present row 0
};

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
