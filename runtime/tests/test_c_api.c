/* Tests of the C ABI, in plain C (so the header is checked as C too).
 *
 *   timar_test_c BUNDLE_DIR [BAD_HASH_BUNDLE_DIR [OTHER_KIND_BUNDLE_DIR]]
 *
 * Known answers of the portable generator, bad input through every entry point (error code,
 * a message that names the argument, and the session left exactly as it was: NULLs, lengths,
 * NaN, values beyond TIMAR_AUDIO_LIMIT / TIMAR_MOTION_LIMIT, sizes that overflow, options out
 * of range), state blobs (settings, corruption, all or nothing), reset, feed == step, flush of
 * several buffered turns, all of these also with the output smoothing on (its state is reset,
 * carried in blobs and rolled back with a failed call); one model shared by many sessions: turns
 * batched across sessions equal each session alone, one session's failure stays its own, accept
 * runs no inference, the model's worker, and destroying the model before its sessions. BUNDLE_DIR may be a cached or a window_recompute bundle; with a bundle
 * of the other attention kind, a state blob of one kind must be refused by the other, and only
 * the window bundle refuses feedback history and TensorRT. Ends with "N passed, N failed".
 * Run under AddressSanitizer in CI. */
#define _POSIX_C_SOURCE 200112L /* setenv, nanosleep */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "timar.h"

static int g_pass = 0, g_fail = 0;

#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (cond) {                                               \
      ++g_pass;                                               \
    } else {                                                  \
      ++g_fail;                                               \
      printf("FAIL %s:%d: ", __FILE__, __LINE__);             \
      printf(__VA_ARGS__);                                    \
      printf("\n");                                           \
    }                                                         \
  } while (0)

/* A call must fail with `want` and a last-error message containing `needle`. */
static void expect_error(timar_status got, timar_status want, const char* needle, const char* what) {
  const char* msg = timar_last_error();
  CHECK(got == want, "%s: status %d (%s), expected %d; message: %s", what, (int)got, timar_status_string(got),
        (int)want, msg);
  CHECK(msg && strstr(msg, needle) != NULL, "%s: message '%s' does not mention '%s'", what, msg ? msg : "(null)",
        needle);
}

/* Deterministic inputs: a small LCG, audio in [-0.3, 0.3], motion in [-0.5, 0.5]. */
static unsigned int g_lcg = 12345u;
static float frand(float scale) {
  g_lcg = g_lcg * 1664525u + 1013904223u;
  return scale * (2.0f * (float)(g_lcg >> 8) / 16777216.0f - 1.0f);
}

/* The tests' custom output smoothing, on a timar_options or timar_session_options. */
#define SET_TEST_SMOOTHING(o)                                                                          \
  ((o).smoothing = TIMAR_SMOOTHING_CUSTOM, (o).smoothing_expression = 0.12, (o).smoothing_jaw = 0.04, \
   (o).smoothing_neck = 0.3)

static float max_abs_diff(const float* a, const float* b, size_t n) {
  float m = 0.0f;
  size_t i;
  for (i = 0; i < n; ++i) {
    float d = fabsf(a[i] - b[i]);
    if (!(d <= m)) m = d; /* NaN propagates as a failure */
  }
  return m;
}

static void test_generator(void) {
  /* Random123 known answers for Philox4x32-10. */
  const uint32_t ctr[3][4] = {{0, 0, 0, 0}, {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                              {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}};
  const uint32_t key[3][2] = {{0, 0}, {0xffffffffu, 0xffffffffu}, {0xa4093822u, 0x299f31d0u}};
  const uint32_t want[3][4] = {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
                               {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
                               {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}};
  int v, i;
  for (v = 0; v < 3; ++v) {
    uint32_t out[4];
    timar_philox4x32_10(ctr[v], key[v], out);
    for (i = 0; i < 4; ++i) CHECK(out[i] == want[v][i], "philox vector %d word %d: %08x != %08x", v, i, out[i], want[v][i]);
  }
  /* First normals of the Python PhiloxNormal (timar_sdk.runtime.rng), bit for bit. */
  {
    const float py0[8] = {0x1.fb7666p-1f, -0x1.d96d62p-1f, -0x1.3c374p-1f, -0x1.eda35ep-2f,
                          -0x1.3aa6aep-3f, 0x1.7254e0p-3f, 0x1.a9d930p-1f, 0x1.945b4cp-3f};
    /* seed 0x0123456789abcdef at counter 5 * 2^64 + (2^64 - 1): key high word and carry. */
    const float py1[6] = {0x1.3a8e22p-2f, -0x1.76717cp-3f, 0x1.bee83ap-5f, -0x1.866902p+0f, -0x1.ef78e4p+0f,
                          0x1.1a1084p+0f};
    float got[8];
    CHECK(timar_philox_normals(0, 0, 0, got, 8) == TIMAR_OK, "philox_normals seed 0");
    for (i = 0; i < 8; ++i) CHECK(got[i] == py0[i], "normal %d of seed 0: %a != %a", i, got[i], py0[i]);
    CHECK(timar_philox_normals(0x0123456789abcdefull, 0xffffffffffffffffull, 5, got, 6) == TIMAR_OK, "normals 2");
    for (i = 0; i < 6; ++i) CHECK(got[i] == py1[i], "normal %d of seed 0x0123456789abcdef: %a != %a", i, got[i], py1[i]);
    expect_error(timar_philox_normals(0, 0, 0, NULL, 4), TIMAR_ERR_NULL_POINTER, "out", "philox_normals NULL");
  }
}

static void test_library(void) {
  timar_options o;
  CHECK(timar_abi_version() == TIMAR_ABI_VERSION, "abi version %d", timar_abi_version());
  CHECK(strlen(timar_version()) > 0, "version string");
  CHECK(strstr(timar_build_info(), "onnxruntime") != NULL, "build info: %s", timar_build_info());
  timar_options_init(&o);
  CHECK(o.struct_size == sizeof(timar_options) && isnan(o.cfg) && o.verify_hashes == 1 && o.context_turns == -1 &&
            o.smoothing == TIMAR_SMOOTHING_DEFAULT && o.smoothing_expression == 0.0 && o.smoothing_jaw == 0.0 &&
            o.smoothing_neck == 0.0,
        "options_init defaults");
  {
    int16_t pcm[3] = {-32768, 0, 16384};
    float f[3];
    CHECK(timar_pcm16_to_float(pcm, 3, f) == TIMAR_OK && f[0] == -1.0f && f[1] == 0.0f && f[2] == 0.5f, "pcm16");
  }
}

static void test_create_errors(const char* bundle, const char* bad_bundle) {
  timar_session* s = (timar_session*)0x1;
  timar_options o;
  expect_error(timar_session_create(NULL, NULL, &s), TIMAR_ERR_NULL_POINTER, "bundle_dir", "create NULL dir");
  CHECK(s == NULL, "create failure sets *out_session to NULL");
  expect_error(timar_session_create(bundle, NULL, NULL), TIMAR_ERR_NULL_POINTER, "out_session", "create NULL out");
  expect_error(timar_session_create("/nonexistent/bundle", NULL, &s), TIMAR_ERR_BUNDLE, "manifest.json", "no bundle");
  if (bad_bundle) {
    expect_error(timar_session_create(bad_bundle, NULL, &s), TIMAR_ERR_BUNDLE, "sha256", "bad hash bundle");
    CHECK(s == NULL, "no session from a bad bundle");
  }
  timar_options_init(&o);
  o.struct_size = 8;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "struct_size", "struct_size");
  timar_options_init(&o);
  o.steps = 5000;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "steps", "steps");
  timar_options_init(&o);
  o.temperature = -1.0;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "temperature", "temperature");
  timar_options_init(&o);
  o.steps = 1000000000u;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "got 1000000000", "steps 1e9");
  timar_options_init(&o);
  o.temperature = INFINITY;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "temperature", "temperature inf");
  timar_options_init(&o);
  o.temperature = 10.5;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "temperature: expected a number in 0..10",
               "temperature above 10");
  timar_options_init(&o);
  o.cfg = INFINITY;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "cfg", "cfg");
  timar_options_init(&o);
  o.cfg = 20.5;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "cfg: expected a number in 0..20",
               "cfg above 20");
  timar_options_init(&o);
  o.cfg = -1.0;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "cfg", "negative cfg");
  timar_options_init(&o);
  o.threads = 10000;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "CPUs available", "threads 10000");
  CHECK(s == NULL, "no session with 10000 threads");
  timar_options_init(&o);
  o.threads = -1;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "threads", "threads -1");
  timar_options_init(&o);
  o.device_id = -1;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "device_id", "device_id -1");
  timar_options_init(&o);
  o.history = 7;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "history", "history");
  timar_options_init(&o);
  o.context_turns = 99;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "context_turns", "context_turns");
  timar_options_init(&o);
  o.smoothing = 3;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "smoothing: expected",
               "smoothing mode 3");
  timar_options_init(&o);
  SET_TEST_SMOOTHING(o);
  o.smoothing_jaw = NAN;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "smoothing_jaw: expected",
               "smoothing NaN");
  SET_TEST_SMOOTHING(o);
  o.smoothing_expression = -0.1;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "smoothing_expression: expected",
               "smoothing negative");
  SET_TEST_SMOOTHING(o);
  o.smoothing_neck = 2.5;
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT,
               "smoothing_neck: expected a time constant in seconds in 0..2", "smoothing 2.5 s");
  timar_options_init(&o);
  o.smoothing_jaw = 0.1; /* without TIMAR_SMOOTHING_CUSTOM it would be ignored: refused instead */
  expect_error(timar_session_create(bundle, &o, &s), TIMAR_ERR_INVALID_ARGUMENT, "TIMAR_SMOOTHING_CUSTOM",
               "smoothing time constant without the custom mode");
  CHECK(strstr(timar_last_error(), "smoothing_jaw") != NULL, "names smoothing_jaw: %s", timar_last_error());
  CHECK(s == NULL, "no session with bad smoothing");
  timar_session_destroy(NULL); /* allowed */
}

