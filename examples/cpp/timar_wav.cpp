// timar_wav: drive the agent's head from two WAV files (and optionally the user's tracked face)
// with the TIMAR native runtime, and write the agent motion as .npy [frames, 56] float32.
//
//   timar_wav BUNDLE_DIR USER.wav AGENT.wav OUT.npy [--user-motion USER.npy] [--seed N]
//             [--cfg X] [--steps N] [--chunk SAMPLES]
//   timar_wav --help | --version
//
// Exit status: 0 on success (and for --help / --version), 1 when a file or the bundle fails,
// 2 for a wrong command line (the usage goes to stderr).
// WAV: 16 kHz (the bundle's rate) PCM int16 or IEEE float32; several channels are averaged.
// The audio is streamed through timar_feed in pieces of --chunk samples (default 320 = 20 ms,
// as an audio callback would deliver it), then timar_flush finishes the last partial turn.
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "timar.h"

namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error(path + ": cannot open");
  std::vector<uint8_t> data;
  uint8_t buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + n);
  std::fclose(f);
  return data;
}

uint32_t le32(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24; }
uint16_t le16(const uint8_t* p) { return uint16_t(p[0] | p[1] << 8); }

// Mono float32 samples of a RIFF/WAVE file (PCM16 or float32, any channel count).
std::vector<float> read_wav(const std::string& path, int expected_rate) {
  const std::vector<uint8_t> d = read_file(path);
  if (d.size() < 12 || std::memcmp(d.data(), "RIFF", 4) || std::memcmp(d.data() + 8, "WAVE", 4))
    throw std::runtime_error(path + ": not a RIFF/WAVE file");
  uint16_t format = 0, channels = 0, bits = 0;
  uint32_t rate = 0;
  const uint8_t* samples = nullptr;
  size_t bytes = 0;
  for (size_t pos = 12; pos + 8 <= d.size();) {
    const uint32_t size = le32(d.data() + pos + 4);
    const uint8_t* body = d.data() + pos + 8;
    const size_t avail = d.size() - pos - 8;
    if (!std::memcmp(d.data() + pos, "fmt ", 4) && size >= 16 && avail >= 16) {
      format = le16(body);
      channels = le16(body + 2);
      rate = le32(body + 4);
      bits = le16(body + 14);
      if (format == 0xFFFE && size >= 26 && avail >= 26) format = le16(body + 24);   // WAVE_FORMAT_EXTENSIBLE
    } else if (!std::memcmp(d.data() + pos, "data", 4)) {
      samples = body;
      bytes = std::min<size_t>(size, avail);
    }
    pos += 8 + size + (size & 1);
  }
  if (!samples || !channels) throw std::runtime_error(path + ": no fmt or data chunk");
  if (int(rate) != expected_rate)
    throw std::runtime_error(path + ": " + std::to_string(rate) + " Hz, the bundle needs " +
                             std::to_string(expected_rate) + " Hz (resample it first)");
  const bool pcm16 = format == 1 && bits == 16, f32 = format == 3 && bits == 32;
  if (!pcm16 && !f32) throw std::runtime_error(path + ": only 16-bit PCM or 32-bit float WAV is supported");
  const size_t width = bits / 8, frames = bytes / (width * channels);
  std::vector<float> out(frames);
  for (size_t i = 0; i < frames; ++i) {
    float sum = 0.0f;
    for (size_t c = 0; c < channels; ++c) {
      const uint8_t* p = samples + (i * channels + c) * width;
      if (pcm16) {
        sum += float(int16_t(le16(p))) / 32768.0f;
      } else {
        float v;
        std::memcpy(&v, p, 4);
        sum += v;
      }
    }
    out[i] = sum / float(channels);
  }
  return out;
}

