/*
 * timar.h - C ABI of the TIMAR native runtime (timar-sdk).
 *
 * Streams a two-person conversation turn by turn through a TIMAR bundle (the folder written by
 * timar-export: manifest.json, audio_encoder.onnx, encoder_step.onnx, denoiser.onnx and, when
 * built, TensorRT engines; or a window_recompute bundle of the authors' models, with
 * token_embed.onnx and window_encoder.onnx instead of encoder_step.onnx) and returns the
 * agent's 3D head motion: per frame 56 floats, FLAME expression 0..49, jaw pose 50..52
 * (axis-angle), neck/global pose 53..55 (axis-angle), at the bundle's fps (25). It is the same
 * loop as the Python `timar_sdk.Session`, with the same portable random generator, so a seed
 * gives the same motion in Python, C++ and Unity.
 *
 * Objects
 *  - A model (timar_model) is a bundle and its loaded graphs: loaded once, shared by any number
 *    of sessions (timar_session_create_from_model). timar_session_create() makes a session
 *    with a private model of its own.
 *  - A session (timar_session) is one conversation: its cache or token window, generator,
 *    input buffers and the motion it has not yet handed out. Two ways to drive it:
 *    direct calls that run inference on the calling thread (timar_step, timar_feed,
 *    timar_flush), or buffered streaming: timar_session_accept() only buffers input, the
 *    model's whole buffered turns run batched (timar_model_run_ready() on a thread of yours, or
 *    the model's own worker thread: timar_model_start_worker()), and timar_session_poll_motion()
 *    hands out each turn's motion. Drive one session one way at a time.
 *  - Batching: one batched call runs every graph once for the turns of several sessions of a
 *    model (rows = sessions x CFG rows); each session gets the motion it gets alone, to float
 *    error (1e-5). Sessions whose settings differ in steps or history (window_recompute
 *    bundles: also in the number of past turns in their window), and TensorRT sessions, run in
 *    separate batches.
 *
 * Conventions
 *  - Every function that can fail returns a timar_status; TIMAR_OK is 0. On failure a message
 *    naming the argument and what was expected is kept per thread: timar_last_error().
 *  - A failed call leaves the session exactly as it was (nothing is buffered, no turn is
 *    committed, the generator does not advance).
 *  - Audio: mono float32 samples in [-1, 1] at the bundle's sample rate (16000 Hz); convert
 *    16-bit PCM with timar_pcm16_to_float(). Lengths are in samples. Every sample must be
 *    finite (else TIMAR_ERR_NOT_FINITE) with |x| <= TIMAR_AUDIO_LIMIT (else
 *    TIMAR_ERR_INVALID_ARGUMENT; the message gives the largest |x| and where it is).
 *  - Motion: row-major frames of TIMAR_MOTION_DIM floats, raw FLAME values, each finite with
 *    |x| <= TIMAR_MOTION_LIMIT (same errors). Lengths and capacities are in frames
 *    (1 frame = TIMAR_MOTION_DIM floats); a frame count whose float count overflows size_t is
 *    refused with TIMAR_ERR_INVALID_ARGUMENT.
 *  - A turn whose motion, or what it would add to the session (new cache entries, tokens),
 *    holds NaN or Inf is not committed: TIMAR_ERR_NUMERIC, and the session is unchanged.
 *    In a batch only that session's turn fails; the others are committed.
 *  - Output buffers belong to the caller; their capacity is passed in and checked.
 *  - Options structs carry struct_size: fill them with their _init() function first.
 *  - No C++ types and no exceptions cross this interface.
 *
 * Thread safety and blocking
 *  - A model may be used from any number of threads: its sessions' turns run concurrently
 *    (ONNX Runtime) or one graph call at a time (TensorRT, one CUDA stream).
 *  - timar_session_accept() and timar_session_poll_motion() may be called from any thread, also
 *    while the session's turn runs in a batch on another thread: they hold the session's input
 *    lock only to check and copy (never during inference), so they suit an audio callback.
 *  - The other session calls lock the session: on several threads they take turns, and while a
 *    batch runs this session's turn they wait for that batch. The direct calls hold the input
 *    lock too, so an accept on another thread waits for them: do not mix the two ways.
 *  - Blocking calls: the _create functions (load graphs); timar_step, timar_feed, timar_flush and
 *    timar_model_run_ready (inference); timar_model_stop_worker and timar_model_destroy (wait for
 *    the worker's current batch).
 *  - Destroying an object while another thread uses it is an error of the caller, as in C
 *    generally. Sessions keep their model's graphs alive (reference counting): destroying the
 *    model handle first is safe; the sessions stay usable and the graphs are freed with the
 *    last of them.
 *  - timar_last_error() is thread-local: read it on the thread whose call failed.
 *  - The free functions (version, *_options_init, status_string, pcm16_to_float, philox
 *    helpers) are thread-safe.
 *
 * Lifetime: timar_model_create() -> timar_session_create_from_model() (any number) -> calls ->
 * timar_session_destroy() and timar_model_destroy() in any order; or timar_session_create() ->
 * calls -> timar_session_destroy(). The bundle folder is read during create only.
 */