enum { TURNS = 3 };

/* A session of seed 7; `smoothed`: with the tests' custom output smoothing. */
static timar_session* open_session_with(const char* bundle, double cfg, int smoothed) {
  timar_options o;
  timar_session* s = NULL;
  timar_status st;
  timar_options_init(&o);
  o.seed = 7;
  o.cfg = cfg;
  o.threads = 1;
  o.backend = TIMAR_BACKEND_ORT_CPU;
  if (smoothed)
    SET_TEST_SMOOTHING(o);
  else
    o.smoothing = TIMAR_SMOOTHING_OFF; /* the exact model output, whatever the bundle's defaults */
  st = timar_session_create(bundle, &o, &s);
  CHECK(st == TIMAR_OK && s, "create: %s", timar_last_error());
  return s;
}

static timar_session* open_session(const char* bundle, double cfg) { return open_session_with(bundle, cfg, 0); }

static void test_session(const char* bundle, double cfg, int smoothed) {
  timar_info info;
  timar_session *ref, *s;
  size_t S, F, M, i, n, state_size;
  float *ua, *aa, *um, *want, *got, *tmp;
  void* state;
  int t;

  ref = open_session_with(bundle, cfg, smoothed);
  s = open_session_with(bundle, cfg, smoothed);
  if (!ref || !s) return;
  info.struct_size = sizeof info;
  CHECK(timar_session_info(s, &info) == TIMAR_OK, "info: %s", timar_last_error());
  CHECK(info.frames_per_turn == 25 && info.samples_per_turn == 16000 && info.fps == 25 && info.sample_rate == 16000 &&
            info.motion_dim == TIMAR_MOTION_DIM && info.backend == TIMAR_BACKEND_ORT_CPU && info.cfg == cfg &&
            info.jaw_begin == 50 && info.neck_end == 56,
        "info fields");
  CHECK(smoothed ? info.smoothing_expression == 0.12 && info.smoothing_jaw == 0.04 && info.smoothing_neck == 0.3
                 : info.smoothing_expression == 0.0 && info.smoothing_jaw == 0.0 && info.smoothing_neck == 0.0,
        "info: smoothing %g %g %g", info.smoothing_expression, info.smoothing_jaw, info.smoothing_neck);
  CHECK(strcmp(timar_session_backend_name(s), "onnxruntime-cpu") == 0, "backend name %s", timar_session_backend_name(s));
  info.struct_size = 4;
  expect_error(timar_session_info(s, &info), TIMAR_ERR_INVALID_ARGUMENT, "struct_size", "info struct_size");

  S = (size_t)16000;
  F = 25;
  M = F * TIMAR_MOTION_DIM;
  ua = malloc(sizeof(float) * S * TURNS);
  aa = malloc(sizeof(float) * S * TURNS);
  um = malloc(sizeof(float) * M * TURNS);
  want = malloc(sizeof(float) * M * TURNS);
  got = malloc(sizeof(float) * M * TURNS);
  tmp = malloc(sizeof(float) * M * 2);
  for (i = 0; i < S * TURNS; ++i) ua[i] = frand(0.3f);
  for (i = 0; i < S * TURNS; ++i) aa[i] = frand(0.3f);
  for (i = 0; i < M * TURNS; ++i) um[i] = frand(0.5f);

  /* Reference: three clean turns (the second without user motion). */
  for (t = 0; t < TURNS; ++t) {
    const float* m = t == 1 ? NULL : um + M * t;
    CHECK(timar_step(ref, ua + S * t, S, m, m ? F : 0, aa + S * t, S, want + M * t, F) == TIMAR_OK, "ref step %d: %s",
          t, timar_last_error());
  }

  /* Same conversation with every kind of bad call in between: each fails and changes nothing. */
  CHECK(timar_step(s, ua, S, um, F, aa, S, got, F) == TIMAR_OK, "step 0");
  expect_error(timar_step(NULL, ua, S, NULL, 0, aa, S, got, F), TIMAR_ERR_NULL_POINTER, "session", "NULL session");
  expect_error(timar_step(s, NULL, S, NULL, 0, aa + S, S, got, F), TIMAR_ERR_NULL_POINTER, "user_audio", "NULL audio");
  expect_error(timar_step(s, ua + S, S, NULL, 0, NULL, 0, got, F), TIMAR_ERR_NULL_POINTER, "agent_audio",
               "NULL agent audio");
  expect_error(timar_step(s, ua + S, S - 1, NULL, 0, aa + S, S, got, F), TIMAR_ERR_WRONG_LENGTH, "user_audio",
               "short audio");
  expect_error(timar_step(s, ua + S, S, NULL, 0, aa + S, S + 1, got, F), TIMAR_ERR_WRONG_LENGTH, "agent_audio",
               "long audio");
  expect_error(timar_step(s, ua + S, S, um, F - 1, aa + S, S, got, F), TIMAR_ERR_WRONG_LENGTH, "user_motion",
               "short motion");
  expect_error(timar_step(s, ua + S, S, NULL, F, aa + S, S, got, F), TIMAR_ERR_NULL_POINTER, "user_motion",
               "NULL motion with frames");
  expect_error(timar_step(s, ua + S, S, NULL, 0, aa + S, S, NULL, F), TIMAR_ERR_NULL_POINTER, "out_motion", "NULL out");
  expect_error(timar_step(s, ua + S, S, NULL, 0, aa + S, S, got, F - 1), TIMAR_ERR_BUFFER_TOO_SMALL, "out_motion",
               "small out");
  {
    float save = aa[S + 100];
    aa[S + 100] = NAN;
    expect_error(timar_step(s, ua + S, S, NULL, 0, aa + S, S, got, F), TIMAR_ERR_NOT_FINITE, "agent_audio", "NaN audio");
    aa[S + 100] = save;
    save = um[7];
    um[7] = INFINITY;
    expect_error(timar_step(s, ua + S, S, um, F, aa + S, S, got, F), TIMAR_ERR_NOT_FINITE, "user_motion", "Inf motion");
    um[7] = save;
  }
  {
    /* Finite but beyond what a microphone or a tracker sends: refused, naming the bound and the
       largest value (one such sample used to turn every later turn into NaN). */
    float save = ua[S + 100];
    size_t frames = 0;
    ua[S + 100] = 1e20f;
    expect_error(timar_step(s, ua + S, S, NULL, 0, aa + S, S, got, F), TIMAR_ERR_INVALID_ARGUMENT, "TIMAR_AUDIO_LIMIT",
                 "audio 1e20");
    CHECK(strstr(timar_last_error(), "user_audio") && strstr(timar_last_error(), "1e+20") &&
              strstr(timar_last_error(), "sample 100"),
          "audio bound message: %s", timar_last_error());
    ua[S + 100] = 4.5f;
    expect_error(timar_feed(s, ua + S, S, NULL, 0, aa + S, S, got, F, &frames), TIMAR_ERR_INVALID_ARGUMENT,
                 "user_audio", "feed audio 4.5");
    ua[S + 100] = save;
    save = um[9];
    um[9] = 1e37f;
    expect_error(timar_step(s, ua + S, S, um, F, aa + S, S, got, F), TIMAR_ERR_INVALID_ARGUMENT, "TIMAR_MOTION_LIMIT",
                 "motion 1e37");
    CHECK(strstr(timar_last_error(), "user_motion") && strstr(timar_last_error(), "channel 9"), "motion bound message: %s",
          timar_last_error());
    um[9] = -20.5f;
    expect_error(timar_feed(s, NULL, 0, um, 1, NULL, 0, got, F, &frames), TIMAR_ERR_INVALID_ARGUMENT, "user_motion",
                 "feed motion -20.5");
    um[9] = save;
    /* Frame counts whose float count overflows size_t: refused before anything is read. */
    expect_error(timar_feed(s, NULL, 0, um, SIZE_MAX / TIMAR_MOTION_DIM + 1, NULL, 0, got, F, &frames),
                 TIMAR_ERR_INVALID_ARGUMENT, "overflow", "feed motion frames overflow");
    expect_error(timar_feed(s, NULL, 0, um, SIZE_MAX / 2, NULL, 0, got, F, &frames), TIMAR_ERR_INVALID_ARGUMENT,
                 "overflow", "feed motion frames SIZE_MAX/2");
    expect_error(timar_step(s, ua + S, S, um, SIZE_MAX / TIMAR_MOTION_DIM + 1, aa + S, S, got, F),
                 TIMAR_ERR_WRONG_LENGTH, "user_motion", "step motion frames overflow");
  }
  {
    size_t frames = 99;
    float nan_chunk[4] = {0.0f, NAN, 0.0f, 0.0f};
    expect_error(timar_feed(s, NULL, 10, NULL, 0, NULL, 0, got, F, &frames), TIMAR_ERR_NULL_POINTER, "user_audio",
                 "feed NULL audio");
    expect_error(timar_feed(s, nan_chunk, 4, NULL, 0, NULL, 0, got, F, &frames), TIMAR_ERR_NOT_FINITE, "user_audio",
                 "feed NaN");
    /* a whole turn would complete, but there is no room for it: nothing is consumed */
    expect_error(timar_feed(s, ua + S, S, NULL, 0, aa + S, S, got, F - 1, &frames), TIMAR_ERR_BUFFER_TOO_SMALL,
                 "out_motion", "feed small out");
    CHECK(frames == F, "feed reports the frames it needs: %zu", frames);
    expect_error(timar_feed(s, ua + S, 10, NULL, 0, NULL, 0, got, F, NULL), TIMAR_ERR_NULL_POINTER, "out_frames",
                 "feed NULL out_frames");
    CHECK(timar_feed_frames(s, S, 0, S, &frames) == TIMAR_OK && frames == F, "feed_frames %zu", frames);
    expect_error(timar_set_state(s, "garbage", 7), TIMAR_ERR_STATE, "state", "garbage state");
    expect_error(timar_set_state(s, NULL, 7), TIMAR_ERR_NULL_POINTER, "buffer", "NULL state");
  }
  for (t = 1; t < TURNS; ++t) {
    const float* m = t == 1 ? NULL : um + M * t;
    CHECK(timar_step(s, ua + S * t, S, m, m ? F : 0, aa + S * t, S, got + M * t, F) == TIMAR_OK, "step %d: %s", t,
          timar_last_error());
  }
  CHECK(max_abs_diff(got + M, want + M, M * (TURNS - 1)) == 0.0f,
        "after bad calls the turns equal a clean run (max diff %g)", max_abs_diff(got + M, want + M, M * (TURNS - 1)));
  info.struct_size = sizeof info;
  CHECK(timar_session_info(s, &info) == TIMAR_OK && info.turns == TURNS, "turn count %llu",
        (unsigned long long)info.turns);

  /* State: snapshot after turn 0, run turn 1 twice from it. */
  CHECK(timar_session_reset(s) == TIMAR_OK, "reset");
  CHECK(timar_step(s, ua, S, um, F, aa, S, got, F) == TIMAR_OK, "step after reset");
  CHECK(max_abs_diff(got, want, M) == 0.0f, "reset: turn 0 again equals the first run");
  CHECK(timar_get_state(s, NULL, 0, &state_size) == TIMAR_OK && state_size > 0, "state size");
  state = malloc(state_size);
  n = 0;
  expect_error(timar_get_state(s, state, state_size - 1, &n), TIMAR_ERR_BUFFER_TOO_SMALL, "buffer", "small state");
  CHECK(timar_get_state(s, state, state_size, &n) == TIMAR_OK && n == state_size, "get_state");
  CHECK(timar_step(s, ua + S, S, NULL, 0, aa + S, S, tmp, F) == TIMAR_OK, "turn 1");
  CHECK(timar_step(s, ua + 2 * S, S, um + 2 * M, F, aa + 2 * S, S, tmp + M, F) == TIMAR_OK, "turn 2");
  CHECK(max_abs_diff(tmp, want + M, 2 * M) == 0.0f, "turns 1-2 after reset equal the reference");
  CHECK(timar_set_state(s, state, state_size) == TIMAR_OK, "set_state: %s", timar_last_error());
  CHECK(timar_step(s, ua + S, S, NULL, 0, aa + S, S, got, F) == TIMAR_OK, "turn 1 from state");
  CHECK(max_abs_diff(got, want + M, M) == 0.0f, "state restore: turn 1 again equals the reference");
  expect_error(timar_set_state(s, state, state_size - 4), TIMAR_ERR_STATE, "state", "truncated state");
  free(state);

  /* feed in pieces (the 2nd turn untracked is not possible once motion was fed, so a fresh
     session feeds turn 0 with motion, the rest via step) and flush of nothing. */
  {
    timar_session* f = open_session_with(bundle, cfg, smoothed);
    size_t pos = 0, frames = 0, total = 0, mpos = 0;
    while (pos < S) {
      size_t chunk = pos + 3000 <= S ? 3000 : S - pos;
      size_t mchunk = mpos + 5 <= F ? 5 : F - mpos;
      CHECK(timar_feed(f, ua + pos, chunk, mchunk ? um + mpos * TIMAR_MOTION_DIM : NULL, mchunk, aa + pos, chunk,
                       got + total * TIMAR_MOTION_DIM, F, &frames) == TIMAR_OK,
            "feed: %s", timar_last_error());
      pos += chunk;
      mpos += mchunk;
      total += frames;
    }
    CHECK(total == F, "feed produced %zu frames", total);
    CHECK(max_abs_diff(got, want, M) == 0.0f, "feed in pieces equals step (max diff %g)", max_abs_diff(got, want, M));
    CHECK(timar_flush(f, got, F, &frames) == TIMAR_OK && frames == 0, "flush of nothing");
    /* a trailing half turn: flush returns its frames */
    CHECK(timar_feed(f, ua + S, S / 2, um + M, F / 2, aa + S, S / 2, got, F, &frames) == TIMAR_OK && frames == 0,
          "feed half");
    expect_error(timar_flush(f, got, 5, &frames), TIMAR_ERR_BUFFER_TOO_SMALL, "out_motion", "flush small out");
    CHECK(timar_flush(f, got, F, &frames) == TIMAR_OK && frames == F / 2, "flush frames %zu", frames);
    timar_session_destroy(f);
  }
  timar_session_destroy(ref);
  timar_session_destroy(s);
  free(ua);
  free(aa);
  free(um);
  free(want);
  free(got);
  free(tmp);
}

