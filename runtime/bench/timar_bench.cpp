// Per-turn latency of timar_step (the whole turn: audio encoder, encoder step, sampler) on
// random audio and user motion, as timar_sdk/bench.py measures the Python Session.
//
//   timar_bench --bundle DIR [--turns 50] [--warmup 5] [--cfg 1] [--steps N] [--threads N]
//               [--backend auto|cpu|cuda|tensorrt]
// Prints one JSON line: p50_ms, p95_ms, mean_ms, n, create_ms, backend.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "timar.h"

int main(int argc, char** argv) {
  std::string bundle, backend = "cpu";
  int turns = 50, warmup = 5;
  timar_options o;
  timar_options_init(&o);
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--bundle") bundle = v;
    else if (a == "--turns") turns = std::atoi(v.c_str());
    else if (a == "--warmup") warmup = std::atoi(v.c_str());
    else if (a == "--cfg") o.cfg = std::atof(v.c_str());
    else if (a == "--steps") o.steps = uint32_t(std::atoi(v.c_str()));
    else if (a == "--threads") o.threads = std::atoi(v.c_str());
    else if (a == "--backend") backend = v;
    else {
      std::fprintf(stderr, "timar_bench: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  o.backend = backend == "auto" ? TIMAR_BACKEND_AUTO
              : backend == "cuda" ? TIMAR_BACKEND_ORT_CUDA
              : backend == "tensorrt" ? TIMAR_BACKEND_TENSORRT
                                      : TIMAR_BACKEND_ORT_CPU;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  timar_session* s = nullptr;
  if (timar_session_create(bundle.c_str(), &o, &s) != TIMAR_OK) {
    std::fprintf(stderr, "timar_bench: %s\n", timar_last_error());
    return 1;
  }
  const double create_ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
  timar_info info;
  info.struct_size = sizeof info;
  timar_session_info(s, &info);
  const size_t S = size_t(info.samples_per_turn), F = size_t(info.frames_per_turn);
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.0f, 0.1f);
  std::vector<float> ua(S), aa(S), um(F * TIMAR_MOTION_DIM), out(F * TIMAR_MOTION_DIM);
  std::vector<double> ms;
  for (int i = 0; i < warmup + turns; ++i) {
    for (float& x : ua) x = nd(rng);
    for (float& x : aa) x = nd(rng);
    for (float& x : um) x = nd(rng);
    const auto a = clock::now();
    if (timar_step(s, ua.data(), S, um.data(), F, aa.data(), S, out.data(), F) != TIMAR_OK) {
      std::fprintf(stderr, "timar_bench: %s\n", timar_last_error());
      return 1;
    }
    if (i >= warmup) ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - a).count());
  }
  std::sort(ms.begin(), ms.end());
  auto pct = [&](double p) {   // linear interpolation, as numpy.percentile
    const double pos = p / 100.0 * double(ms.size() - 1);
    const size_t lo = size_t(pos), hi = std::min(lo + 1, ms.size() - 1);
    return ms[lo] + (ms[hi] - ms[lo]) * (pos - double(lo));
  };
  double mean = 0;
  for (double x : ms) mean += x;
  mean /= double(ms.size());
  std::printf("{\"runtime\": \"c++\", \"backend\": \"%s\", \"cfg\": %g, \"steps\": %d, \"p50_ms\": %.3f, "
              "\"p95_ms\": %.3f, \"mean_ms\": %.3f, \"n\": %zu, \"create_ms\": %.1f}\n",
              timar_session_backend_name(s), info.cfg, info.steps, pct(50), pct(95), mean, ms.size(), create_ms);
  timar_session_destroy(s);
  return 0;
}
