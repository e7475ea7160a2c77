#include "bundle.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "sha256.hpp"

namespace timar {
namespace {

using json = nlohmann::json;
constexpr int kSchemaVersion = 2;   // as timar_sdk/runtime/bundle.py

bool is_file(const std::string& p) {
  std::error_code ec;
  return std::filesystem::is_regular_file(std::filesystem::u8path(p), ec);
}

std::string join(const std::string& dir, const std::string& rel) {
  if (dir.empty()) return rel;
  return dir.back() == '/' ? dir + rel : dir + "/" + rel;
}

std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}

// A whole file's bytes, at most `limit` of them.
std::string read_bytes(const std::string& path, size_t limit = SIZE_MAX) {
  std::ifstream in(std::filesystem::u8path(path), std::ios::binary);
  if (!in) throw BundleError(path + ": cannot be read");
  std::string out;
  char buf[65536];
  while (out.size() < limit && in.read(buf, sizeof buf).gcount() > 0)
    out.append(buf, size_t(in.gcount()));
  if (in.bad()) throw BundleError(path + ": read error");
  return out.size() > limit ? out.substr(0, limit) : out;
}

// Well-formed UTF-8 (no overlong forms, surrogates or code points above U+10FFFF).
bool is_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned c = p[i];
    size_t len;
    unsigned cp;
    if (c < 0x80) { ++i; continue; }
    if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
    else return false;
    if (n - i < len) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
      return false;
    i += len;
  }
  return true;
}

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  const size_t b = s.find_first_not_of(ws);
  return b == std::string::npos ? "" : s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// Field access with errors that name the JSON path.
struct Reader {
  std::string where;
  const json& at(const json& obj, const std::string& key, const std::string& path) const {
    if (!obj.is_object() || !obj.contains(key))
      throw BundleError(where + ": missing field " + path);
    return obj.at(key);
  }
  int integer(const json& obj, const std::string& key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_number_integer()) throw BundleError(where + ": " + path + " must be an integer");
    const bool fits = v.is_number_unsigned() ? v.get<uint64_t>() <= uint64_t(INT_MAX)
                                             : v.get<int64_t>() >= INT_MIN && v.get<int64_t>() <= INT_MAX;
    if (!fits) throw BundleError(where + ": " + path + " is out of range, got " + v.dump());
    return v.get<int>();
  }
  double number(const json& obj, const std::string& key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_number() || !std::isfinite(v.get<double>())) throw BundleError(where + ": " + path + " must be a finite number");
    return v.get<double>();
  }
  std::string string(const json& obj, const std::string& key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_string()) throw BundleError(where + ": " + path + " must be a string");
    return v.get<std::string>();
  }
  std::vector<double> numbers(const json& obj, const std::string& key, const std::string& path,
                              size_t n) const {
    const json& v = at(obj, key, path);
    if (!v.is_array() || v.size() != n)
      throw BundleError(where + ": " + path + " must be a list of " + std::to_string(n) + " numbers");
    std::vector<double> out;
    for (const json& x : v) {
      if (!x.is_number()) throw BundleError(where + ": " + path + " must hold numbers only");
      out.push_back(x.get<double>());
    }
    return out;
  }
  [[noreturn]] void fail(const std::string& field, const std::string& expected, const std::string& got) const {
    throw BundleError(where + ": " + field + ": expected " + expected + ", got " + got);
  }
  void range(const json& obj, const std::string& key, const std::string& path, int out[2]) const {
    const json& v = at(obj, key, path);
    if (!v.is_array() || v.size() != 2 || !v[0].is_number_integer() || !v[1].is_number_integer())
      throw BundleError(where + ": " + path + " must be [begin, end]");
    out[0] = v[0].get<int>();
    out[1] = v[1].get<int>();
  }
};