/* A backend failure in the second of two turns completed by one feed call: the first turn's
 * commit is rolled back (the output smoothing's state too), nothing is buffered, and the same
 * feed afterwards gives a clean run. */
static void test_feed_rollback(const char* bundle) {
  const size_t S = 16000, F = 25, M = F * TIMAR_MOTION_DIM;
  timar_session *ref, *s;
  float *ua = malloc(sizeof(float) * 2 * S), *aa = malloc(sizeof(float) * 2 * S);
  float *want = malloc(sizeof(float) * 2 * M), *got = malloc(sizeof(float) * 2 * M);
  size_t i, frames = 0;
  timar_info info;
  for (i = 0; i < 2 * S; ++i) ua[i] = frand(0.3f);
  for (i = 0; i < 2 * S; ++i) aa[i] = frand(0.3f);
  ref = open_session_with(bundle, 1.0, 1);
  CHECK(timar_step(ref, ua, S, NULL, 0, aa, S, want, F) == TIMAR_OK, "rollback ref 0");
  CHECK(timar_step(ref, ua + S, S, NULL, 0, aa + S, S, want + M, F) == TIMAR_OK, "rollback ref 1");
  setenv("TIMAR_TEST_FAIL_AFTER_TURNS", "1", 1);
  s = open_session_with(bundle, 1.0, 1);
  unsetenv("TIMAR_TEST_FAIL_AFTER_TURNS");
  expect_error(timar_feed(s, ua, 2 * S, NULL, 0, aa, 2 * S, got, 2 * F, &frames), TIMAR_ERR_BACKEND, "injected",
               "feed with a failing second turn");
  info.struct_size = sizeof info;
  CHECK(timar_session_info(s, &info) == TIMAR_OK && info.turns == 0, "rolled back to 0 turns (%llu)",
        (unsigned long long)info.turns);
  CHECK(timar_feed_frames(s, 0, 0, 0, &frames) == TIMAR_OK && frames == 0, "nothing buffered after the failure");
  CHECK(timar_feed(s, ua, 2 * S, NULL, 0, aa, 2 * S, got, 2 * F, &frames) == TIMAR_OK && frames == 2 * F,
        "feed again: %s", timar_last_error());
  CHECK(max_abs_diff(got, want, 2 * M) == 0.0f, "after the rollback the turns equal a clean run (max diff %g)",
        max_abs_diff(got, want, 2 * M));
  timar_session_destroy(ref);
  timar_session_destroy(s);
  free(ua);
  free(aa);
  free(want);
  free(got);
}

