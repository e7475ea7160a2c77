/*
 * timar.h - C ABI of the TIMAR native runtime (timar-sdk).
 *
 * Streams a two-person conversation turn by turn through a TIMAR bundle (the folder written by
 * timar-export: manifest.json, audio_encoder.onnx, encoder_step.onnx, denoiser.onnx and, when
 * built, TensorRT engines; or a window_recompute bundle of the authors' models, with
 * token_embed.onnx and window_encoder.onnx instead of encoder_step.onnx) and returns the agent's 3D head motion: per frame 56 floats, FLAME
 * expression 0..49, jaw pose 50..52 (axis-angle), neck/global pose 53..55 (axis-angle), at the
 * bundle's fps (25). It is the same loop as the Python `timar_sdk.Session`, with the same
 * portable random generator, so a seed gives the same motion in Python, C++ and Unity.
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
 *  - Output buffers belong to the caller; their capacity is passed in and checked.
 *  - No C++ types and no exceptions cross this interface.
 *
 * Thread safety
 *  - A session is not thread-safe: call it from one thread at a time (e.g. one session per
 *    thread, or your own lock). Distinct sessions are independent and may run concurrently,
 *    also when created from the same bundle folder.
 *  - timar_last_error() is thread-local: read it on the thread whose call failed.
 *  - The free functions (version, options_init, status_string, pcm16_to_float, philox helpers)
 *    are thread-safe.
 *
 * Lifetime: timar_session_create() -> any calls -> timar_session_destroy(). The bundle folder
 * is read during create only.
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
#define TIMAR_ABI_VERSION 1
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

/* Session settings. Always fill with timar_options_init() first, then change fields. */
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
} timar_options;

/* What a session runs; filled by timar_session_info(). */
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
} timar_info;

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

/* ---- session ---------------------------------------------------------------------------- */
/* Open a bundle folder (UTF-8 path) and load its graphs. options may be NULL (defaults).
 * Always checks manifest.json against manifest.sha256 (the bundle's id), the manifest's
 * numbers and consistency, and that every file it names stays inside the folder; with
 * verify_hashes, every graph file's sha256 too. Options out of range: TIMAR_ERR_INVALID_ARGUMENT. */
TIMAR_API timar_status timar_session_create(const char* bundle_dir, const timar_options* options,
                                            timar_session** out_session);
/* NULL is ignored. */
TIMAR_API void timar_session_destroy(timar_session* session);
TIMAR_API timar_status timar_session_info(const timar_session* session, timar_info* out_info);
/* "onnxruntime-cpu", "onnxruntime-cuda" or "tensorrt"; owned by the session. */
TIMAR_API const char* timar_session_backend_name(const timar_session* session);
/* Back to a fresh session: empty cache and buffers, generator at its seed. */
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
 * steps, temperature, cfg, history, context_turns).
 * Call with buffer NULL to get the size in *out_size; the size changes as buffers fill.
 * timar_set_state checks the whole blob before it changes anything (size, header, bundle,
 * settings, a valid ring state, finite cache/tokens and buffers) and applies all of it or
 * nothing; a blob of other settings is refused with TIMAR_ERR_STATE naming the setting. */
TIMAR_API timar_status timar_get_state(const timar_session* session, void* buffer,
                                       size_t capacity, size_t* out_size);
TIMAR_API timar_status timar_set_state(timar_session* session, const void* buffer, size_t size);

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