// A fixed dimension of a graph tensor: graphs.<g>.<io>[name].shape[axis].
int graph_dim(const Reader& r, const json& graphs, const std::string& g, const char* io,
              const std::string& tensor, size_t axis) {
  const json& list = r.at(r.at(graphs, g, "graphs." + g), io, "graphs." + g + "." + io);
  for (const json& t : list) {
    if (t.is_object() && t.value("name", "") == tensor) {
      const json& shape = r.at(t, "shape", "graphs." + g + "." + io + "[" + tensor + "].shape");
      if (shape.is_array() && shape.size() > axis && shape[axis].is_number_integer())
        return shape[axis].get<int>();
      throw BundleError(r.where + ": graphs." + g + " " + tensor + " has no fixed dimension " +
                        std::to_string(axis));
    }
  }
  throw BundleError(r.where + ": graphs." + g + "." + io + " has no tensor " + tensor);
}

void check_file(const std::string& path, const std::string& sha, bool verify, const std::string& what) {
  if (!is_file(path)) throw BundleError(path + ": missing (" + what + " listed in manifest.json)");
  if (verify) {
    std::string got;
    try {
      got = sha256_file(path);
    } catch (const std::exception& e) {
      throw BundleError(e.what());
    }
    if (got != sha)
      throw BundleError(path + ": sha256 does not match manifest.json (" + what +
                        "); the file is truncated, modified or from another export");
  }
}

bool starts_with(const std::filesystem::path& p, const std::filesystem::path& root) {
  auto a = p.begin();
  for (auto b = root.begin(); b != root.end(); ++a, ++b)
    if (a == p.end() || *a != *b) return false;
  return true;
}

// A file the manifest names (field `field`), as a path inside the bundle folder. What would
// leave the folder is refused: an empty name, an absolute path or drive, a backslash, a ".."
// component, or a name that resolves (symlinks included) outside the folder.
std::string inside(const Reader& r, const std::string& dir, const std::string& name, const std::string& field) {
  namespace fs = std::filesystem;
  const fs::path rel = fs::u8path(name);
  bool bad = name.empty() || name.find('\\') != std::string::npos || name.find('\0') != std::string::npos ||
             rel.is_absolute() || rel.has_root_name() || rel.has_root_directory();
  for (const fs::path& part : rel) bad = bad || part == "..";
  if (bad) r.fail(field, "a relative path inside the bundle folder", "'" + name + "'");
  const std::string path = join(dir, name);
  std::error_code ec;
  if (fs::exists(fs::u8path(path), ec)) {
    const fs::path root = fs::canonical(fs::u8path(dir.empty() ? "." : dir), ec);
    const fs::path real = ec ? fs::path() : fs::canonical(fs::u8path(path), ec);
    if (ec || !starts_with(real, root))
      throw BundleError(r.where + ": " + field + ": '" + name + "' resolves outside the bundle folder (" +
                        (ec ? ec.message() : real.u8string()) + ")");
  }
  return path;
}

// A graph dimension that must equal one the manifest states elsewhere.
void expect_dim(const Reader& r, const json& graphs, const std::string& g, const char* io, const std::string& tensor,
                size_t axis, int want, const std::string& what) {
  const int got = graph_dim(r, graphs, g, io, tensor, axis);
  if (got != want)
    throw BundleError(r.where + ": graphs." + g + " " + tensor + " dimension " + std::to_string(axis) + " is " +
                      std::to_string(got) + ", expected " + std::to_string(want) + " (" + what + ")");
}