/* One state blob (after one turn) of a session on `bundle`. */
static void* one_turn_state(const char* bundle, size_t* size) {
  timar_session* s = open_session(bundle, 1.0);
  float *ua = calloc(16000, sizeof(float)), *aa = calloc(16000, sizeof(float)), *out = malloc(sizeof(float) * 25 * 56);
  void* blob = NULL;
  size_t i;
  for (i = 0; i < 16000; ++i) ua[i] = frand(0.3f), aa[i] = frand(0.3f);
  if (s && timar_step(s, ua, 16000, NULL, 0, aa, 16000, out, 25) == TIMAR_OK &&
      timar_get_state(s, NULL, 0, size) == TIMAR_OK) {
    blob = malloc(*size);
    if (timar_get_state(s, blob, *size, size) != TIMAR_OK) {
      free(blob);
      blob = NULL;
    }
  }
  CHECK(blob != NULL, "state of a session on %s: %s", bundle, timar_last_error());
  timar_session_destroy(s);
  free(ua);
  free(aa);
  free(out);
  return blob;
}

/* Does `bundle` refuse feedback history as a window_recompute bundle? (Cached ones take it.) */
static int is_window_bundle(const char* bundle) {
  timar_options o;
  timar_session* s = NULL;
  timar_status st;
  timar_options_init(&o);
  o.history = TIMAR_HISTORY_FEEDBACK;
  o.backend = TIMAR_BACKEND_ORT_CPU;
  st = timar_session_create(bundle, &o, &s);
  timar_session_destroy(s);
  if (st == TIMAR_OK) return 0;
  expect_error(st, TIMAR_ERR_INVALID_ARGUMENT, "window_recompute", "feedback history on a window bundle");
  return 1;
}

/* A cached and a window_recompute bundle: each kind's state blob is refused by the other. */
static void test_state_kinds(const char* bundle, const char* other) {
  const int window = is_window_bundle(bundle), other_window = is_window_bundle(other);
  const char* win = window ? bundle : other;
  size_t n_a = 0, n_b = 0;
  void *a, *b;
  timar_session *sa, *sb;
  timar_options o;
  timar_session* s = NULL;
  CHECK(window != other_window, "expected one cached and one window_recompute bundle (%s, %s)", bundle, other);
  if (window == other_window) return;
  timar_options_init(&o);
  o.backend = TIMAR_BACKEND_TENSORRT;
  expect_error(timar_session_create(win, &o, &s), TIMAR_ERR_UNSUPPORTED, "cached bundles only",
               "TensorRT on a window bundle");
  a = one_turn_state(bundle, &n_a);
  b = one_turn_state(other, &n_b);
  sa = open_session(bundle, 1.0);
  sb = open_session(other, 1.0);
  if (a && b && sa && sb) {
    expect_error(timar_set_state(sb, a, n_a), TIMAR_ERR_STATE, "window_recompute", "state of the other kind (1)");
    expect_error(timar_set_state(sa, b, n_b), TIMAR_ERR_STATE, "window_recompute", "state of the other kind (2)");
    CHECK(timar_set_state(sa, a, n_a) == TIMAR_OK, "state of the same kind: %s", timar_last_error());
  }
  timar_session_destroy(sa);
  timar_session_destroy(sb);
  free(a);
  free(b);
}

/* Blob layout (session.cpp): header of 136 bytes (magic, format, bundle id, settings), then for
 * cached sessions u32 slots + i32 ages[slots], for window sessions 64 bytes (window sizes and
 * audio statistics); then the stream part: u64 counter_lo, counter_hi, turns, u32 tracked,
 * f32 last user motion frame[56], u32 smoothed (the output smoothing has a last frame), ... */
enum { STATE_HEADER = 136, STREAM_SMOOTHED = 8 * 3 + 4 + 4 * TIMAR_MOTION_DIM };

static size_t stream_offset(const void* blob, int window) {
  uint32_t slots;
  if (window) return STATE_HEADER + 16 + 48;
  memcpy(&slots, (const char*)blob + STATE_HEADER, 4);
  return STATE_HEADER + 4 + 4 * (size_t)slots;
}

static void* take_state(timar_session* s, size_t* size) {
  void* blob = NULL;
  if (timar_get_state(s, NULL, 0, size) == TIMAR_OK && (blob = malloc(*size)) != NULL &&
      timar_get_state(s, blob, *size, size) != TIMAR_OK) {
    free(blob);
    blob = NULL;
  }
  CHECK(blob != NULL, "get_state: %s", timar_last_error());
  return blob;
}

/* `blob` as state format 1 (older runtimes, before smoothing) wrote it: without the smoothing time
 * constants (the header's last 24 bytes) and the smoothing state in the stream part. */
static char* as_format_1(const void* blob, size_t size, int window, size_t* out_size) {
  const char* b = blob;
  const size_t cut = stream_offset(blob, window) + STREAM_SMOOTHED, cut_n = 4 + 4 * TIMAR_MOTION_DIM;
  const uint32_t format = 1;
  char* old = malloc(size - 24 - cut_n);
  memcpy(old, b, STATE_HEADER - 24);
  memcpy(old + STATE_HEADER - 24, b + STATE_HEADER, cut - STATE_HEADER);
  memcpy(old + cut - 24, b + cut + cut_n, size - cut - cut_n);
  memcpy(old + 8, &format, 4);
  *out_size = size - 24 - cut_n;
  return old;
}

/* A blob with one change at `offset` (`n` bytes from `value`) must be refused with a message
 * containing `needle`, and change nothing: the session's next turn equals `want`. */
static void expect_refused(timar_session* s, const void* blob, size_t size, size_t offset, const void* value, size_t n,
                           const char* needle, const char* what, const float* ua, const float* aa, const float* want) {
  char* bad = malloc(size);
  float got[25 * TIMAR_MOTION_DIM];
  memcpy(bad, blob, size);
  if (value) memcpy(bad + offset, value, n);
  expect_error(timar_set_state(s, bad, size), TIMAR_ERR_STATE, needle, what);
  free(bad);
  if (want) {
    CHECK(timar_step(s, ua, 16000, NULL, 0, aa, 16000, got, 25) == TIMAR_OK, "%s: step after: %s", what,
          timar_last_error());
    CHECK(max_abs_diff(got, want, 25 * TIMAR_MOTION_DIM) == 0.0f, "%s: the refused blob changed the session", what);
  }
}

/* set_state refuses blobs of other settings (naming the setting) and corrupt blobs, after
 * checking all of the blob, so that nothing is applied. */
