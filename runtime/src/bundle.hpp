// Reading a bundle (docs/DESIGN.md section 3): manifest.json's bytes checked against manifest.sha256,
// then field by field (numbers and their consistency), every file it names kept inside the
// bundle folder, every graph file present and matching its sha256. Mirrors
// timar_sdk/runtime/bundle.py.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "smoothing.hpp"

namespace timar {

// Ranges of the sampling settings (the manifest's defaults and the session options alike), as
// timar_sdk.runtime.bundle.TEMPERATURE_RANGE and CFG_RANGE.
constexpr double kTemperatureMax = 10.0;
constexpr double kCfgMax = 20.0;

struct BundleError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct EngineFile {
  std::string path;     // bundle dir joined (checked to stay inside it)
  std::string sha256;
};

struct EngineSet {
  std::string dir, gpu, tensorrt;
  std::map<std::string, EngineFile> files;   // graph name -> plan
};

struct Bundle {
  std::string dir;
  std::string id;                 // sha256 of manifest.json's bytes (lowercase hex): what state blobs name
  int fps = 0, sample_rate = 0, frames = 0, samples = 0, motion_dim = 0;
  int context_turns = 0;          // W
  int tokens_per_turn = 0;        // P
  std::string history;            // "masked" | "feedback"
  // attention "cached": past turns live as keys/values in a cache of W-1 slots (the SDK's models).
  // attention "window_recompute": past turns live as token embeddings [P, token_dim] and the
  // whole window runs each turn (the authors' models); there is no cache section.
  bool window = false;
  int layers = 0, heads = 0, head_dim = 0, slots = 0, empty_age = 0;   // cached only
  // cached only: encoder_step's cache inputs, 2 * layers names; input i is the block
  // cache[i / 2][i % 2] [rows, H, slots*P, hd] of the cache [L, 2, rows, H, slots*P, hd].
  std::vector<std::string> cache_inputs;
  // cached only: encoder_step's cache inputs and present output are float16 (manifest cache.dtype
  // "float16"). The ONNX Runtime backend keeps its host cache in float32 holding float16 values
  // (exact both ways) and casts at the graph's boundary: the same output, not the smaller cache.
  bool cache_fp16 = false;
  int token_dim = 0;              // window only: D of token_embed tokens [B, P, D]
  double audio_norm_eps = 1e-7;   // window only: audio_normalization (mode "running").eps
  int speech_dim = 0;             // Da: user_speech [B, F, Da] of encoder_step or token_embed
  int z_dim = 0;                  // Dz: denoiser z [N, Dz]
  std::vector<float> motion_mean, motion_std;   // [56] float32, as the Python runtime casts them
  std::vector<double> alphas_cumprod;           // [1000]
  int default_steps = 5;
  double default_temperature = 1.0, default_cfg = 1.0;
  std::string generator;
  SmoothingTaus smoothing;        // the output smoothing's defaults (manifest "smoothing"; absent: off)
  int exp_range[2] = {0, 50}, jaw_range[2] = {50, 53}, neck_range[2] = {53, 56};
  std::map<std::string, std::string> graph_file, graph_sha256;   // name -> path / digest
  std::vector<EngineSet> engines;

  std::string graph_path(const std::string& name) const { return graph_file.at(name); }
  // The graphs this bundle's attention runs, in the order the backends load them.
  std::vector<const char*> graph_names() const {
    if (window) return {"audio_encoder", "token_embed", "window_encoder", "denoiser"};
    return {"audio_encoder", "encoder_step", "denoiser"};
  }
  // Check an engine set's files exist and match their sha256 (throws BundleError).
  void verify_engine_set(const EngineSet& set) const;
};

// Throws BundleError with a message naming the file and the problem.
Bundle load_bundle(const std::string& dir, bool verify_hashes);

}  // namespace timar