// cached bundles: the KV cache layout.
void read_cache(const Reader& r, const json& m, Bundle& b) {
  const json& cache = r.at(m, "cache", "cache");
  b.layers = r.integer(cache, "layers", "cache.layers");
  b.heads = r.integer(cache, "heads", "cache.heads");
  b.head_dim = r.integer(cache, "head_dim", "cache.head_dim");
  b.slots = r.integer(cache, "slots", "cache.slots");
  b.empty_age = r.integer(cache, "empty_age", "cache.empty_age");
  const int w = b.context_turns, per_slot = r.integer(cache, "tokens_per_slot", "cache.tokens_per_slot");
  if (b.layers < 1 || b.heads < 1 || b.head_dim < 1)
    r.fail("cache.layers/heads/head_dim", "integers >= 1", std::to_string(b.layers) + "/" + std::to_string(b.heads) +
                                                                "/" + std::to_string(b.head_dim));
  if (per_slot != b.tokens_per_turn)
    r.fail("cache.tokens_per_slot", "turn_layout.tokens_per_turn = " + std::to_string(b.tokens_per_turn),
           std::to_string(per_slot));
  if (b.slots != w - 1) r.fail("cache.slots", std::to_string(w - 1) + " (context_turns " + std::to_string(w) + " - 1)", std::to_string(b.slots));
  if (b.empty_age != w) r.fail("cache.empty_age", std::to_string(w) + " (context_turns)", std::to_string(b.empty_age));
  // [layers, 2, rows, heads, (W-1) * tokens_per_slot, head_dim]; the rows axis is dynamic.
  const json& shape = r.at(cache, "past_key_values_shape", "cache.past_key_values_shape");
  const int64_t want[6] = {b.layers, 2, -1, b.heads, int64_t(b.slots) * per_slot, b.head_dim};
  for (size_t i = 0; i < 6; ++i) {
    if (i == 2) continue;
    const bool ok = shape.is_array() && shape.size() == 6 && shape[i].is_number_integer() && shape[i].get<int64_t>() == want[i];
    if (!ok)
      r.fail("cache.past_key_values_shape[" + std::to_string(i) + "]",
             i == 4 ? "(context_turns - 1) * tokens_per_slot = " + std::to_string(want[i]) : std::to_string(want[i]),
             shape.is_array() && shape.size() == 6 ? shape[i].dump() : shape.dump());
  }
  // cache.dtype (absent: float32): "float16" is a bundle converted with a half-size cache
  // (timar-convert --cache-dtype float16); encoder_step then takes and gives float16 keys/values.
  if (cache.is_object() && cache.contains("dtype")) {
    const std::string dtype = r.string(cache, "dtype", "cache.dtype");
    if (dtype != "float32" && dtype != "float16") r.fail("cache.dtype", "'float32' or 'float16'", "'" + dtype + "'");
    b.cache_fp16 = dtype == "float16";
  }
  // encoder_step's cache inputs: input i is cache[i / 2][i % 2] (layer, key/value).
  const json& names = r.at(cache, "past_key_values_inputs", "cache.past_key_values_inputs");
  if (!names.is_array() || names.size() != size_t(2 * b.layers))
    throw BundleError(r.where + ": cache.past_key_values_inputs must list 2 * cache.layers input names");
  for (const json& n : names) {
    if (!n.is_string()) throw BundleError(r.where + ": cache.past_key_values_inputs must hold strings only");
    b.cache_inputs.push_back(n.get<std::string>());
  }
}

// window_recompute bundles (the authors' models): the token window and the audio normalisation.
void read_window(const Reader& r, const json& m, Bundle& b) {
  const json& window = r.at(m, "window", "window");
  b.token_dim = r.integer(window, "token_dim", "window.token_dim");
  if (b.token_dim < 1) throw BundleError(r.where + ": window.token_dim must be >= 1");
  if (r.integer(window, "tokens_per_turn", "window.tokens_per_turn") != b.tokens_per_turn ||
      r.integer(window, "max_turns", "window.max_turns") != b.context_turns)
    throw BundleError(r.where + ": window.tokens_per_turn/max_turns disagree with turn_layout and context_turns");
  if (b.history != "masked")
    throw BundleError(r.where + ": window_recompute bundles must have history 'masked', got '" + b.history + "'");
  const json& norm = r.at(m, "audio_normalization", "audio_normalization");
  const std::string mode = r.string(norm, "mode", "audio_normalization.mode");
  // The Python runtime normalises the audio of every window bundle with running statistics;
  // anything else would give different motion, so it is refused rather than guessed.
  if (mode != "running")
    throw BundleError(r.where + ": audio_normalization.mode '" + mode +
                      "' is not supported for window_recompute bundles (expected 'running')");
  if (norm.is_object() && norm.contains("eps")) b.audio_norm_eps = r.number(norm, "eps", "audio_normalization.eps");
  if (!(b.audio_norm_eps >= 0)) throw BundleError(r.where + ": audio_normalization.eps must be >= 0");
}

