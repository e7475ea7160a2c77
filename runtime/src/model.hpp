// A Model: a bundle and its backend's loaded graphs, loaded once and shared by any number of
// sessions, as timar_sdk/runtime/model.py. Sessions hold a shared_ptr to it, so it lives until
// the last of them is gone. It knows its sessions (weakly), so that it can run the turns they
// have buffered (timar_session_accept) in batches: run_round on the caller's thread, or a
// Worker thread of its own.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend.hpp"
#include "bundle.hpp"
#include "timar.h"
#include "turns.hpp"

namespace timar {

class Session;

// load_bundle with its BundleError as a TIMAR_ERR_BUNDLE Error.
Bundle open_bundle(const std::string& dir, bool verify_hashes);

class Model {
 public:
  // Checks the options (errors name the field), then loads the graphs.
  Model(Bundle bundle, const timar_model_options& options);
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const Bundle& bundle() const { return bundle_; }
  Backend& backend() const { return *backend_; }
  // The bundle's facts, its default settings, seed 0 and 0 turns.
  void info(timar_info* out) const;

  void add_session(const std::weak_ptr<Session>& session);

  // Buffers for one batched call, from a pool; WorkspaceLease gives them back.
  std::unique_ptr<Workspace> take_workspace();
  void give_back(std::unique_ptr<Workspace> ws);

  struct Round {
    size_t turns = 0, batches = 0;
  };
  // One ready turn of every session that has one and is not busy in a call on another thread,
  // in batches of at most max_batch sessions (0: no limit). Each session's motion, or the
  // error of its turn, goes to its motion queue.
  Round run_round(size_t max_batch);

  // Waking a worker: sessions call notify_ready when a turn becomes ready; wait_ready returns
  // when the count of such events differs from `seen` (or after a while, or on stop).
  void notify_ready();
  uint64_t wait_ready(uint64_t seen, const std::atomic<bool>& stop);
  uint64_t ready_events() const;

 private:
  std::vector<std::shared_ptr<Session>> live_sessions();

  Bundle bundle_;
  std::unique_ptr<Backend> backend_;
  std::mutex sessions_mutex_;
  std::vector<std::weak_ptr<Session>> sessions_;
  std::mutex pool_mutex_;
  std::vector<std::unique_ptr<Workspace>> pool_;
  mutable std::mutex wake_mutex_;
  std::condition_variable wake_;
  uint64_t ready_events_ = 0;
};

// A workspace of the model's pool for the scope of one call.
class WorkspaceLease {
 public:
  explicit WorkspaceLease(Model& model) : model_(model), ws_(model.take_workspace()) {}
  ~WorkspaceLease() { model_.give_back(std::move(ws_)); }
  WorkspaceLease(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(const WorkspaceLease&) = delete;
  Workspace& operator*() { return *ws_; }

 private:
  Model& model_;
  std::unique_ptr<Workspace> ws_;
};

// A thread that runs the model's ready turns as they become ready (rounds of run_round), so
// that no application thread runs inference. Destroying it stops it after its current batch.
class Worker {
 public:
  Worker(std::shared_ptr<Model> model, size_t max_batch);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

 private:
  void loop();

  std::shared_ptr<Model> model_;   // keeps the model alive while the thread runs
  size_t max_batch_;
  std::atomic<bool> stop_{false};
  std::thread thread_;             // last: starts once the members above are set
};

}  // namespace timar