#ifndef TIMAR_H_
#define TIMAR_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  if defined(TIMAR_BUILDING)
#    define TIMAR_API __declspec(dllexport)
#  else
#    define TIMAR_API __declspec(dllimport)
#  endif
#else
#  define TIMAR_API __attribute__((visibility("default")))
#endif

/* Version of this header's ABI. timar_abi_version() returns the library's: refuse to run when
 * they differ (a new ABI version means a changed struct or signature). */
#define TIMAR_ABI_VERSION 2
#define TIMAR_MOTION_DIM 56

/* Input bounds: what a real microphone and face tracker can send (timar_sdk.layout.AUDIO_LIMIT
 * and MOTION_LIMIT in Python). Audio full scale is 1.0; 4.0 leaves 12 dB for float DSP
 * overshoot, and larger values are int16 numbers passed as float, or garbage. Motion values are
 * FLAME expression coefficients and axis-angle radians, which trackers keep within a few units.
 * Larger finite values would drive the model to NaN; they are refused, never clipped. */
#define TIMAR_AUDIO_LIMIT 4.0f
#define TIMAR_MOTION_LIMIT 20.0f

typedef enum timar_status {
  TIMAR_OK = 0,
  TIMAR_ERR_NULL_POINTER = 1,       /* a required pointer was NULL                           */
  TIMAR_ERR_INVALID_ARGUMENT = 2,   /* a value out of range (steps, cfg, history, ...)       */
  TIMAR_ERR_WRONG_LENGTH = 3,       /* an array of the wrong length (step needs one turn)    */
  TIMAR_ERR_NOT_FINITE = 4,         /* NaN or Inf in audio or motion                         */
  TIMAR_ERR_BUFFER_TOO_SMALL = 5,   /* output capacity below what the call produces          */
  TIMAR_ERR_BUNDLE = 6,             /* bundle missing, invalid, or a file's sha256 mismatches */
  TIMAR_ERR_UNSUPPORTED = 7,        /* generator/backend/feature not in this build           */
  TIMAR_ERR_BACKEND = 8,            /* ONNX Runtime / TensorRT / CUDA reported an error      */
  TIMAR_ERR_STATE = 9,              /* a state blob not from this bundle and settings        */
  TIMAR_ERR_OUT_OF_MEMORY = 10,
  TIMAR_ERR_INTERNAL = 11,
  TIMAR_ERR_NUMERIC = 12            /* the model produced NaN or Inf; the session is unchanged */
} timar_status;

typedef enum timar_backend {
  TIMAR_BACKEND_AUTO = 0,           /* TensorRT engines for this GPU, else ORT CUDA, else ORT CPU */
  TIMAR_BACKEND_ORT_CPU = 1,
  TIMAR_BACKEND_ORT_CUDA = 2,       /* needs an ONNX Runtime build with the CUDA provider   */
  TIMAR_BACKEND_TENSORRT = 3        /* needs a library built with -DTIMAR_WITH_TENSORRT=ON   */
} timar_backend;

typedef enum timar_history {
  TIMAR_HISTORY_DEFAULT = 0,        /* the bundle's (manifest "history")                    */
  TIMAR_HISTORY_MASKED = 1,
  TIMAR_HISTORY_FEEDBACK = 2
} timar_history;

