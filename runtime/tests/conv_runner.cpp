// Runs a conversation from raw little-endian float32 files through the C ABI and writes the
// agent motion as raw float32 [frames, 56]: what tests/test_native.py compares with Python.
//
//   timar_conv --bundle DIR --user-audio ua.f32 --agent-audio aa.f32 [--user-motion um.f32]
//              [--seed N] [--cfg X] [--steps N] [--temperature X] [--history masked|feedback]
//              [--threads N] [--context-turns N] [--chunk SAMPLES] [--flush] [--snapshot-at TURN]
//              --out motion.f32
//   timar_conv --normals N --seed S [--counter-lo N] [--counter-hi N] --out normals.f32
//
// Without --chunk every whole turn goes through timar_step; with --chunk the streams are fed
// in pieces of that many samples (and the matching number of motion frames) through
// timar_feed, then timar_flush when --flush is given.
// --snapshot-at TURN (step mode): timar_get_state after that many turns; at the end a fresh
// session with the same options takes the snapshot (timar_set_state) and replays the turns from
// there, which must give the same frames bit for bit (exit status 1 otherwise).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "timar.h"

namespace {

std::vector<float> read_f32(const std::string& path) {
  std::vector<float> v;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    std::fprintf(stderr, "timar_conv: cannot read %s\n", path.c_str());
    std::exit(2);
  }
  float buf[4096];
  size_t n;
  while ((n = std::fread(buf, sizeof(float), 4096, f)) > 0) v.insert(v.end(), buf, buf + n);
  std::fclose(f);
  return v;
}