static void test_state_checks(const char* bundle, int window) {
  const size_t S = 16000, F = 25, M = F * TIMAR_MOTION_DIM;
  float *ua = malloc(sizeof(float) * 2 * S), *aa = malloc(sizeof(float) * 2 * S), *out = malloc(sizeof(float) * 2 * M);
  float want1[25 * TIMAR_MOTION_DIM];
  timar_session *a = open_session(bundle, 1.0), *b = NULL;
  void *blob1 = NULL, *blob2 = NULL;
  size_t n1 = 0, n2 = 0, i;
  timar_options o;
  for (i = 0; i < 2 * S; ++i) ua[i] = frand(0.3f), aa[i] = frand(0.3f);
  if (!a) return;
  /* blob1 after one turn; want1: the second turn from there; blob2 after two turns */
  CHECK(timar_step(a, ua, S, NULL, 0, aa, S, out, F) == TIMAR_OK, "state checks: turn 0");
  blob1 = take_state(a, &n1);
  CHECK(timar_step(a, ua + S, S, NULL, 0, aa + S, S, want1, F) == TIMAR_OK, "state checks: turn 1");
  blob2 = take_state(a, &n2);
  if (!blob1 || !blob2) goto done;

  /* Other settings: each refused, naming the setting. */
  {
    struct { const char* name; int what; } cases[] = {{"seed", 0}, {"steps", 1}, {"temperature", 2}, {"cfg", 3},
                                                      {"history", 4}, {"context_turns", 5}, {"smoothing", 6}};
    int c;
    for (c = 0; c < 7; ++c) {
      timar_session* other = NULL;
      timar_options_init(&o);
      o.seed = 7;
      o.cfg = 1.0;
      o.threads = 1;
      o.backend = TIMAR_BACKEND_ORT_CPU;
      switch (cases[c].what) {
        case 0: o.seed = 8; break;
        case 1: o.steps = 3; break;
        case 2: o.temperature = 0.5; break;
        case 3: o.cfg = 1.5; break;
        case 4: o.history = TIMAR_HISTORY_FEEDBACK; break;
        case 5: o.context_turns = 2; break;
        case 6: SET_TEST_SMOOTHING(o); break;
      }
      if (cases[c].what == 4 && window) continue; /* window bundles run masked history only */
      CHECK(timar_session_create(bundle, &o, &other) == TIMAR_OK, "create (%s): %s", cases[c].name, timar_last_error());
      if (!other) continue;
      expect_error(timar_set_state(other, blob1, n1), TIMAR_ERR_STATE, cases[c].name, cases[c].name);
      timar_session_destroy(other);
    }
  }

  /* A blob of state format 1 loads as one taken without smoothing; a smoothing session refuses it. */
  {
    size_t n_old = 0;
    char* old = as_format_1(blob1, n1, window, &n_old);
    timar_session* smoothing = open_session_with(bundle, 1.0, 1);
    b = open_session(bundle, 1.0);
    CHECK(b && timar_set_state(b, old, n_old) == TIMAR_OK, "a state format 1 blob loads: %s", timar_last_error());
    CHECK(b && timar_step(b, ua + S, S, NULL, 0, aa + S, S, out, F) == TIMAR_OK &&
              max_abs_diff(out, want1, M) == 0.0f,
          "the next turn after a format 1 blob equals the one after the same state in format 2");
    if (smoothing)
      expect_error(timar_set_state(smoothing, old, n_old), TIMAR_ERR_STATE, "smoothing", "format 1, smoothed");
    timar_session_destroy(smoothing);
    timar_session_destroy(b);
    free(old);
  }

  /* Corrupt blobs, each refused while the session stays where blob1 put it. */
  b = open_session(bundle, 1.0);
  if (!b) goto done;
  CHECK(timar_set_state(b, blob1, n1) == TIMAR_OK, "set_state blob1: %s", timar_last_error());
  {
    const float nan = NAN, small = 0.25f;
    const size_t stream = stream_offset(blob2, window);
    const uint64_t counter = 12345;
    char* longer = calloc(n2 + 4, 1);
    /* the cache / tokens: a NaN in the last float */
    expect_refused(b, blob2, n2, n2 - 4, &nan, 4, "NaN", "NaN in the cache", ua + S, aa + S, want1);
    CHECK(timar_set_state(b, blob1, n1) == TIMAR_OK, "back to blob1");
    memcpy(longer, blob2, n2);
    memcpy(longer + n2 - 4, &small, 4); /* a finite change there is a valid blob */
    CHECK(timar_set_state(b, longer, n2) == TIMAR_OK, "a finite cache value is accepted: %s", timar_last_error());
    CHECK(timar_set_state(b, blob1, n1) == TIMAR_OK, "back to blob1");
    expect_refused(b, blob2, n2, stream, &counter, 8, "generator counter", "counter", ua + S, aa + S, want1);
    CHECK(timar_set_state(b, blob1, n1) == TIMAR_OK, "back to blob1");
    {
      const uint32_t smoothed = 1; /* a filter state in a session without smoothing */
      expect_refused(b, blob2, n2, stream + STREAM_SMOOTHED, &smoothed, 4, "smoothing", "smoothing state", ua + S,
                     aa + S, want1);
    }
    CHECK(timar_set_state(b, blob1, n1) == TIMAR_OK, "back to blob1");
    {
      const uint32_t newer = 3;
      expect_refused(b, blob2, n2, 8, &newer, 4, "another timar runtime", "state format 3", ua + S, aa + S, want1);
    }
    CHECK(timar_set_state(b, blob1, n1) == TIMAR_OK, "back to blob1");
    if (!window) {
      const int32_t ages[2] = {3, 3}; /* two slots of the same age */
      expect_refused(b, blob2, n2, STATE_HEADER + 4, ages, 8, "ring ages", "ring ages", ua + S, aa + S, want1);
    } else {
      const uint64_t count = 16000; /* the user's audio statistics of one turn, after two */
      expect_refused(b, blob2, n2, STATE_HEADER + 16, &count, 8, "audio statistics", "audio statistics count", ua + S,
                     aa + S, want1);
    }
    CHECK(timar_set_state(b, blob1, n1) == TIMAR_OK, "back to blob1");
    expect_refused(b, blob2, n2 - 4, 0, NULL, 0, "size", "truncated", ua + S, aa + S, want1);
    CHECK(timar_set_state(b, blob1, n1) == TIMAR_OK, "back to blob1");
    memcpy(longer, blob2, n2);
    expect_refused(b, longer, n2 + 4, 0, NULL, 0, "size", "4 bytes too many", ua + S, aa + S, want1);
    CHECK(timar_set_state(b, blob1, n1) == TIMAR_OK, "back to blob1");
    expect_refused(b, blob2, n2, 20, "0000", 4, "bundle", "another bundle id", ua + S, aa + S, want1);
    free(longer);
  }
done:
  timar_session_destroy(a);
  timar_session_destroy(b);
  free(blob1);
  free(blob2);
  free(ua);
  free(aa);
  free(out);
}

/* flush runs every buffered turn (user motion that lags behind the audio is padded with its
 * last frame, also when none is left) and asks for room for all of them. */
static void test_flush_buffered_turns(const char* bundle) {
  const size_t S = 16000, F = 25, D = TIMAR_MOTION_DIM, M = F * D;
  float *ua = malloc(sizeof(float) * 2 * S), *aa = malloc(sizeof(float) * 2 * S), *um = malloc(sizeof(float) * M);
  float *pad = malloc(sizeof(float) * 2 * M), *want = malloc(sizeof(float) * 2 * M), *got = malloc(sizeof(float) * 2 * M);
  float* half = calloc(2 * S, sizeof(float));
  timar_session *ref = open_session(bundle, 1.0), *f = open_session(bundle, 1.0), *g = open_session(bundle, 1.0);
  size_t i, frames = 0;
  for (i = 0; i < 2 * S; ++i) ua[i] = frand(0.3f), aa[i] = frand(0.3f);
  for (i = 0; i < M; ++i) um[i] = frand(0.5f);
  if (!ref || !f || !g) goto done;

  /* 1. Two turns of audio, half a turn of motion: feed runs nothing, flush runs both turns. */
  for (i = 0; i < 2 * F; ++i) memcpy(pad + i * D, um + (i < F / 2 ? i : F / 2 - 1) * D, sizeof(float) * D);
  CHECK(timar_step(ref, ua, S, pad, F, aa, S, want, F) == TIMAR_OK, "flush ref 0");
  CHECK(timar_step(ref, ua + S, S, pad + M, F, aa + S, S, want + M, F) == TIMAR_OK, "flush ref 1");
  CHECK(timar_feed(f, ua, 2 * S, um, F / 2, aa, 2 * S, got, 2 * F, &frames) == TIMAR_OK && frames == 0,
        "feed with lagging motion: %s (%zu frames)", timar_last_error(), frames);
  expect_error(timar_flush(f, got, F, &frames), TIMAR_ERR_BUFFER_TOO_SMALL, "out_motion", "flush of two turns into one");
  CHECK(frames == 2 * F, "flush reports the frames it needs: %zu", frames);
  CHECK(timar_flush(f, got, 2 * F, &frames) == TIMAR_OK && frames == 2 * F, "flush of two turns: %zu frames, %s", frames,
        timar_last_error());
  CHECK(max_abs_diff(got, want, 2 * M) == 0.0f, "flush of lagging motion equals step with padded motion (max diff %g)",
        max_abs_diff(got, want, 2 * M));

  /* 2. A tracked user with no motion left for the last half turn: its last frame, not "absent". */
  CHECK(timar_session_reset(ref) == TIMAR_OK && timar_session_reset(f) == TIMAR_OK, "reset");
  for (i = 0; i < F; ++i) memcpy(pad + i * D, um + (F - 1) * D, sizeof(float) * D);
  memcpy(half, ua + S, sizeof(float) * S / 2);
  memcpy(half + S, aa + S, sizeof(float) * S / 2);
  CHECK(timar_step(ref, ua, S, um, F, aa, S, want, F) == TIMAR_OK, "flush ref 2");
  CHECK(timar_step(ref, half, S, pad, F, half + S, S, want + M, F) == TIMAR_OK, "flush ref 3");
  CHECK(timar_feed(f, ua, S + S / 2, um, F, aa, S + S / 2, got, F, &frames) == TIMAR_OK && frames == F,
        "feed one turn and a half: %s", timar_last_error());
  CHECK(timar_flush(f, got + M, F, &frames) == TIMAR_OK && frames == F / 2, "flush of the half turn: %zu", frames);
  CHECK(max_abs_diff(got, want, (F + F / 2) * D) == 0.0f,
        "flush pads a tracked user's motion with its last frame (max diff %g)", max_abs_diff(got, want, (F + F / 2) * D));

  /* 3. timar_feed_frames with lengths near SIZE_MAX on top of buffered audio: no wrap-around. */
  CHECK(timar_feed(g, ua, S / 2, NULL, 0, aa, S / 2, got, F, &frames) == TIMAR_OK && frames == 0, "feed half (g)");
  CHECK(timar_feed_frames(g, SIZE_MAX, 0, SIZE_MAX, &frames) == TIMAR_OK && frames >= SIZE_MAX / S * F,
        "feed_frames near SIZE_MAX: %zu", frames);
done:
  timar_session_destroy(ref);
  timar_session_destroy(f);
  timar_session_destroy(g);
  free(ua);
  free(aa);
  free(um);
  free(pad);
  free(want);
  free(got);
  free(half);
}