// A .npy of float32 (little-endian, C order) with shape (T, 56).
std::vector<float> read_npy_motion(const std::string& path) {
  const std::vector<uint8_t> d = read_file(path);
  if (d.size() < 10 || std::memcmp(d.data(), "\x93NUMPY", 6)) throw std::runtime_error(path + ": not a .npy file");
  const int major = d[6];
  const size_t hlen = major == 1 ? le16(d.data() + 8) : le32(d.data() + 8);
  const size_t start = (major == 1 ? 10 : 12) + hlen;
  if (start > d.size()) throw std::runtime_error(path + ": truncated header");
  const std::string header(reinterpret_cast<const char*>(d.data()) + (major == 1 ? 10 : 12), hlen);
  if (header.find("'descr': '<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error(path + ": expected float32 little-endian C-order data ('<f4'), header " + header);
  const size_t shape = header.find("'shape': (");
  if (shape == std::string::npos) throw std::runtime_error(path + ": no shape in header");
  long rows = 0, cols = 0;
  if (std::sscanf(header.c_str() + shape, "'shape': (%ld, %ld)", &rows, &cols) != 2 || cols != TIMAR_MOTION_DIM)
    throw std::runtime_error(path + ": expected shape (frames, 56), header " + header);
  const size_t n = size_t(rows) * size_t(cols);
  if (d.size() - start < n * 4) throw std::runtime_error(path + ": truncated data");
  std::vector<float> out(n);
  std::memcpy(out.data(), d.data() + start, n * 4);
  return out;
}

void write_npy(const std::string& path, const std::vector<float>& motion) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" +
                       std::to_string(motion.size() / TIMAR_MOTION_DIM) + ", " + std::to_string(TIMAR_MOTION_DIM) + "), }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error(path + ": cannot write");
  const uint8_t pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, uint8_t(header.size() & 0xFF), uint8_t(header.size() >> 8)};
  std::fwrite(pre, 1, 10, f);
  std::fwrite(header.data(), 1, header.size(), f);
  std::fwrite(motion.data(), sizeof(float), motion.size(), f);
  std::fclose(f);
}

void check(timar_status s, const char* what) {
  if (s != TIMAR_OK) throw std::runtime_error(std::string(what) + ": " + timar_last_error());
}

void usage(FILE* f) {
  std::fprintf(f,
               "usage: timar_wav BUNDLE_DIR USER.wav AGENT.wav OUT.npy [options]\n"
               "Drives the agent's head from two 16 kHz WAV files (PCM16 or float32; channels averaged)\n"
               "and writes its motion as .npy [frames, 56] float32.\n"
               "\n"
               "options:\n"
               "  --user-motion USER.npy  the user's tracked face, float32 [frames, 56] at 25 fps\n"
               "  --seed N                seed of the generator (default 0)\n"
               "  --cfg X                 classifier-free guidance 0..20 (default: the bundle's)\n"
               "  --steps N               diffusion steps (default: the bundle's)\n"
               "  --chunk SAMPLES         audio piece per timar_feed call (default 320 = 20 ms)\n"
               "  -h, --help              this text\n"
               "  --version               the library's version\n");
}

