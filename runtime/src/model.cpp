#include "model.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#ifdef __linux__
#include <sched.h>
#endif

#include "error.hpp"
#include "session.hpp"

namespace timar {
namespace {

// CPUs this process may run on (its affinity mask on Linux), at least 1.
int cpus_available() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
  return std::max(1, int(std::thread::hardware_concurrency()));
}

void check_options(const Bundle& b, const timar_model_options& o) {
  const int cpus = cpus_available();
  if (o.threads < 0 || o.threads > cpus)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "threads: expected 0 (the backend's default) or 1.." + std::to_string(cpus) +
                                                " (the CPUs available to this process), got " + std::to_string(o.threads));
  if (o.device_id < 0)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "device_id: expected a GPU index >= 0, got " + std::to_string(o.device_id));
  if (o.backend < TIMAR_BACKEND_AUTO || o.backend > TIMAR_BACKEND_TENSORRT)
    throw Error(TIMAR_ERR_INVALID_ARGUMENT, "backend: unknown value " + std::to_string(o.backend));
  if (b.cache_fp16 && o.backend == TIMAR_BACKEND_TENSORRT)
    throw Error(TIMAR_ERR_UNSUPPORTED, "backend: this bundle's KV cache is float16 (cache.dtype); the TensorRT backend "
                                       "keeps a float32 cache: convert the bundle without --cache-dtype float16");
  if (b.window && o.backend == TIMAR_BACKEND_TENSORRT)
    throw Error(TIMAR_ERR_UNSUPPORTED, "backend: TensorRT runs cached bundles only; this window_recompute bundle "
                                       "(an authors' model) runs with TIMAR_BACKEND_ORT_CPU or TIMAR_BACKEND_ORT_CUDA");
}

int pick_backend(const Bundle& b, int wanted) {
  (void)b;
  if (wanted != TIMAR_BACKEND_AUTO) return wanted;
  const char* force_cpu = std::getenv("TIMAR_FORCE_CPU");
  const bool cpu_only = force_cpu && *force_cpu && std::strcmp(force_cpu, "0") != 0;
#ifdef TIMAR_WITH_TENSORRT
  if (!cpu_only && !b.window && !b.cache_fp16 && !b.engines.empty()) return TIMAR_BACKEND_TENSORRT;
#endif
  if (!cpu_only && ort_has_cuda()) return TIMAR_BACKEND_ORT_CUDA;
  return TIMAR_BACKEND_ORT_CPU;
}

std::unique_ptr<Backend> load_backend(const Bundle& b, const timar_model_options& o) {
  BackendConfig bc;
  bc.kind = pick_backend(b, o.backend);
  bc.threads = o.threads;
  bc.device_id = o.device_id;
  bc.spin = o.spin != 0;
  if (bc.kind == TIMAR_BACKEND_TENSORRT) {
#ifdef TIMAR_WITH_TENSORRT
    std::string why;
    std::unique_ptr<Backend> trt;
    try {
      trt = make_trt_backend(b, bc, &why);
    } catch (const BundleError& e) {
      throw Error(TIMAR_ERR_BUNDLE, e.what());
    }
    if (trt) return trt;
    if (o.backend == TIMAR_BACKEND_TENSORRT) throw Error(TIMAR_ERR_UNSUPPORTED, "backend: TensorRT unavailable: " + why);
    bc.kind = ort_has_cuda() ? TIMAR_BACKEND_ORT_CUDA : TIMAR_BACKEND_ORT_CPU;
#else
    throw Error(TIMAR_ERR_UNSUPPORTED,
                "backend: TensorRT is not compiled into this library (configure with -DTIMAR_WITH_TENSORRT=ON)");
#endif
  }
  return make_ort_backend(b, bc);
}

// A worker that found nothing to run looks again at least this often: a session that was busy
// in a call on another thread sends no wake-up when the call returns.
constexpr std::chrono::milliseconds kIdleRecheck{20};

}  // namespace

Bundle open_bundle(const std::string& dir, bool verify_hashes) {
  try {
    return load_bundle(dir, verify_hashes);
  } catch (const BundleError& e) {
    throw Error(TIMAR_ERR_BUNDLE, e.what());
  }
}

Model::Model(Bundle bundle, const timar_model_options& options) : bundle_(std::move(bundle)) {
  check_options(bundle_, options);
  backend_ = load_backend(bundle_, options);
}