// The optional defaults of the output smoothing: {"expression": tau, "jaw": tau, "neck": tau} in
// seconds, a region left out not smoothed; absent or false: none (as timar_sdk.runtime.smoothing).
void read_smoothing(const Reader& r, const json& m, Bundle& b) {
  if (!m.contains("smoothing")) return;
  const json& v = m.at("smoothing");
  if (v.is_boolean() && !v.get<bool>()) return;
  if (!v.is_object())
    r.fail("smoothing", "false or an object of time constants in seconds for expression, jaw, neck", v.dump());
  for (auto it = v.begin(); it != v.end(); ++it) {
    size_t region = 0;
    while (region < 3 && it.key() != kSmoothingRegions[region].name) ++region;
    if (region == 3) r.fail("smoothing", "only the keys expression, jaw, neck", "'" + it.key() + "'");
    const json& tau = it.value();
    if (!tau.is_number() || !valid_tau(tau.get<double>()))
      r.fail("smoothing." + it.key(), "a time constant in seconds in [0, " + num(kSmoothingMaxSeconds) + "]",
             tau.dump());
    b.smoothing.seconds[region] = tau.get<double>();
  }
}

}  // namespace

void Bundle::verify_engine_set(const EngineSet& set) const {
  for (const auto& kv : set.files) check_file(kv.second.path, kv.second.sha256, true, "engine '" + kv.first + "'");
}