// A whole-string number, or exit 2 naming the option.
bool parse_number(const std::string& option, const char* text, double* out, bool integer) {
  char* end = nullptr;
  errno = 0;
  const double v = integer ? double(std::strtoull(text, &end, 0)) : std::strtod(text, &end);
  if (!*text || *end || errno || (integer && text[0] == '-')) {
    std::fprintf(stderr, "timar_wav: %s: expected %s, got '%s'\n", option.c_str(),
                 integer ? "a non-negative integer" : "a number", text);
    return false;
  }
  *out = v;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "-h") || !std::strcmp(argv[i], "--help")) {
      usage(stdout);
      return 0;
    }
    if (!std::strcmp(argv[i], "--version")) {
      std::printf("timar_wav (libtimar %s)\n", timar_version());
      return 0;
    }
  }
  if (argc < 5) {
    usage(stderr);
    return 2;
  }
  if (timar_abi_version() != TIMAR_ABI_VERSION) {
    std::fprintf(stderr, "libtimar ABI %d, this program was built for %d\n", timar_abi_version(), TIMAR_ABI_VERSION);
    return 1;
  }
  timar_options opt;
  timar_options_init(&opt);
  std::string motion_path;
  size_t chunk = 320;
  for (int i = 5; i < argc; i += 2) {
    const std::string a = argv[i];
    const bool known = a == "--user-motion" || a == "--seed" || a == "--cfg" || a == "--steps" || a == "--chunk";
    if (!known || i + 1 >= argc) {
      std::fprintf(stderr, known ? "timar_wav: %s needs a value\n\n" : "timar_wav: unknown option %s\n\n", a.c_str());
      usage(stderr);
      return 2;
    }
    double v = 0;
    if (a == "--user-motion") {
      motion_path = argv[i + 1];
      continue;
    }
    const bool integer = a != "--cfg";
    if (!parse_number(a, argv[i + 1], &v, integer)) return 2;
    if (a == "--seed") opt.seed = std::strtoull(argv[i + 1], nullptr, 0);   // exact beyond 2^53
    else if (a == "--cfg") opt.cfg = v;
    else if (a == "--steps") opt.steps = v > 4294967295.0 ? 4294967295u : uint32_t(v);
    else if (a == "--chunk") chunk = size_t(v);
  }
  if (chunk == 0) {
    std::fprintf(stderr, "timar_wav: --chunk: expected at least 1 sample\n");
    return 2;
  }
  timar_session* session = nullptr;
  try {
    check(timar_session_create(argv[1], &opt, &session), "open bundle");
    timar_info info;
    info.struct_size = sizeof info;
    check(timar_session_info(session, &info), "info");
    const std::vector<float> user = read_wav(argv[2], info.sample_rate), agent = read_wav(argv[3], info.sample_rate);
    const std::vector<float> user_motion = motion_path.empty() ? std::vector<float>() : read_npy_motion(motion_path);
    const size_t D = TIMAR_MOTION_DIM, S = size_t(info.samples_per_turn), F = size_t(info.frames_per_turn);
    const size_t total = std::min(user.size(), agent.size()), motion_frames = user_motion.size() / D;
    if (user.size() != agent.size())
      std::fprintf(stderr, "timar_wav: note: the WAV files differ in length (%zu and %zu samples); using the first %zu\n",
                   user.size(), agent.size(), total);
    const size_t audio_frames = total * F / S;
    if (motion_frames && motion_frames < audio_frames)
      std::fprintf(stderr, "timar_wav: note: %s has %zu frames, the audio %zu; its last frame is repeated\n",
                   motion_path.c_str(), motion_frames, audio_frames);
    std::vector<float> out, buf;
    size_t sent_frames = 0;
    for (size_t pos = 0; pos < total; pos += chunk) {
      const size_t n = std::min(chunk, total - pos);
      // motion frames covering the audio so far (25 fps against 16 kHz)
      const size_t want_frames = std::min(motion_frames, ((pos + n) * F + S - 1) / S);
      const size_t nm = want_frames - sent_frames;
      size_t frames = 0;
      check(timar_feed_frames(session, n, nm, n, &frames), "feed_frames");
      buf.resize(std::max<size_t>(frames, 1) * D);
      check(timar_feed(session, user.data() + pos, n, nm ? user_motion.data() + sent_frames * D : nullptr, nm,
                       agent.data() + pos, n, buf.data(), buf.size() / D, &frames), "feed");
      sent_frames += nm;
      out.insert(out.end(), buf.begin(), buf.begin() + std::ptrdiff_t(frames * D));
    }
    // The last partial turn; more than one turn when the user motion ended before the audio
    // (flush then asks for room for every buffered turn).
    buf.resize(F * D);
    size_t frames = 0;
    timar_status st = timar_flush(session, buf.data(), F, &frames);
    if (st == TIMAR_ERR_BUFFER_TOO_SMALL) {
      buf.resize(frames * D);
      st = timar_flush(session, buf.data(), frames, &frames);
    }
    check(st, "flush");
    out.insert(out.end(), buf.begin(), buf.begin() + std::ptrdiff_t(frames * D));
    write_npy(argv[4], out);
    std::printf("%s: %zu frames (%.2f s at %d fps) on %s\n", argv[4], out.size() / D,
                double(out.size() / D) / info.fps, info.fps, timar_session_backend_name(session));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "timar_wav: %s\n", e.what());
    timar_session_destroy(session);
    return 1;
  }
  timar_session_destroy(session);
  return 0;
}