/* Output smoothing (timar_sdk/runtime/smoothing.py): a causal one-pole low-pass filter per
 * motion region (expression 0..49, jaw 50..52, neck 53..55), each with its time constant tau in
 * seconds. Per dimension, in float32, with a = (float)(1 - exp(-1 / (fps * tau))):
 *     y[t] = y[t-1] + a * (x[t] - y[t-1])
 * and y[t] = x[t] exactly where tau = 0 (that region is not smoothed). The first frame after
 * create or reset passes through unchanged; after that the filter's state (the last output
 * frame) carries across turns, so a turn boundary is invisible, and it is part of the state
 * blob. It runs on every committed turn, in every path (step, feed, flush, accept/poll). The
 * filter delays a region by about tau. */
typedef enum timar_smoothing {
  TIMAR_SMOOTHING_DEFAULT = 0,      /* the bundle's (manifest "smoothing"; none if it has none) */
  TIMAR_SMOOTHING_OFF = 1,          /* the exact model output                               */
  TIMAR_SMOOTHING_CUSTOM = 2        /* the smoothing_expression/_jaw/_neck time constants   */
} timar_smoothing;
#define TIMAR_SMOOTHING_MAX_SECONDS 2.0

/* Settings of timar_session_create (a session with a private model): the model's and the
 * session's below in one struct. Always fill with timar_options_init() first, then change fields. */
typedef struct timar_options {
  uint32_t struct_size;   /* sizeof(timar_options), set by timar_options_init               */
  uint32_t steps;         /* diffusion steps 1..num_train_steps (1000); 0 = the bundle's default */
  uint64_t seed;          /* seed of the portable Philox generator (any value)               */
  double temperature;     /* 0..10; NaN = the bundle's default                               */
  double cfg;             /* classifier-free guidance 0..20; NaN = the bundle's default;
                             1 = off, anything else runs a second (unconditional) row        */
  int32_t history;        /* timar_history                                                   */
  int32_t threads;        /* intra-op threads 1..(CPUs available to the process);
                             0 = the backend's default                                       */
  int32_t context_turns;  /* past turns kept visible 0..W-1; -1 = all (W-1)                  */
  int32_t backend;        /* timar_backend                                                   */
  int32_t verify_hashes;  /* nonzero (default): check every file's sha256 against the manifest */
  int32_t device_id;      /* GPU index for CUDA / TensorRT (>= 0)                            */
  int32_t smoothing;      /* timar_smoothing                                                 */
  double smoothing_expression;  /* TIMAR_SMOOTHING_CUSTOM: tau of each region in seconds,
                                   0..TIMAR_SMOOTHING_MAX_SECONDS, 0 = that region not
                                   smoothed; must stay 0 with the other modes              */
  double smoothing_jaw;
  double smoothing_neck;
} timar_options;

/* Model settings: what loads the graphs, shared by every session of the model. Always fill with
 * timar_model_options_init() first, then change fields. */
typedef struct timar_model_options {
  uint32_t struct_size;   /* sizeof(timar_model_options), set by timar_model_options_init   */
  int32_t backend;        /* timar_backend                                                   */
  int32_t threads;        /* intra-op threads 1..(CPUs available to the process);
                             0 = the backend's default                                       */
  int32_t device_id;      /* GPU index for CUDA / TensorRT (>= 0)                            */
  int32_t verify_hashes;  /* nonzero (default): check every file's sha256 against the manifest */
  int32_t spin;           /* nonzero: ONNX Runtime's threads spin between operators (a few ms
                             faster per turn on an idle machine, 2-3x slower beside other busy
                             processes); 0 (default): they sleep                             */
} timar_model_options;

/* Per-conversation settings of a session made from a model. Always fill with
 * timar_session_options_init() first, then change fields. Ranges as in timar_options. */
typedef struct timar_session_options {
  uint32_t struct_size;   /* sizeof(timar_session_options), set by timar_session_options_init */
  uint32_t steps;         /* 0 = the bundle's default                                        */
  uint64_t seed;
  double temperature;     /* NaN = the bundle's default                                      */
  double cfg;             /* NaN = the bundle's default                                      */
  int32_t history;        /* timar_history                                                   */
  int32_t context_turns;  /* -1 = all (W-1)                                                  */
  int32_t smoothing;      /* timar_smoothing                                                 */
  double smoothing_expression;  /* TIMAR_SMOOTHING_CUSTOM only: seconds, as in timar_options */
  double smoothing_jaw;
  double smoothing_neck;
} timar_session_options;