/* ---- one model, many sessions ------------------------------------------------------------- */
enum { TS = 16000, TF = 25, TM = 25 * TIMAR_MOTION_DIM, HEAD_TURNS = 4 };

/* One conversation's inputs: HEAD_TURNS turns of both audio streams and of user motion. */
typedef struct {
  float *ua, *aa, *um;
} conversation;

static conversation new_conversation(void) {
  conversation c;
  size_t i;
  c.ua = malloc(sizeof(float) * TS * HEAD_TURNS);
  c.aa = malloc(sizeof(float) * TS * HEAD_TURNS);
  c.um = malloc(sizeof(float) * TM * HEAD_TURNS);
  for (i = 0; i < (size_t)TS * HEAD_TURNS; ++i) c.ua[i] = frand(0.3f), c.aa[i] = frand(0.3f);
  for (i = 0; i < (size_t)TM * HEAD_TURNS; ++i) c.um[i] = frand(0.5f);
  return c;
}

static void free_conversation(conversation* c) {
  free(c->ua);
  free(c->aa);
  free(c->um);
}

/* Sessions a test ran side by side (batched and alone), their conversations, then the model. */
static void close_heads(timar_model* m, timar_session** batched, timar_session** alone, conversation* conv, int n) {
  int h;
  for (h = 0; h < n; ++h) {
    timar_session_destroy(batched[h]);
    timar_session_destroy(alone[h]);
    free_conversation(&conv[h]);
  }
  timar_model_destroy(m);
}

static timar_model* open_model(const char* bundle) {
  timar_model_options o;
  timar_model* m = NULL;
  timar_model_options_init(&o);
  o.threads = 1;
  o.backend = TIMAR_BACKEND_ORT_CPU;
  CHECK(timar_model_create(bundle, &o, &m) == TIMAR_OK && m, "model_create: %s", timar_last_error());
  return m;
}

/* A session's settings in the batching tests; every head differs in seed and sampling. */
typedef struct {
  uint64_t seed;
  double cfg, temperature;
  uint32_t steps;
  int32_t history;
  int tracked;    /* feeds user motion */
  int before;     /* turns run alone (timar_step) before the batched ones */
  int smoothed;   /* with the tests' custom output smoothing */
} head_spec;

static timar_session* open_head(timar_model* m, const head_spec* h) {
  timar_session_options o;
  timar_session* s = NULL;
  timar_session_options_init(&o);
  o.seed = h->seed;
  o.cfg = h->cfg;
  o.temperature = h->temperature;
  o.steps = h->steps;
  o.history = h->history;
  if (h->smoothed) SET_TEST_SMOOTHING(o);
  CHECK(timar_session_create_from_model(m, &o, &s) == TIMAR_OK && s, "session from model: %s", timar_last_error());
  return s;
}

/* Turn t of a conversation alone (timar_step) into out. */
static void step_alone(timar_session* s, const conversation* c, int tracked, int t, float* out) {
  const float* um = tracked ? c->um + (size_t)TM * t : NULL;
  CHECK(timar_step(s, c->ua + (size_t)TS * t, TS, um, um ? TF : 0, c->aa + (size_t)TS * t, TS, out, TF) == TIMAR_OK,
        "step alone, turn %d: %s", t, timar_last_error());
}

/* Turn t accepted in two uneven pieces; returns the ready turns after it. */
static size_t accept_turn(timar_session* s, const conversation* c, int tracked, int t) {
  const size_t cut = 7001, mcut = 11;
  size_t ready = 0;
  const float *ua = c->ua + (size_t)TS * t, *aa = c->aa + (size_t)TS * t, *um = c->um + (size_t)TM * t;
  CHECK(timar_session_accept(s, ua, cut, tracked ? um : NULL, tracked ? mcut : 0, aa, cut, &ready) == TIMAR_OK,
        "accept: %s", timar_last_error());
  CHECK(timar_session_accept(s, ua + cut, TS - cut, tracked ? um + mcut * TIMAR_MOTION_DIM : NULL,
                             tracked ? TF - mcut : 0, aa + cut, TS - cut, &ready) == TIMAR_OK,
        "accept: %s", timar_last_error());
  return ready;
}

/* The next queued turn of s must be turn `turn` with frames `want` (within 1e-5). */
static void expect_polled(timar_session* s, uint64_t turn, const float* want, const char* what) {
  float got[TM];
  size_t frames = 0;
  uint64_t index = 99;
  double start = -1.0;
  timar_status st = timar_session_poll_motion(s, got, TF, &frames, &index, &start);
  CHECK(st == TIMAR_OK && frames == TF, "%s: poll: %s (%zu frames)", what, st ? timar_last_error() : "", frames);
  if (st != TIMAR_OK || frames != TF) return;
  CHECK(index == turn && start == (double)turn, "%s: turn %llu at %g s, expected turn %llu", what,
        (unsigned long long)index, start, (unsigned long long)turn);
  CHECK(max_abs_diff(got, want, TM) <= 1e-5f, "%s: batched turn %llu differs from the session alone by %g", what,
        (unsigned long long)turn, max_abs_diff(got, want, TM));
}

static uint64_t turns_of(timar_session* s) {
  timar_info info;
  info.struct_size = sizeof info;
  CHECK(timar_session_info(s, &info) == TIMAR_OK, "info: %s", timar_last_error());
  return info.turns;
}

static size_t polled_frames(timar_session* s) {
  float out[TM];
  size_t frames = 99;
  CHECK(timar_session_poll_motion(s, out, TF, &frames, NULL, NULL) == TIMAR_OK, "poll: %s", timar_last_error());
  return frames;
}

/* Heads with different seeds, sampling settings, turn counts, with and without user motion, run
 * their turns batched (timar_model_run_ready) and alone (timar_step on twin sessions of the same
 * model): the same motion. Heads whose settings cannot share a batch run in separate batches. */