Bundle load_bundle(const std::string& dir, bool verify_hashes) {
  Bundle b;
  b.dir = dir;
  const std::string path = join(dir, "manifest.json");
  if (!is_file(path))
    throw BundleError("bundle: no manifest.json in '" + dir + "' (expected a folder written by timar-export)");
  // The manifest's exact bytes are checked against manifest.sha256 before anything is read from
  // them; their digest is the bundle's id.
  const std::string bytes = read_bytes(path);
  {
    Sha256 h;
    h.update(bytes.data(), bytes.size());
    b.id = h.hex();
  }
  const std::string digest_path = join(dir, "manifest.sha256");
  if (!is_file(digest_path))
    throw BundleError("bundle: no manifest.sha256 in '" + dir + "': re-export the bundle with this timar-sdk "
                      "(bundles now carry the sha256 of their manifest)");
  if (trim(read_bytes(digest_path, 4096)) != b.id)
    throw BundleError(path + ": does not match manifest.sha256 (edited or corrupted); re-export the bundle, or "
                      "restore the original manifest.json");
  if (!is_utf8(bytes)) throw BundleError(path + ": not a text file (expected UTF-8 JSON)");
  json m;
  try {
    m = json::parse(bytes);
  } catch (const json::exception& e) {
    throw BundleError(path + ": not valid JSON (" + e.what() + ")");
  }
  const Reader r{path};
  if (!m.is_object() || !m.contains("schema_version") || !m["schema_version"].is_number_integer())
    throw BundleError(path + ": no integer schema_version; not a timar-sdk bundle manifest");
  const int version = m["schema_version"].get<int>();
  if (version != kSchemaVersion)
    throw BundleError(path + ": schema_version " + std::to_string(version) + " is " +
                      (version > kSchemaVersion ? "newer" : "older") +
                      " than this runtime reads (" + std::to_string(kSchemaVersion) + "); re-export the bundle or upgrade the runtime");
  if (r.string(m, "format", "format") != "timar-bundle")
    throw BundleError(path + ": format is not 'timar-bundle'");
  b.generator = r.string(r.at(m, "generator", "generator"), "name", "generator.name");
  if (b.generator != "philox4x32-10-boxmuller")
    throw BundleError(path + ": generator '" + b.generator +
                      "' is not implemented here (this runtime has 'philox4x32-10-boxmuller')");
  const std::string attention = r.string(m, "attention", "attention");
  if (attention != "cached" && attention != "window_recompute")
    throw BundleError(path + ": attention '" + attention +
                      "' is not supported by this runtime (expected 'cached' or 'window_recompute')");
  b.window = attention == "window_recompute";
  b.fps = r.integer(m, "fps", "fps");
  b.sample_rate = r.integer(m, "sample_rate", "sample_rate");
  b.frames = r.integer(m, "frames_per_turn", "frames_per_turn");
  b.samples = r.integer(m, "samples_per_turn", "samples_per_turn");
  b.motion_dim = r.integer(m, "motion_dim", "motion_dim");
  if (b.motion_dim != 56) throw BundleError(path + ": motion_dim must be 56");
  if (b.frames <= 0 || b.samples <= 0 || b.fps <= 0 || b.sample_rate <= 0)
    throw BundleError(path + ": fps, sample_rate, frames_per_turn and samples_per_turn must be > 0");
  if (int64_t(b.samples) * b.fps != int64_t(b.frames) * b.sample_rate)
    r.fail("samples_per_turn", "frames_per_turn * sample_rate / fps = " + num(double(b.frames) * b.sample_rate / b.fps),
           std::to_string(b.samples));
  const json& layout = r.at(m, "motion_layout", "motion_layout");
  r.range(layout, "exp", "motion_layout.exp", b.exp_range);
  r.range(layout, "jaw", "motion_layout.jaw", b.jaw_range);
  r.range(layout, "neck", "motion_layout.neck", b.neck_range);
  for (const int* range : {b.exp_range, b.jaw_range, b.neck_range})
    if (range[0] < 0 || range[0] > range[1] || range[1] > 56)
      r.fail("motion_layout", "[begin, end] ranges with 0 <= begin <= end <= 56",
             "[" + std::to_string(range[0]) + ", " + std::to_string(range[1]) + "]");
  b.tokens_per_turn = r.integer(r.at(m, "turn_layout", "turn_layout"), "tokens_per_turn", "turn_layout.tokens_per_turn");
  b.context_turns = r.integer(m, "context_turns", "context_turns");
  if (b.context_turns < 1) throw BundleError(path + ": context_turns must be >= 1");
  b.history = r.string(m, "history", "history");
  if (b.history != "masked" && b.history != "feedback")
    throw BundleError(path + ": history must be 'masked' or 'feedback'");
  if (b.window)
    read_window(r, m, b);
  else
    read_cache(r, m, b);
  // The statistics are used in float32, as the Python runtime casts them: finite there, std > 0.
  const auto statistics = [&](const char* field, std::vector<float>& out) {
    for (double v : r.numbers(m, field, field, 56)) {
      out.push_back(float(v));
      if (!std::isfinite(out.back())) r.fail(field, "56 finite float32 values", "NaN, Inf or an out-of-range value (" + num(v) + ")");
    }
  };
  statistics("motion_mean", b.motion_mean);
  statistics("motion_std", b.motion_std);
  const float min_std = *std::min_element(b.motion_std.begin(), b.motion_std.end());
  if (!(min_std > 0)) r.fail("motion_std", "values > 0", "min " + num(min_std));
  const json& diff = r.at(m, "diffusion", "diffusion");
  const int T = r.integer(diff, "num_train_steps", "diffusion.num_train_steps");
  if (T < 1) throw BundleError(path + ": diffusion.num_train_steps must be >= 1");
  b.alphas_cumprod = r.numbers(diff, "alphas_cumprod", "diffusion.alphas_cumprod", size_t(T));
  for (size_t t = 0; t < b.alphas_cumprod.size(); ++t) {
    const double a = b.alphas_cumprod[t];
    if (!(a > 0 && a < 1) || (t && !(a < b.alphas_cumprod[t - 1])))
      r.fail("diffusion.alphas_cumprod", "finite values in (0, 1), strictly decreasing",
             "value " + std::to_string(t) + " = " + num(a) + (t ? " after " + num(b.alphas_cumprod[t - 1]) : ""));
  }
  if (r.string(diff, "prediction", "diffusion.prediction") != "x0" ||
      r.string(diff, "variance", "diffusion.variance") != "learned_range")
    throw BundleError(path + ": only x0 prediction with learned_range variance is supported");
  const json& sampling = r.at(m, "sampling", "sampling");
  b.default_steps = r.integer(sampling, "steps", "sampling.steps");
  b.default_temperature = r.number(sampling, "temperature", "sampling.temperature");
  b.default_cfg = r.number(sampling, "cfg", "sampling.cfg");
  if (b.default_steps < 1 || b.default_steps > T) r.fail("sampling.steps", "1.." + std::to_string(T), std::to_string(b.default_steps));
  if (!(b.default_temperature >= 0 && b.default_temperature <= kTemperatureMax))
    r.fail("sampling.temperature", "a number in 0.." + num(kTemperatureMax), num(b.default_temperature));
  if (!(b.default_cfg >= 0 && b.default_cfg <= kCfgMax)) r.fail("sampling.cfg", "a number in 0.." + num(kCfgMax), num(b.default_cfg));
  read_smoothing(r, m, b);

  const json& graphs = r.at(m, "graphs", "graphs");
  for (const char* name : b.graph_names()) {
    const json& g = r.at(graphs, name, std::string("graphs.") + name);
    const std::string field = std::string("graphs.") + name + ".file";
    const std::string file = inside(r, dir, r.string(g, "file", field), field);
    const std::string sha = r.string(g, "sha256", std::string("graphs.") + name + ".sha256");
    check_file(file, sha, verify_hashes, std::string("graph '") + name + "'");
    b.graph_file[name] = file;
    b.graph_sha256[name] = sha;
  }
  b.z_dim = graph_dim(r, graphs, "denoiser", "inputs", "z", 1);
  if (b.window) {
    b.speech_dim = graph_dim(r, graphs, "token_embed", "inputs", "user_speech", 2);
    expect_dim(r, graphs, "token_embed", "outputs", "tokens", 2, b.token_dim, "window.token_dim");
    expect_dim(r, graphs, "window_encoder", "inputs", "tokens", 2, b.token_dim, "window.token_dim");
    expect_dim(r, graphs, "window_encoder", "outputs", "z", 2, b.z_dim, "the denoiser's z dimension");
  } else {
    b.speech_dim = graph_dim(r, graphs, "encoder_step", "inputs", "user_speech", 2);
    expect_dim(r, graphs, "encoder_step", "inputs", "past_turn_age", 1, b.slots * b.tokens_per_turn,
               "(context_turns - 1) * tokens_per_slot");
  }

  const json& engines = r.at(m, "engines", "engines");
  if (!engines.is_array()) throw BundleError(path + ": engines must be a list");
  for (size_t i = 0; i < engines.size(); ++i) {
    const json& e = engines[i];
    const std::string at = "engines[" + std::to_string(i) + "]";
    EngineSet s;
    s.dir = r.string(e, "dir", "engines[].dir");
    s.gpu = r.string(e, "gpu", "engines[].gpu");
    s.tensorrt = r.string(e, "tensorrt", "engines[].tensorrt");
    const json& files = r.at(e, "files", "engines[].files");
    if (!files.is_object()) throw BundleError(path + ": engines[].files must be an object");
    for (auto it = files.begin(); it != files.end(); ++it) {
      const std::string field = at + ".files." + it.key() + ".file";
      s.files[it.key()] = EngineFile{inside(r, dir, r.string(it.value(), "file", field), field),
                                     r.string(it.value(), "sha256", at + ".files." + it.key() + ".sha256")};
    }
    b.engines.push_back(std::move(s));
  }
  return b;
}

}  // namespace timar