/* What a session runs; filled by timar_session_info() (timar_model_info(): the bundle's
 * default settings, seed 0, turns 0). */
typedef struct timar_info {
  uint32_t struct_size;      /* set by the caller to sizeof(timar_info)                     */
  int32_t fps;               /* motion frames per second (25)                               */
  int32_t sample_rate;       /* audio samples per second (16000)                            */
  int32_t frames_per_turn;   /* F (25)                                                       */
  int32_t samples_per_turn;  /* audio samples per turn (16000)                              */
  int32_t motion_dim;        /* TIMAR_MOTION_DIM                                             */
  int32_t context_turns;     /* W of the bundle                                              */
  int32_t steps;
  int32_t history;           /* TIMAR_HISTORY_MASKED or TIMAR_HISTORY_FEEDBACK               */
  int32_t backend;           /* the backend actually used (never AUTO)                       */
  double temperature;
  double cfg;
  uint64_t seed;
  uint64_t turns;            /* turns committed since create/reset                          */
  int32_t exp_begin, exp_end;    /* motion layout: expression [begin, end)                    */
  int32_t jaw_begin, jaw_end;    /* jaw pose                                                  */
  int32_t neck_begin, neck_end;  /* neck / global pose                                        */
  double smoothing_expression;   /* the output smoothing in effect: tau of each region in      */
  double smoothing_jaw;          /* seconds, 0 = not smoothed (timar_model_info: the bundle's  */
  double smoothing_neck;         /* defaults)                                                  */
} timar_info;

typedef struct timar_model timar_model;       /* opaque */
typedef struct timar_session timar_session;   /* opaque */

/* ---- library ---------------------------------------------------------------------------- */
TIMAR_API int32_t timar_abi_version(void);
TIMAR_API const char* timar_version(void);              /* "0.1.0"                           */
TIMAR_API const char* timar_build_info(void);           /* backends compiled in, ORT version */
TIMAR_API const char* timar_status_string(timar_status status);
/* The message of the most recent failed call on this thread ("" if none; a successful call
 * does not clear it). The pointer stays valid until the next failing call on this thread. */
TIMAR_API const char* timar_last_error(void);
TIMAR_API void timar_options_init(timar_options* options);
TIMAR_API void timar_model_options_init(timar_model_options* options);
TIMAR_API void timar_session_options_init(timar_session_options* options);

/* ---- model ------------------------------------------------------------------------------ */
/* Open a bundle folder (UTF-8 path) and load its graphs once, for any number of sessions.
 * options may be NULL (defaults). Checks the bundle as timar_session_create does. Options out
 * of range: TIMAR_ERR_INVALID_ARGUMENT naming the field. */
TIMAR_API timar_status timar_model_create(const char* bundle_dir, const timar_model_options* options,
                                          timar_model** out_model);
/* Stops the model's worker (after its current batch) and releases the handle; the graphs live
 * on while sessions of the model do. NULL is ignored. */
TIMAR_API void timar_model_destroy(timar_model* model);
TIMAR_API timar_status timar_model_info(const timar_model* model, timar_info* out_info);
/* "onnxruntime-cpu", "onnxruntime-cuda" or "tensorrt"; owned by the model. */
TIMAR_API const char* timar_model_backend_name(const timar_model* model);

/* Run one whole buffered turn (timar_session_accept) of every session of the model that has
 * one, on the calling thread, in batches of at most max_batch sessions (0: no limit). A
 * session busy in a call on another thread is left for a later call. Each turn's motion, or
 * its error, goes to its session's queue (timar_session_poll_motion). Call again while
 * *out_turns > 0 to run every buffered turn. out_turns: turns run; out_batches: the batched
 * calls that ran them (either may be NULL). A failed turn does not fail this call. */
TIMAR_API timar_status timar_model_run_ready(timar_model* model, size_t max_batch, size_t* out_turns,
                                             size_t* out_batches);
