#include "sampler.hpp"

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <stdexcept>
#include <string>

namespace timar {

std::vector<int64_t> respaced_timesteps(int steps, int num_steps) {
  if (steps < 1 || steps > num_steps)
    throw std::invalid_argument("steps: expected an integer in 1.." + std::to_string(num_steps) +
                                ", got " + std::to_string(steps));
  if (steps == 1) return {0};
  const double stride = double(num_steps - 1) / double(steps - 1);
  std::vector<int64_t> kept;
  double cur = 0.0;
  const int mode = std::fegetround();
  std::fesetround(FE_TONEAREST);   // nearbyint: round half to even, as Python's round()
  for (int i = 0; i < steps; ++i) {
    kept.push_back(int64_t(std::nearbyint(cur)));
    cur += stride;
  }
  std::fesetround(mode);
  return kept;
}

Schedule make_schedule(const std::vector<double>& ac_all, const std::vector<int64_t>& timesteps) {
  Schedule s;
  s.timesteps = timesteps;
  const size_t n = timesteps.size();
  std::vector<double> ac(n), ac_prev(n), beta(n), post_var(n);
  for (size_t k = 0; k < n; ++k) ac[k] = ac_all.at(size_t(timesteps[k]));
  for (size_t k = 0; k < n; ++k) {
    ac_prev[k] = k ? ac[k - 1] : 1.0;
    beta[k] = 1.0 - ac[k] / ac_prev[k];
    post_var[k] = beta[k] * (1.0 - ac_prev[k]) / (1.0 - ac[k]);
  }
  const double first = n > 1 ? post_var[1] : beta[0];
  s.log_beta.resize(n);
  s.log_post_var.resize(n);
  s.coef_x0.resize(n);
  s.coef_xt.resize(n);
  for (size_t k = 0; k < n; ++k) {
    s.log_beta[k] = std::log(beta[k]);
    s.log_post_var[k] = std::log(k ? post_var[k] : first);
    s.coef_x0[k] = beta[k] * std::sqrt(ac_prev[k]) / (1.0 - ac[k]);
    s.coef_xt[k] = (1.0 - ac_prev[k]) * std::sqrt(1.0 - beta[k]) / (1.0 - ac[k]);
  }
  return s;
}

namespace {

bool guided(const SampleTurn& turn) { return turn.cfg != 1.0; }

// One step k of one turn: x [frames, 56] from the denoiser's rows of that turn (`out`: its
// conditional rows, then its unconditional ones when guided) and the noise eps.
void posterior_step(const Schedule& sched, int k, int frames, const SampleTurn& turn, const float* out,
                    const float* eps) {
  const int D = kMotionDim;
  const bool cfg_on = guided(turn);
  const float temp = float(turn.temperature), g = float(turn.cfg);
  const float lb = float(sched.log_beta[size_t(k)]), lp = float(sched.log_post_var[size_t(k)]);
  const float c0 = float(sched.coef_x0[size_t(k)]), ct = float(sched.coef_xt[size_t(k)]);
  float* x = turn.x;
  for (int f = 0; f < frames; ++f) {
    const float* cond = out + size_t(f) * 2 * D;
    const float* unc = cfg_on ? out + size_t(frames + f) * 2 * D : nullptr;
    for (int d = 0; d < D; ++d) {
      const size_t i = size_t(f) * D + size_t(d);
      float x0 = cond[d];
      if (cfg_on) {
        const float u = unc[d];
        const float diff = x0 - u;
        const float scaled = g * diff;
        x0 = u + scaled;
      }
      const float v = cond[D + d];
      const float frac = (v + 1.0f) / 2.0f;
      const float a = frac * lb;
      const float b = (1.0f - frac) * lp;
      const float log_var = a + b;
      const float m0 = c0 * x0;
      const float m1 = ct * x[i];
      const float mean = m0 + m1;
      if (k == 0) {
        x[i] = mean;
      } else {
        const float sd = std::exp(0.5f * log_var);
        const float e = sd * eps[i];
        x[i] = mean + e * temp;
      }
    }
  }
}

}  // namespace

void sample_turns(const DenoiseFn& denoise, int frames, const Schedule& sched, const std::vector<SampleTurn>& turns,
                  SamplerWorkspace& ws) {
  const int D = kMotionDim;
  const size_t n = size_t(frames) * D;
  size_t rows = 0;
  for (const SampleTurn& turn : turns) rows += guided(turn) ? 2 * size_t(frames) : size_t(frames);
  ws.x_in.resize(rows * D);
  ws.t.resize(rows);
  ws.out.resize(rows * 2 * D);
  ws.eps.resize(n);
  for (const SampleTurn& turn : turns) turn.noise->normal(turn.x, n);
  for (int k = sched.steps() - 1; k >= 0; --k) {
    std::fill(ws.t.begin(), ws.t.end(), float(sched.timesteps[size_t(k)]));
    float* in = ws.x_in.data();
    for (const SampleTurn& turn : turns) {
      in = std::copy_n(turn.x, n, in);
      if (guided(turn)) in = std::copy_n(turn.x, n, in);
    }
    denoise(ws.x_in.data(), ws.t.data(), int(rows), ws.out.data());
    const float* out = ws.out.data();
    for (const SampleTurn& turn : turns) {
      turn.noise->normal(ws.eps.data(), n);   // drawn at every step; the last step's is discarded
      posterior_step(sched, k, frames, turn, out, ws.eps.data());
      out += (guided(turn) ? 2 * n : n) * 2;
    }
  }
}

}  // namespace timar
