/* Tests of the C ABI, in plain C (so the header is checked as C too).
 *
 *   timar_test_c BUNDLE_DIR [BAD_HASH_BUNDLE_DIR [OTHER_KIND_BUNDLE_DIR]]
 *
 * Known answers of the portable generator, bad input through every entry point (error code,
 * a message that names the argument, and the session left exactly as it was: NULLs, lengths,
 * NaN, values beyond TIMAR_AUDIO_LIMIT / TIMAR_MOTION_LIMIT, sizes that overflow, options out
 * of range), state blobs (settings, corruption, all or nothing), reset, feed == step, flush of
 * several buffered turns. BUNDLE_DIR may be a cached or a window_recompute bundle; with a bundle
 * of the other attention kind, a state blob of one kind must be refused by the other, and only
 * the window bundle refuses feedback history and TensorRT. Ends with "N passed, N failed".
 * Run under AddressSanitizer in CI. */
#define _POSIX_C_SOURCE 200112L /* setenv */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
  CHECK(o.struct_size == sizeof(timar_options) && isnan(o.cfg) && o.verify_hashes == 1 && o.context_turns == -1,
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
  timar_session_destroy(NULL); /* allowed */
}

enum { TURNS = 3 };

static timar_session* open_session(const char* bundle, double cfg) {
  timar_options o;
  timar_session* s = NULL;
  timar_status st;
  timar_options_init(&o);
  o.seed = 7;
  o.cfg = cfg;
  o.threads = 1;
  o.backend = TIMAR_BACKEND_ORT_CPU;
  st = timar_session_create(bundle, &o, &s);
  CHECK(st == TIMAR_OK && s, "create: %s", timar_last_error());
  return s;
}

static void test_session(const char* bundle, double cfg) {
  timar_info info;
  timar_session *ref, *s;
  size_t S, F, M, i, n, state_size;
  float *ua, *aa, *um, *want, *got, *tmp;
  void* state;
  int t;

  ref = open_session(bundle, cfg);
  s = open_session(bundle, cfg);
  if (!ref || !s) return;
  info.struct_size = sizeof info;
  CHECK(timar_session_info(s, &info) == TIMAR_OK, "info: %s", timar_last_error());
  CHECK(info.frames_per_turn == 25 && info.samples_per_turn == 16000 && info.fps == 25 && info.sample_rate == 16000 &&
            info.motion_dim == TIMAR_MOTION_DIM && info.backend == TIMAR_BACKEND_ORT_CPU && info.cfg == cfg &&
            info.jaw_begin == 50 && info.neck_end == 56,
        "info fields");
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
    timar_session* f = open_session(bundle, cfg);
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
 * commit is rolled back, nothing is buffered, and the same feed afterwards gives a clean run. */
static void test_feed_rollback(const char* bundle) {
  const size_t S = 16000, F = 25, M = F * TIMAR_MOTION_DIM;
  timar_session *ref, *s;
  float *ua = malloc(sizeof(float) * 2 * S), *aa = malloc(sizeof(float) * 2 * S);
  float *want = malloc(sizeof(float) * 2 * M), *got = malloc(sizeof(float) * 2 * M);
  size_t i, frames = 0;
  timar_info info;
  for (i = 0; i < 2 * S; ++i) ua[i] = frand(0.3f);
  for (i = 0; i < 2 * S; ++i) aa[i] = frand(0.3f);
  ref = open_session(bundle, 1.0);
  CHECK(timar_step(ref, ua, S, NULL, 0, aa, S, want, F) == TIMAR_OK, "rollback ref 0");
  CHECK(timar_step(ref, ua + S, S, NULL, 0, aa + S, S, want + M, F) == TIMAR_OK, "rollback ref 1");
  setenv("TIMAR_TEST_FAIL_AFTER_TURNS", "1", 1);
  s = open_session(bundle, 1.0);
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

/* Blob layout (session.cpp): header of 112 bytes (magic, abi, bundle id, settings), then for
 * cached sessions u32 slots + i32 ages[slots], for window sessions 64 bytes (window sizes and
 * audio statistics); then the stream part, which starts with u64 counter_lo. */
enum { STATE_HEADER = 112 };

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
                                                      {"history", 4}, {"context_turns", 5}};
    int c;
    for (c = 0; c < 6; ++c) {
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
      }
      if (cases[c].what == 4 && window) continue; /* window bundles run masked history only */
      CHECK(timar_session_create(bundle, &o, &other) == TIMAR_OK, "create (%s): %s", cases[c].name, timar_last_error());
      if (!other) continue;
      expect_error(timar_set_state(other, blob1, n1), TIMAR_ERR_STATE, cases[c].name, cases[c].name);
      timar_session_destroy(other);
    }
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

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s BUNDLE_DIR [BAD_HASH_BUNDLE_DIR [OTHER_KIND_BUNDLE_DIR]]\n", argv[0]);
    return 2;
  }
  test_generator();
  test_library();
  test_create_errors(argv[1], argc > 2 && argv[2][0] ? argv[2] : NULL);   /* "" = none */
  test_session(argv[1], 1.0);
  test_session(argv[1], 2.0);
  test_feed_rollback(argv[1]);
  test_state_checks(argv[1], is_window_bundle(argv[1]));
  test_flush_buffered_turns(argv[1]);
  if (argc > 3) test_state_kinds(argv[1], argv[3]);
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