void Model::info(timar_info* out) const {
  const Bundle& b = bundle_;
  out->fps = b.fps;
  out->sample_rate = b.sample_rate;
  out->frames_per_turn = b.frames;
  out->samples_per_turn = b.samples;
  out->motion_dim = TIMAR_MOTION_DIM;
  out->context_turns = b.context_turns;
  out->steps = b.default_steps;
  out->history = b.history == "feedback" ? TIMAR_HISTORY_FEEDBACK : TIMAR_HISTORY_MASKED;
  out->backend = backend_->kind();
  out->temperature = b.default_temperature;
  out->cfg = b.default_cfg;
  out->seed = 0;
  out->turns = 0;
  out->exp_begin = b.exp_range[0];
  out->exp_end = b.exp_range[1];
  out->jaw_begin = b.jaw_range[0];
  out->jaw_end = b.jaw_range[1];
  out->neck_begin = b.neck_range[0];
  out->neck_end = b.neck_range[1];
  out->smoothing_expression = b.smoothing.seconds[0];
  out->smoothing_jaw = b.smoothing.seconds[1];
  out->smoothing_neck = b.smoothing.seconds[2];
}

void Model::add_session(const std::weak_ptr<Session>& session) {
  std::lock_guard<std::mutex> lock(sessions_mutex_);
  sessions_.erase(std::remove_if(sessions_.begin(), sessions_.end(),
                                 [](const std::weak_ptr<Session>& s) { return s.expired(); }),
                  sessions_.end());
  sessions_.push_back(session);
}

std::vector<std::shared_ptr<Session>> Model::live_sessions() {
  std::lock_guard<std::mutex> lock(sessions_mutex_);
  std::vector<std::shared_ptr<Session>> live;
  for (const std::weak_ptr<Session>& s : sessions_)
    if (std::shared_ptr<Session> p = s.lock()) live.push_back(std::move(p));
  return live;
}

std::unique_ptr<Workspace> Model::take_workspace() {
  {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    if (!pool_.empty()) {
      std::unique_ptr<Workspace> ws = std::move(pool_.back());
      pool_.pop_back();
      return ws;
    }
  }
  return std::unique_ptr<Workspace>(new Workspace());
}

void Model::give_back(std::unique_ptr<Workspace> ws) {
  if (!ws) return;
  try {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    pool_.push_back(std::move(ws));
  } catch (...) {   // out of memory for the pool's list: the workspace is freed instead
  }
}

Model::Round Model::run_round(size_t max_batch) {
  std::vector<TakenTurn> taken;
  for (const std::shared_ptr<Session>& session : live_sessions()) {
    TakenTurn turn;
    if (session->take_ready_turn(turn)) {
      turn.session = session;
      taken.push_back(std::move(turn));
    }
  }
  Round round;
  const size_t size = max_batch ? max_batch : std::max<size_t>(taken.size(), 1);
  WorkspaceLease ws(*this);
  for (size_t begin = 0; begin < taken.size(); begin += size) {
    const size_t end = begin + std::min(size, taken.size() - begin);
    std::vector<TurnJob*> jobs;
    for (size_t i = begin; i < end; ++i) jobs.push_back(&taken[i].job);
    round.batches += run_turns(bundle_, *backend_, jobs, *ws,
                               [&](size_t i) { taken[begin + i].session->finish_taken_turn(taken[begin + i], *ws); });
    round.turns += end - begin;
  }
  return round;
}

void Model::notify_ready() {
  {
    std::lock_guard<std::mutex> lock(wake_mutex_);
    ++ready_events_;
  }
  wake_.notify_all();
}

uint64_t Model::ready_events() const {
  std::lock_guard<std::mutex> lock(wake_mutex_);
  return ready_events_;
}

uint64_t Model::wait_ready(uint64_t seen, const std::atomic<bool>& stop) {
  std::unique_lock<std::mutex> lock(wake_mutex_);
  wake_.wait_for(lock, kIdleRecheck, [&] { return ready_events_ != seen || stop.load(); });
  return ready_events_;
}

Worker::Worker(std::shared_ptr<Model> model, size_t max_batch)
    : model_(std::move(model)), max_batch_(max_batch), thread_([this] { loop(); }) {}

Worker::~Worker() {
  stop_ = true;
  model_->notify_ready();
  thread_.join();
}

void Worker::loop() {
  uint64_t seen = model_->ready_events();
  while (!stop_) {
    size_t ran = 0;
    try {
      ran = model_->run_round(max_batch_).turns;
    } catch (...) {   // out of memory gathering the round: its turns stay buffered; try again later
    }
    if (!ran) seen = model_->wait_ready(seen, stop_);
  }
}

}  // namespace timar