void write_f32(const std::string& path, const std::vector<float>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(v.data(), sizeof(float), v.size(), f) != v.size()) {
    std::fprintf(stderr, "timar_conv: cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

int die(const char* what, timar_status s) {
  std::fprintf(stderr, "timar_conv: %s failed: %s: %s\n", what, timar_status_string(s), timar_last_error());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string bundle, ua_path, aa_path, um_path, out_path, history;
  timar_options o;
  timar_options_init(&o);
  o.backend = TIMAR_BACKEND_ORT_CPU;
  size_t chunk = 0, normals = 0;
  long snapshot_at = -1;
  uint64_t counter_lo = 0, counter_hi = 0;
  bool flush = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "timar_conv: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--bundle") bundle = next();
    else if (a == "--user-audio") ua_path = next();
    else if (a == "--agent-audio") aa_path = next();
    else if (a == "--user-motion") um_path = next();
    else if (a == "--out") out_path = next();
    else if (a == "--seed") o.seed = std::strtoull(next().c_str(), nullptr, 0);
    else if (a == "--cfg") o.cfg = std::strtod(next().c_str(), nullptr);
    else if (a == "--steps") o.steps = uint32_t(std::strtoul(next().c_str(), nullptr, 0));
    else if (a == "--temperature") o.temperature = std::strtod(next().c_str(), nullptr);
    else if (a == "--threads") o.threads = std::atoi(next().c_str());
    else if (a == "--context-turns") o.context_turns = std::atoi(next().c_str());
    else if (a == "--history") history = next();
    else if (a == "--chunk") chunk = std::strtoul(next().c_str(), nullptr, 0);
    else if (a == "--flush") flush = true;
    else if (a == "--snapshot-at") snapshot_at = std::strtol(next().c_str(), nullptr, 0);
    else if (a == "--normals") normals = std::strtoul(next().c_str(), nullptr, 0);
    else if (a == "--counter-lo") counter_lo = std::strtoull(next().c_str(), nullptr, 0);
    else if (a == "--counter-hi") counter_hi = std::strtoull(next().c_str(), nullptr, 0);
    else {
      std::fprintf(stderr, "timar_conv: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (out_path.empty()) {
    std::fprintf(stderr, "timar_conv: --out is required\n");
    return 2;
  }
  if (normals) {
    std::vector<float> z(normals);
    timar_status s = timar_philox_normals(o.seed, counter_lo, counter_hi, z.data(), z.size());
    if (s != TIMAR_OK) return die("philox_normals", s);
    write_f32(out_path, z);
    return 0;
  }
  if (history == "masked") o.history = TIMAR_HISTORY_MASKED;
  else if (history == "feedback") o.history = TIMAR_HISTORY_FEEDBACK;
  timar_session* sess = nullptr;
  timar_status s = timar_session_create(bundle.c_str(), &o, &sess);
  if (s != TIMAR_OK) return die("create", s);
  timar_info info;
  info.struct_size = sizeof info;
  timar_session_info(sess, &info);
  const size_t S = size_t(info.samples_per_turn), F = size_t(info.frames_per_turn), D = TIMAR_MOTION_DIM;
  const std::vector<float> ua = read_f32(ua_path), aa = read_f32(aa_path);
  const std::vector<float> um = um_path.empty() ? std::vector<float>() : read_f32(um_path);
  std::vector<float> out, buf(F * D * 64);
  if (!chunk) {
    const size_t turns = std::min(ua.size(), aa.size()) / S;
    std::vector<unsigned char> snapshot;
    for (size_t t = 0; t < turns; ++t) {
      if (snapshot_at >= 0 && size_t(snapshot_at) == t) {
        size_t size = 0;
        s = timar_get_state(sess, nullptr, 0, &size);
        if (s != TIMAR_OK) return die("get_state (size)", s);
        snapshot.resize(size);
        s = timar_get_state(sess, snapshot.data(), snapshot.size(), &size);
        if (s != TIMAR_OK) return die("get_state", s);
      }
      const float* m = um.empty() ? nullptr : um.data() + t * F * D;
      s = timar_step(sess, ua.data() + t * S, S, m, m ? F : 0, aa.data() + t * S, S, buf.data(), buf.size() / D);
      if (s != TIMAR_OK) return die("step", s);
      out.insert(out.end(), buf.begin(), buf.begin() + std::ptrdiff_t(F * D));
    }
    if (!snapshot.empty()) {   // the snapshot restores exactly, in a fresh session
      timar_session* fresh = nullptr;
      s = timar_session_create(bundle.c_str(), &o, &fresh);
      if (s != TIMAR_OK) return die("create (snapshot)", s);
      s = timar_set_state(fresh, snapshot.data(), snapshot.size());
      if (s != TIMAR_OK) return die("set_state", s);
      float worst = 0.0f;
      for (size_t t = size_t(snapshot_at); t < turns; ++t) {
        const float* m = um.empty() ? nullptr : um.data() + t * F * D;
        s = timar_step(fresh, ua.data() + t * S, S, m, m ? F : 0, aa.data() + t * S, S, buf.data(), buf.size() / D);
        if (s != TIMAR_OK) return die("step (snapshot)", s);
        for (size_t i = 0; i < F * D; ++i) {
          const float d = std::fabs(buf[i] - out[t * F * D + i]);
          if (!(d <= worst)) worst = d;   // NaN counts as a difference
        }
      }
      timar_session_destroy(fresh);
      std::printf("snapshot after turn %ld: turns %ld..%zu replayed, max diff %g\n", snapshot_at, snapshot_at,
                  turns - 1, double(worst));
      if (worst != 0.0f) {
        std::fprintf(stderr, "timar_conv: the restored snapshot gives other frames (max diff %g)\n", double(worst));
        return 1;
      }
    }
  } else {
    const size_t frames_total = um.size() / D;
    size_t pos = 0, mpos = 0;
    while (pos < ua.size() || pos < aa.size() || mpos < frames_total) {
      const size_t nu = pos < ua.size() ? std::min(chunk, ua.size() - pos) : 0;
      const size_t na = pos < aa.size() ? std::min(chunk, aa.size() - pos) : 0;
      // motion frames up to the audio position reached after this piece
      const size_t mend = std::min(frames_total, ((pos + chunk) * F + S - 1) / S);
      const size_t nm = mend > mpos ? mend - mpos : 0;
      size_t frames = 0;
      s = timar_feed(sess, nu ? ua.data() + pos : nullptr, nu, nm ? um.data() + mpos * D : nullptr, nm,
                     na ? aa.data() + pos : nullptr, na, buf.data(), buf.size() / D, &frames);
      if (s != TIMAR_OK) return die("feed", s);
      out.insert(out.end(), buf.begin(), buf.begin() + std::ptrdiff_t(frames * D));
      pos += chunk;
      mpos += nm;
      if (!nu && !na && !nm) break;
    }
    if (flush) {
      size_t frames = 0;
      s = timar_flush(sess, buf.data(), buf.size() / D, &frames);
      if (s != TIMAR_OK) return die("flush", s);
      out.insert(out.end(), buf.begin(), buf.begin() + std::ptrdiff_t(frames * D));
    }
  }
  timar_session_destroy(sess);
  write_f32(out_path, out);
  std::printf("%zu frames\n", out.size() / D);
  return 0;
}
