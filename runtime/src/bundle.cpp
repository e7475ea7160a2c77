#include "bundle.hpp"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

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
  if (dir.empty() || (!rel.empty() && rel[0] == '/')) return rel;
  return dir.back() == '/' ? dir + rel : dir + "/" + rel;
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
    return v.get<int>();
  }
  double number(const json& obj, const std::string& key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_number()) throw BundleError(where + ": " + path + " must be a number");
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
  if (r.integer(cache, "tokens_per_slot", "cache.tokens_per_slot") != b.tokens_per_turn ||
      b.slots != b.context_turns - 1 || b.empty_age != b.context_turns)
    throw BundleError(r.where + ": cache.slots/tokens_per_slot/empty_age disagree with context_turns and turn_layout");
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
  json m;
  {
    std::ifstream in(std::filesystem::u8path(path), std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    try {
      m = json::parse(ss.str());
    } catch (const json::exception& e) {
      throw BundleError(path + ": not valid JSON (" + e.what() + ")");
    }
  }
  const Reader r{path};
  if (!m.is_object() || !m.contains("schema_version") || !m["schema_version"].is_number_integer())
    throw BundleError(path + ": no integer schema_version; not a timar-sdk bundle manifest");
  const int version = m["schema_version"].get<int>();
  if (version != kSchemaVersion)
    throw BundleError(path + ": schema_version " + std::to_string(version) + " is " +
                      (version > kSchemaVersion ? "newer" : "older") +
                      " than this runtime reads (1); re-export the bundle or upgrade the runtime");
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
  const json& layout = r.at(m, "motion_layout", "motion_layout");
  r.range(layout, "exp", "motion_layout.exp", b.exp_range);
  r.range(layout, "jaw", "motion_layout.jaw", b.jaw_range);
  r.range(layout, "neck", "motion_layout.neck", b.neck_range);
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
  for (double v : r.numbers(m, "motion_mean", "motion_mean", 56)) b.motion_mean.push_back(float(v));
  for (double v : r.numbers(m, "motion_std", "motion_std", 56)) b.motion_std.push_back(float(v));
  const json& diff = r.at(m, "diffusion", "diffusion");
  const int T = r.integer(diff, "num_train_steps", "diffusion.num_train_steps");
  if (T < 1) throw BundleError(path + ": diffusion.num_train_steps must be >= 1");
  b.alphas_cumprod = r.numbers(diff, "alphas_cumprod", "diffusion.alphas_cumprod", size_t(T));
  if (r.string(diff, "prediction", "diffusion.prediction") != "x0" ||
      r.string(diff, "variance", "diffusion.variance") != "learned_range")
    throw BundleError(path + ": only x0 prediction with learned_range variance is supported");
  const json& sampling = r.at(m, "sampling", "sampling");
  b.default_steps = r.integer(sampling, "steps", "sampling.steps");
  b.default_temperature = r.number(sampling, "temperature", "sampling.temperature");
  b.default_cfg = r.number(sampling, "cfg", "sampling.cfg");

  const json& graphs = r.at(m, "graphs", "graphs");
  for (const char* name : b.graph_names()) {
    const json& g = r.at(graphs, name, std::string("graphs.") + name);
    const std::string file = join(dir, r.string(g, "file", std::string("graphs.") + name + ".file"));
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
  }

  const json& engines = r.at(m, "engines", "engines");
  if (!engines.is_array()) throw BundleError(path + ": engines must be a list");
  for (const json& e : engines) {
    EngineSet s;
    s.dir = r.string(e, "dir", "engines[].dir");
    s.gpu = r.string(e, "gpu", "engines[].gpu");
    s.tensorrt = r.string(e, "tensorrt", "engines[].tensorrt");
    const json& files = r.at(e, "files", "engines[].files");
    if (!files.is_object()) throw BundleError(path + ": engines[].files must be an object");
    for (auto it = files.begin(); it != files.end(); ++it)
      s.files[it.key()] = EngineFile{join(dir, r.string(it.value(), "file", "engines[].files.file")),
                                     r.string(it.value(), "sha256", "engines[].files.sha256")};
    b.engines.push_back(std::move(s));
  }
  return b;
}

}  // namespace timar