/* A thread of the model that runs the sessions' turns as they become ready, as
 * timar_model_run_ready would, so that no thread of yours runs inference. One per model:
 * starting a second is TIMAR_ERR_INVALID_ARGUMENT. Stop: returns after the current batch;
 * turns still buffered stay buffered (no worker: TIMAR_OK, nothing to do). */
TIMAR_API timar_status timar_model_start_worker(timar_model* model, size_t max_batch);
TIMAR_API timar_status timar_model_stop_worker(timar_model* model);

/* ---- session ---------------------------------------------------------------------------- */
/* A session on a model; options may be NULL (defaults). The session keeps the model's graphs
 * alive. Settings out of range: TIMAR_ERR_INVALID_ARGUMENT naming the field. */
TIMAR_API timar_status timar_session_create_from_model(timar_model* model, const timar_session_options* options,
                                                       timar_session** out_session);
/* A session with a private model: open a bundle folder (UTF-8 path) and load its graphs.
 * options may be NULL (defaults). Always checks manifest.json against manifest.sha256 (the
 * bundle's id), the manifest's numbers and consistency, and that every file it names stays
 * inside the folder; with verify_hashes, every graph file's sha256 too. Options out of range:
 * TIMAR_ERR_INVALID_ARGUMENT. */
TIMAR_API timar_status timar_session_create(const char* bundle_dir, const timar_options* options,
                                            timar_session** out_session);
/* NULL is ignored. Also while a batch on another thread (the model's worker, or
 * timar_model_run_ready) runs the session's turn: the session is freed after that batch. */
TIMAR_API void timar_session_destroy(timar_session* session);
TIMAR_API timar_status timar_session_info(const timar_session* session, timar_info* out_info);
/* "onnxruntime-cpu", "onnxruntime-cuda" or "tensorrt"; owned by the session. */
TIMAR_API const char* timar_session_backend_name(const timar_session* session);
/* Back to a fresh session: empty cache and buffers, generator at its seed, no motion queued. */
TIMAR_API timar_status timar_session_reset(timar_session* session);

/* Exactly one turn. user_audio and agent_audio: samples_per_turn samples each; user_motion:
 * frames_per_turn frames, or NULL with user_motion_frames 0 when the user's face is not
 * tracked. out_motion: capacity >= frames_per_turn frames; receives frames_per_turn frames. */
TIMAR_API timar_status timar_step(timar_session* session,
                                  const float* user_audio, size_t user_audio_samples,
                                  const float* user_motion, size_t user_motion_frames,
                                  const float* agent_audio, size_t agent_audio_samples,
                                  float* out_motion, size_t out_capacity_frames);

/* Streaming: pieces of any length (a 20 ms audio callback, a few motion frames). Each input
 * may be NULL with length 0 (nothing this call). Runs every turn that becomes complete and
 * writes its frames (k * frames_per_turn, k >= 0) to out_motion; *out_frames receives k *
 * frames_per_turn. A turn completes when both audio streams hold a whole turn and, once any
 * user motion has been fed since the last reset, the user motion holds a whole turn too (never
 * feed motion for an untracked user: those turns use the "absent" embedding).
 * If the capacity is too small nothing is consumed: TIMAR_ERR_BUFFER_TOO_SMALL, and
 * *out_frames receives the frames needed (also see timar_feed_frames). */
TIMAR_API timar_status timar_feed(timar_session* session,
                                  const float* user_audio, size_t user_audio_samples,
                                  const float* user_motion, size_t user_motion_frames,
                                  const float* agent_audio, size_t agent_audio_samples,
                                  float* out_motion, size_t out_capacity_frames,
                                  size_t* out_frames);

/* How many frames timar_feed would return for pieces of these lengths (no work done). */
TIMAR_API timar_status timar_feed_frames(const timar_session* session, size_t user_audio_samples,
                                         size_t user_motion_frames, size_t agent_audio_samples,
                                         size_t* out_frames);

/* Finish the stream: runs every buffered turn, the last one padded with silence, and returns
 * the frames the real audio covers (what both audio streams hold: frames_per_turn per whole
 * turn, then floor(samples * fps / sample_rate) of a partial one), then empties the buffers.
 * A tracked user's motion is padded with the last frame fed, also when none is buffered.
 * Buffered audio holds more than one turn only when user motion lagged behind it: then
 * out_motion needs more than frames_per_turn frames; if it is too small nothing is consumed:
 * TIMAR_ERR_BUFFER_TOO_SMALL, and *out_frames receives the frames needed. */