static void test_batched_equals_alone(const char* bundle, int window) {
  const head_spec heads[] = {
      {11, 1.0, NAN, 0, TIMAR_HISTORY_DEFAULT, 1, 2, 1},   /* ahead by two turns, smoothed */
      {12, 2.0, NAN, 0, TIMAR_HISTORY_DEFAULT, 0, 0, 0},   /* guided, user not tracked */
      {13, 2.0, 0.6, 0, TIMAR_HISTORY_DEFAULT, 1, 1, 1},   /* guided, another temperature, smoothed */
      {14, 1.0, NAN, 0, TIMAR_HISTORY_DEFAULT, 1, 0, 0},   /* fresh, as head 12 */
      {15, 1.0, NAN, 3, TIMAR_HISTORY_DEFAULT, 0, 1, 0},   /* 3 steps: a batch of its own */
      {16, 1.5, NAN, 0, TIMAR_HISTORY_FEEDBACK, 1, 0, 0},  /* feedback history (cached bundles only) */
  };
  const int n = window ? 5 : 6;
  /* cached: one batch for the five masked 5-step heads... minus the 3-step one; window bundles
     batch only heads with the same number of past turns (12 and 14, both fresh). */
  const size_t batches[2] = {window ? 4u : 3u, window ? 4u : 3u};
  timar_model* m = open_model(bundle);
  timar_session *batched[6] = {0}, *alone[6] = {0};
  conversation conv[6];
  float* want = malloc(sizeof(float) * TM);
  int h, round;
  if (!m) return;
  for (h = 0; h < n; ++h) {
    int t;
    conv[h] = new_conversation();
    batched[h] = open_head(m, &heads[h]);
    alone[h] = open_head(m, &heads[h]);
    for (t = 0; t < heads[h].before; ++t) {
      step_alone(batched[h], &conv[h], heads[h].tracked, t, want);
      step_alone(alone[h], &conv[h], heads[h].tracked, t, want);
    }
  }
  for (round = 0; round < 2; ++round) {
    size_t turns = 0, batch_count = 0;
    for (h = 0; h < n; ++h) {
      CHECK(accept_turn(batched[h], &conv[h], heads[h].tracked, heads[h].before + round) == 1, "one turn ready");
      CHECK(polled_frames(batched[h]) == 0 && turns_of(batched[h]) == (uint64_t)(heads[h].before + round),
            "accept runs nothing (head %d)", h);
    }
    CHECK(timar_model_run_ready(m, 0, &turns, &batch_count) == TIMAR_OK, "run_ready: %s", timar_last_error());
    CHECK(turns == (size_t)n && batch_count == batches[round], "round %d: %zu turns in %zu batches, expected %d in %zu",
          round, turns, batch_count, n, batches[round]);
    for (h = 0; h < n; ++h) {
      const int t = heads[h].before + round;
      step_alone(alone[h], &conv[h], heads[h].tracked, t, want);
      expect_polled(batched[h], (uint64_t)t, want, "batched == alone");
      CHECK(polled_frames(batched[h]) == 0, "one chunk per turn");
    }
    CHECK(timar_model_run_ready(m, 0, &turns, NULL) == TIMAR_OK && turns == 0, "nothing left to run");
  }
  close_heads(m, batched, alone, conv, n);
  free(want);
}

/* A bad piece of input fails only its own session's accept (nothing of it buffered); a turn that
 * fails in a batch (an injected backend failure) is reported by its own session's poll, drops its
 * input and changes nothing else; the other sessions of the batch are committed. And accept runs
 * no inference: with every inference made to fail, it still succeeds. */
static void test_one_session_fails_alone(const char* bundle) {
  timar_model* m = open_model(bundle);
  const head_spec spec = {21, 2.0, NAN, 0, TIMAR_HISTORY_DEFAULT, 1, 0};
  timar_session *good, *bad, *failing, *ref;
  conversation c = new_conversation(), d = new_conversation();
  float* want = malloc(sizeof(float) * TM * 2);
  float got[TM], saved;
  size_t ready = 0, frames = 0, turns = 0;
  uint64_t turn = 99;
  double start = -1.0;
  if (!m) return;
  good = open_head(m, &spec);
  bad = open_head(m, &spec);
  ref = open_head(m, &spec);
  setenv("TIMAR_TEST_FAIL_AFTER_TURNS", "0", 1); /* its first turn fails, wherever it runs */
  failing = open_head(m, &spec);
  unsetenv("TIMAR_TEST_FAIL_AFTER_TURNS");
  step_alone(ref, &c, 1, 0, want);
  step_alone(ref, &c, 1, 1, want + TM);

  CHECK(accept_turn(failing, &d, 1, 0) == 1 && accept_turn(failing, &d, 1, 1) == 2, "accept on the failing head");
  CHECK(turns_of(failing) == 0 && polled_frames(failing) == 0, "accept ran no inference (it would have failed)");
  CHECK(accept_turn(good, &c, 1, 0) == 1, "good head: turn 0");
  CHECK(accept_turn(bad, &c, 1, 0) == 1, "bad head: turn 0");
  saved = c.aa[TS + 5];
  c.aa[TS + 5] = NAN;
  expect_error(timar_session_accept(bad, c.ua + TS, TS, c.um + TM, TF, c.aa + TS, TS, &ready), TIMAR_ERR_NOT_FINITE,
               "agent_audio", "accept NaN");
  CHECK(timar_session_accept(bad, NULL, 0, NULL, 0, NULL, 0, &ready) == TIMAR_OK && ready == 1,
        "the refused piece buffered nothing (%zu ready)", ready);
  c.aa[TS + 5] = saved;
  expect_error(timar_session_accept(NULL, NULL, 0, NULL, 0, NULL, 0, &ready), TIMAR_ERR_NULL_POINTER, "session",
               "accept NULL session");
  expect_error(timar_session_accept(bad, NULL, 3, NULL, 0, NULL, 0, &ready), TIMAR_ERR_NULL_POINTER, "user_audio",
               "accept NULL audio");

  CHECK(timar_model_run_ready(m, 2, &turns, NULL) == TIMAR_OK && turns == 3, "run_ready (batches of 2): %zu turns",
        turns);
  expect_polled(good, 0, want, "the good head, beside a failing one");
  expect_polled(bad, 0, want, "the head whose input was refused");
  expect_error(timar_session_poll_motion(failing, got, TF, &frames, &turn, &start), TIMAR_ERR_BACKEND, "injected",
               "the failed turn, polled");
  CHECK(strstr(timar_last_error(), "turn 0") != NULL && frames == 0 && turn == 0 && start == 0.0,
        "failed turn reported with its index: %s (turn %llu)", timar_last_error(), (unsigned long long)turn);
  CHECK(turns_of(failing) == 0, "the failed turn changed nothing");
  CHECK(timar_model_run_ready(m, 0, &turns, NULL) == TIMAR_OK && turns == 1, "the failing head's next turn");
  {
    /* a fresh session's turn 0 on conversation d's turn 1: what the failing head must give now */
    timar_session* fresh = open_head(m, &spec);
    float* first = malloc(sizeof(float) * TM);
    CHECK(timar_step(fresh, d.ua + TS, TS, d.um + TM, TF, d.aa + TS, TS, first, TF) == TIMAR_OK, "fresh step");
    frames = 0;
    CHECK(timar_session_poll_motion(failing, got, TF, &frames, &turn, &start) == TIMAR_OK && frames == TF && turn == 0 &&
              start == 1.0,
          "after a dropped turn: turn %llu at %g s", (unsigned long long)turn, start);
    CHECK(max_abs_diff(got, first, TM) <= 1e-5f, "the turn after the failure continues from before it (%g)",
          max_abs_diff(got, first, TM));
    timar_session_destroy(fresh);
    free(first);
  }
  CHECK(timar_session_accept(good, c.ua + TS, TS, c.um + TM, TF, c.aa + TS, TS, &ready) == TIMAR_OK && ready == 1,
        "good head: turn 1");
  CHECK(timar_model_run_ready(m, 0, &turns, NULL) == TIMAR_OK && turns == 1, "good head's turn 1");
  expect_error(timar_session_poll_motion(good, got, TF - 1, &frames, NULL, NULL), TIMAR_ERR_BUFFER_TOO_SMALL,
               "out_motion", "poll into a small buffer");
  CHECK(frames == TF, "a small buffer: poll says the frames it needs (%zu)", frames);
  expect_polled(good, 1, want + TM, "polled after a refused poll");
  timar_session_destroy(good);
  timar_session_destroy(bad);
  timar_session_destroy(failing);
  timar_session_destroy(ref);
  timar_model_destroy(m);
  free_conversation(&c);
  free_conversation(&d);
  free(want);
}

static void sleep_ms(long ms) {
  struct timespec t;
  t.tv_sec = ms / 1000;
  t.tv_nsec = (ms % 1000) * 1000000L;
  nanosleep(&t, NULL);
}

/* The model's worker runs two heads' turns as they are accepted; polling gives each head the
 * motion it gets alone. */
