// The respaced Gaussian-diffusion sampler (docs/DESIGN.md section 1), as timar_sdk/sampler.py:
// tables in float64, then float32 math per step.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "philox.hpp"

namespace timar {

constexpr int kMotionDim = 56;

struct Schedule {
  std::vector<int64_t> timesteps;   // original timestep fed to the denoiser, per step k
  std::vector<double> log_beta, log_post_var, coef_x0, coef_xt;
  int steps() const { return int(timesteps.size()); }
};

// Kept original timesteps, as the authors' space_timesteps (round half to even).
std::vector<int64_t> respaced_timesteps(int steps, int num_steps);
Schedule make_schedule(const std::vector<double>& alphas_cumprod, const std::vector<int64_t>& timesteps);

// denoise(x_t [rows, 56], t [rows], rows, out [rows, 112]); z is bound by the caller.
using DenoiseFn = std::function<void(const float* x, const float* t, int rows, float* out)>;

// Buffers reused from call to call (sized on first use).
struct SamplerWorkspace {
  std::vector<float> x_in, t, out, eps;
};

// One turn to sample: its generator (advanced by the draws), settings, and where its motion goes.
struct SampleTurn {
  PhiloxNormal* noise;
  double temperature, cfg;
  float* x;   // out: the motion in normalised space [frames, 56]
};

// Several turns' motion at once, one denoiser call per step for all of them (same schedule).
// The denoiser's rows are, turn after turn, its `frames` conditional rows and, when its cfg != 1,
// its `frames` unconditional rows: the rows of the z the caller bound. Each turn draws its own
// noise of docs/DESIGN.md 4.1 and keeps its own temperature and guidance.
void sample_turns(const DenoiseFn& denoise, int frames, const Schedule& sched, const std::vector<SampleTurn>& turns,
                  SamplerWorkspace& ws);

}  // namespace timar