TIMAR_API timar_status timar_flush(timar_session* session, float* out_motion,
                                   size_t out_capacity_frames, size_t* out_frames);

/* Snapshot (cache and ring ages, or for window_recompute bundles the past turns' tokens and the
 * audio statistics; generator counter, turn count, stream buffers) as an opaque byte blob, to
 * fork or restore later on a session of the same bundle (manifest digest) and settings (seed,
 * steps, temperature, cfg, history, context_turns, smoothing); it holds the smoothing filter's
 * last output frame too. Blobs of older runtimes (ABI 1 and the first ABI 2 builds: state
 * format 1, before smoothing) still load, as snapshots taken with smoothing off.
 * Call with buffer NULL to get the size in *out_size; the size changes as buffers fill.
 * timar_set_state checks the whole blob before it changes anything (size, header, bundle,
 * settings, a valid ring state, finite cache/tokens and buffers) and applies all of it or
 * nothing; a blob of other settings is refused with TIMAR_ERR_STATE naming the setting. */
TIMAR_API timar_status timar_get_state(const timar_session* session, void* buffer,
                                       size_t capacity, size_t* out_size);
TIMAR_API timar_status timar_set_state(timar_session* session, const void* buffer, size_t size);

/* ---- buffered streaming ------------------------------------------------------------------- */
/* Check and buffer pieces of any length (as timar_feed takes them) without running anything:
 * whole turns run later in the model's batches (timar_model_run_ready, or its worker).
 * out_ready_turns (may be NULL): the whole turns now buffered and not yet run; all inputs NULL
 * with length 0 only asks for it. Bad input buffers nothing. */
TIMAR_API timar_status timar_session_accept(timar_session* session,
                                            const float* user_audio, size_t user_audio_samples,
                                            const float* user_motion, size_t user_motion_frames,
                                            const float* agent_audio, size_t agent_audio_samples,
                                            size_t* out_ready_turns);

/* The oldest turn run from accepted input and not yet polled, in the order they ran: its
 * frames_per_turn frames into out_motion, *out_frames = frames_per_turn, its index in the
 * conversation (0, 1, ...) in *out_turn and the media time of its first frame, seconds since the
 * session's start (or reset), in *out_start_seconds (both may be NULL). Nothing queued: TIMAR_OK
 * with *out_frames = 0. A capacity below frames_per_turn: TIMAR_ERR_BUFFER_TOO_SMALL, nothing
 * taken, *out_frames = the frames needed. A turn that failed in its batch is reported here, once:
 * its status (TIMAR_ERR_NUMERIC, TIMAR_ERR_BACKEND, ...) and message, with *out_turn and
 * *out_start_seconds set; its input was dropped (it would fail again) and the conversation is as
 * before it (the next turn has the same index, a later media time). Queued motion is kept until
 * polled (about 5.6 KB a turn), and dropped by timar_session_reset and timar_set_state. */
TIMAR_API timar_status timar_session_poll_motion(timar_session* session, float* out_motion,
                                                 size_t out_capacity_frames, size_t* out_frames,
                                                 uint64_t* out_turn, double* out_start_seconds);

/* ---- helpers ------------------------------------------------------------------------------ */
/* 16-bit PCM -> float32 in [-1, 1) (x / 32768), as the Python runtime converts int16 audio. */
TIMAR_API timar_status timar_pcm16_to_float(const int16_t* pcm, size_t samples, float* out);

/* The portable generator (docs/DESIGN.md 4.1), exposed for cross-language tests:
 * Philox4x32-10 of one block: counter c[4] (c[0] least significant), key k[2] -> out[4]. */
TIMAR_API void timar_philox4x32_10(const uint32_t counter[4], const uint32_t key[2],
                                   uint32_t out[4]);
/* n standard normals (float32) from a generator keyed by seed at block counter
 * (counter_lo + 2^64 * counter_hi), as PhiloxNormal(seed).normal(n) after set_state. */
TIMAR_API timar_status timar_philox_normals(uint64_t seed, uint64_t counter_lo, uint64_t counter_hi,
                                            float* out, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* TIMAR_H_ */
