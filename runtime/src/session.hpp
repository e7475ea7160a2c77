// A session: one conversation streamed through a shared Model, as timar_sdk/runtime/session.py.
// It holds only per-conversation state: the KV cache or token window, the ring ages, the
// generator, the output smoothing's last frame, the input buffers and the queue of motion not yet
// polled.
//
// Locking: turn_mutex_ guards the conversation and is held by a direct call (step, feed, flush,
// reset, state) or by a batch that runs this session's turn; io_mutex_ guards the buffers and
// the motion queue and is held briefly by accept, poll and the batch's take and finish, and by a
// direct call for its whole length. Always turn_mutex_ before io_mutex_.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "model.hpp"
#include "philox.hpp"
#include "timar.h"
#include "turns.hpp"

namespace timar {

// The checked settings of timar_session_options for this bundle (errors name the field).
TurnSettings session_settings(const Bundle& b, const timar_session_options& o);

// One whole turn a Model's round took from a session's buffers.
struct TakenTurn {
  std::shared_ptr<Session> session;
  std::unique_lock<std::mutex> hold;   // the session's turn_mutex_, until the turn is finished
  // Copies of the turn's input (accept may grow the buffers meanwhile); user_motion empty when
  // the user is not tracked.
  std::vector<float> user_audio, agent_audio, user_motion, motion;
  TurnJob job;
};

// One turn's result in a session's motion queue: its frames, or why it failed.
struct MotionChunk {
  uint64_t turn = 0;
  double start_seconds = 0.0;
  timar_status status = TIMAR_OK;
  std::string error;
  std::vector<float> frames;   // [F, 56] when status is TIMAR_OK
};

struct StateWriter;
struct StateReader;
struct StreamState;

class Session {
 public:
  // Registered with the model, so that its rounds see the session.
  static std::shared_ptr<Session> create(std::shared_ptr<Model> model, uint64_t seed, TurnSettings settings);
  Session(std::shared_ptr<Model> model, uint64_t seed, TurnSettings settings);
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  void info(timar_info* out) const;
  size_t frames_per_turn() const { return size_t(bundle_.frames); }
  const char* backend_name() const { return model_->backend().name(); }

  // Direct calls: inference on the caller's thread.
  void reset();
  void step(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n,
            float* out, size_t cap_frames);
  size_t feed_frames(size_t ua_n, size_t um_n, size_t aa_n) const;
  size_t feed(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n,
              float* out, size_t cap_frames);
  size_t flush_frames() const;
  size_t flush(float* out, size_t cap_frames);
  std::vector<uint8_t> get_state() const;
  size_t state_size() const;
  void set_state(const uint8_t* data, size_t size);

  // Buffered streaming: never runs or waits for inference (unless a direct call holds the session).
  // Returns the whole turns buffered and ready to run.
  size_t accept(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n);
  // The oldest queued turn's frames into out (0 when none is queued); a failed turn throws its
  // Error (after setting *turn and *start_seconds) and is dropped from the queue.
  size_t poll_motion(float* out, size_t cap_frames, uint64_t* turn, double* start_seconds);

  // Model::run_round: take the first ready turn (false when there is none, or the session is busy),
  // then, after its batch, commit it (or record its failure) and queue its motion.
  bool take_ready_turn(TakenTurn& out);
  void finish_taken_turn(TakenTurn& turn, Workspace& ws);

 private:
  struct Locks {
    std::unique_lock<std::mutex> turn, io;
  };
  Locks lock_all() const;
  // The *_locked helpers expect the locks of lock_all held.
  void reset_locked();
  size_t ready_turns_locked() const;
  size_t feed_frames_locked(size_t ua_n, size_t um_n, size_t aa_n) const;
  size_t flush_frames_locked() const;
  size_t state_size_locked() const;
  // The buffers' sizes and user motion facts, to cut them back to after a failure.
  struct InputMark {
    size_t ua, aa, um;
    bool tracked;
    std::array<float, 56> last;
  };
  InputMark mark_input() const;
  void cut_input(const InputMark& mark);
  // Appends checked pieces to the buffers: all of them or (on an exception) none.
  void append_input(const float* ua, size_t ua_n, const float* um, size_t um_n, const float* aa, size_t aa_n);
  void drop_front(size_t samples, size_t motion_frames);

  // A job for one turn of this session, the injected test failure included.
  TurnJob make_job(const float* ua, const float* um /* nullable */, const float* aa, float* motion);
  void commit_turn(const TurnJob& job, Workspace& ws);
  // One turn alone, committed; on failure an Error and nothing changed. With `undo`, the cache
  // slot it overwrites is saved there first.
  void run_alone(const float* ua, const float* um, const float* aa, float* motion,
                 std::vector<std::pair<int, std::vector<float>>>* undo);
  // Runs `turns` turns from the start of the stream buffers and commits all of them or none.
  void run_buffered(size_t turns, bool pad, float* out, size_t out_frames);
  void push_window_turn(const float* tokens);
  int next_slot() const;
  size_t window_capacity() const { return size_t(bundle_.context_turns - 1); }
  size_t turn_token_floats() const { return size_t(bundle_.tokens_per_turn) * size_t(bundle_.token_dim); }
  double media_seconds(uint64_t turn) const { return double(turn) * bundle_.samples / bundle_.sample_rate; }
  // State blobs: the stream part shared by both kinds, then the cache or the token window.
  void put_header(StateWriter& w) const;
  void check_header(StateReader& r) const;
  void put_stream(StateWriter& w, uint64_t tail_floats) const;
  void put_buffers(StateWriter& w) const;
  std::vector<uint8_t> get_cached_state() const;
  std::vector<uint8_t> get_window_state() const;
  void set_cached_state(StateReader& r);
  void set_window_state(StateReader& r);
  // The checked stream part of a blob into the session (swaps its buffers out of st).
  void apply_stream(StreamState& st);
  void check_counter(uint64_t lo, uint64_t hi, uint64_t turns) const;
  void check_audio(const float* a, size_t n, const char* name, bool exact) const;
  void check_motion(const float* m, size_t frames, const char* name, bool exact) const;

  const std::shared_ptr<Model> model_;
  const Bundle& bundle_;
  const uint64_t seed_;
  const TurnSettings settings_;
  const bool window_;          // attention "window_recompute" (else "cached")
  int64_t fail_after_ = -1;    // test hook: TIMAR_TEST_FAIL_AFTER_TURNS (one injected backend failure)
  int64_t runs_ = 0;

  mutable std::mutex turn_mutex_, io_mutex_;
  // The conversation (turn_mutex_).
  std::unique_ptr<KvCache> cache_;   // cached bundles
  std::vector<int> ages_;            // cached: the cache ring
  TokenWindow win_;                  // window_recompute: past tokens and audio statistics
  PhiloxNormal noise_;
  uint64_t turns_ = 0;
  uint64_t dropped_turns_ = 0;       // turns whose input a failed batched turn dropped (media time)
  SmoothingState smoothed_;          // the output smoothing's last frame
  // Input and output (io_mutex_).
  std::vector<float> buf_ua_, buf_aa_, buf_um_;
  bool tracked_ = false;                 // user motion was fed since the last reset
  std::array<float, 56> last_um_{};      // the last user motion frame fed (when tracked_)
  std::deque<MotionChunk> chunks_;
  // Direct calls' scratch (flush padding, a turn beyond the caller's capacity).
  std::vector<float> pad_ua_, pad_aa_, pad_um_, turn_motion_;
};

}  // namespace timar