static void test_worker(const char* bundle) {
  const head_spec specs[2] = {{31, 1.0, NAN, 0, TIMAR_HISTORY_DEFAULT, 1, 0}, {32, 2.0, NAN, 0, TIMAR_HISTORY_DEFAULT, 0, 0}};
  timar_model* m = open_model(bundle);
  timar_session *heads[2], *alone[2];
  conversation c[2];
  float* want = malloc(sizeof(float) * TM);
  float got[TM];
  int h, t, waited;
  if (!m) return;
  for (h = 0; h < 2; ++h) {
    c[h] = new_conversation();
    heads[h] = open_head(m, &specs[h]);
    alone[h] = open_head(m, &specs[h]);
  }
  CHECK(timar_model_start_worker(m, 0) == TIMAR_OK, "start worker: %s", timar_last_error());
  expect_error(timar_model_start_worker(m, 0), TIMAR_ERR_INVALID_ARGUMENT, "already running", "second worker");
  for (t = 0; t < 2; ++t)
    for (h = 0; h < 2; ++h) accept_turn(heads[h], &c[h], specs[h].tracked, t);
  for (t = 0; t < 2; ++t)
    for (h = 0; h < 2; ++h) {
      size_t frames = 0;
      uint64_t turn = 99;
      timar_status st = TIMAR_OK;
      for (waited = 0; waited < 30000 && st == TIMAR_OK && !frames; waited += 5) {   /* up to 30 s on a loaded machine */
        st = timar_session_poll_motion(heads[h], got, TF, &frames, &turn, NULL);
        if (!frames) sleep_ms(5);
      }
      CHECK(st == TIMAR_OK, "worker poll: %s", timar_last_error());
      step_alone(alone[h], &c[h], specs[h].tracked, t, want);
      CHECK(frames == TF && turn == (uint64_t)t, "the worker ran turn %d of head %d (%zu frames, turn %llu)", t, h,
            frames, (unsigned long long)turn);
      CHECK(max_abs_diff(got, want, TM) <= 1e-5f, "worker turn %d of head %d differs from alone by %g", t, h,
            max_abs_diff(got, want, TM));
    }
  CHECK(timar_model_stop_worker(m) == TIMAR_OK && timar_model_stop_worker(m) == TIMAR_OK, "stop worker (twice)");
  close_heads(m, heads, alone, c, 2);
  free(want);
}

/* Destroy order: the model handle before its sessions (with its worker running a turn, and a
 * session destroyed while its turn may be in a batch); the sessions go on working alone. Run
 * under AddressSanitizer in CI. */
static void test_model_destroyed_first(const char* bundle) {
  const head_spec spec = {41, 2.0, NAN, 0, TIMAR_HISTORY_DEFAULT, 1, 0};
  timar_model* m = open_model(bundle);
  timar_session *a, *b, *ref;
  conversation c = new_conversation();
  float *want = malloc(sizeof(float) * TM), *got = malloc(sizeof(float) * TM);
  size_t frames = 0, ready = 0;
  if (!m) return;
  a = open_head(m, &spec);
  b = open_head(m, &spec);
  ref = open_head(m, &spec);
  CHECK(timar_model_start_worker(m, 0) == TIMAR_OK, "start worker");
  accept_turn(a, &c, 1, 0);
  accept_turn(b, &c, 1, 0);
  timar_session_destroy(b);   /* perhaps in the worker's batch now */
  timar_model_destroy(m);     /* stops the worker; a and ref keep the graphs */
  CHECK(timar_session_accept(a, NULL, 0, NULL, 0, NULL, 0, &ready) == TIMAR_OK, "accept after the model handle");
  if (ready) {   /* the worker had not taken a's turn: run it alone, as a direct call */
    CHECK(timar_flush(a, got, TF, &frames) == TIMAR_OK && frames == TF, "flush after the model: %s",
          timar_last_error());
  } else {
    CHECK(timar_session_poll_motion(a, got, TF, &frames, NULL, NULL) == TIMAR_OK && frames == TF, "poll after the model");
  }
  step_alone(ref, &c, 1, 0, want);
  CHECK(max_abs_diff(got, want, TM) <= 1e-5f, "a session outliving its model handle: turn 0 as alone");
  step_alone(a, &c, 1, 1, got);
  step_alone(ref, &c, 1, 1, want);
  CHECK(max_abs_diff(got, want, TM) <= 1e-5f, "and turn 1, stepped");
  timar_session_destroy(a);
  timar_session_destroy(ref);   /* the last session: frees the graphs */
  free_conversation(&c);
  free(want);
  free(got);
}

static void test_model_api_errors(const char* bundle) {
  timar_model* m = (timar_model*)0x1;
  timar_session* s = (timar_session*)0x1;
  timar_model_options mo;
  timar_session_options so;
  timar_info info;
  size_t turns = 7;
  expect_error(timar_model_create(NULL, NULL, &m), TIMAR_ERR_NULL_POINTER, "bundle_dir", "model NULL dir");
  CHECK(m == NULL, "a failed model_create sets *out_model to NULL");
  expect_error(timar_model_create(bundle, NULL, NULL), TIMAR_ERR_NULL_POINTER, "out_model", "model NULL out");
  expect_error(timar_model_create("/nonexistent/bundle", NULL, &m), TIMAR_ERR_BUNDLE, "manifest.json", "model no bundle");
  timar_model_options_init(&mo);
  CHECK(mo.struct_size == sizeof mo && mo.verify_hashes == 1 && mo.spin == 0 && mo.backend == TIMAR_BACKEND_AUTO,
        "model_options_init defaults");
  mo.struct_size = 4;
  expect_error(timar_model_create(bundle, &mo, &m), TIMAR_ERR_INVALID_ARGUMENT, "timar_model_options_init",
               "model struct_size");
  timar_model_options_init(&mo);
  mo.threads = 10000;
  expect_error(timar_model_create(bundle, &mo, &m), TIMAR_ERR_INVALID_ARGUMENT, "threads", "model threads");
  timar_model_options_init(&mo);
  mo.backend = 9;
  expect_error(timar_model_create(bundle, &mo, &m), TIMAR_ERR_INVALID_ARGUMENT, "backend", "model backend");
  timar_model_options_init(&mo);
  mo.backend = TIMAR_BACKEND_ORT_CPU;
  mo.threads = 1;
  mo.spin = 1;
  CHECK(timar_model_create(bundle, &mo, &m) == TIMAR_OK, "a spinning model: %s", timar_last_error());
  if (!m) return;
  CHECK(strcmp(timar_model_backend_name(m), "onnxruntime-cpu") == 0, "model backend name");
  info.struct_size = sizeof info;
  CHECK(timar_model_info(m, &info) == TIMAR_OK && info.frames_per_turn == TF && info.turns == 0, "model info");
  info.struct_size = 3;
  expect_error(timar_model_info(m, &info), TIMAR_ERR_INVALID_ARGUMENT, "struct_size", "model info struct_size");
  expect_error(timar_session_create_from_model(NULL, NULL, &s), TIMAR_ERR_NULL_POINTER, "model", "session NULL model");
  CHECK(s == NULL, "a failed session create sets *out_session to NULL");
  timar_session_options_init(&so);
  CHECK(so.struct_size == sizeof so && isnan(so.cfg) && so.context_turns == -1 &&
            so.smoothing == TIMAR_SMOOTHING_DEFAULT,
        "session_options_init defaults");
  SET_TEST_SMOOTHING(so);
  so.smoothing_neck = -1.0;
  expect_error(timar_session_create_from_model(m, &so, &s), TIMAR_ERR_INVALID_ARGUMENT, "smoothing_neck",
               "session smoothing -1 s");
  timar_session_options_init(&so);
  so.steps = 5000;
  expect_error(timar_session_create_from_model(m, &so, &s), TIMAR_ERR_INVALID_ARGUMENT, "steps", "session steps");
  timar_session_options_init(&so);
  so.struct_size = 12;
  expect_error(timar_session_create_from_model(m, &so, &s), TIMAR_ERR_INVALID_ARGUMENT, "timar_session_options_init",
               "session struct_size");
  expect_error(timar_model_run_ready(NULL, 0, &turns, NULL), TIMAR_ERR_NULL_POINTER, "model", "run_ready NULL");
  CHECK(turns == 0, "run_ready failure sets *out_turns to 0");
  expect_error(timar_model_start_worker(NULL, 0), TIMAR_ERR_NULL_POINTER, "model", "start_worker NULL");
  CHECK(timar_model_stop_worker(m) == TIMAR_OK, "stop without a worker");
  CHECK(timar_session_create_from_model(m, NULL, &s) == TIMAR_OK && s, "session with default options");
  expect_error(timar_session_poll_motion(s, NULL, 0, NULL, NULL, NULL), TIMAR_ERR_NULL_POINTER, "out_frames",
               "poll NULL out_frames");
  timar_session_destroy(s);
  timar_model_destroy(m);
  timar_model_destroy(NULL); /* allowed */
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s BUNDLE_DIR [BAD_HASH_BUNDLE_DIR [OTHER_KIND_BUNDLE_DIR]]\n", argv[0]);
    return 2;
  }
  test_generator();
  test_library();
  test_create_errors(argv[1], argc > 2 && argv[2][0] ? argv[2] : NULL);   /* "" = none */
  test_session(argv[1], 1.0, 0);
  test_session(argv[1], 2.0, 1);
  test_feed_rollback(argv[1]);
  test_state_checks(argv[1], is_window_bundle(argv[1]));
  test_flush_buffered_turns(argv[1]);
  if (argc > 3) test_state_kinds(argv[1], argv[3]);
  test_model_api_errors(argv[1]);
  test_batched_equals_alone(argv[1], is_window_bundle(argv[1]));
  test_one_session_fails_alone(argv[1]);
  test_worker(argv[1]);
  test_model_destroyed_first(argv[1]);
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
