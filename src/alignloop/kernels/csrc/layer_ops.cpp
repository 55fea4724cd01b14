// The engine's bf16 decode step between its matmuls, each in one pass over a row:
//
//     add_rms_norm   h += delta (the residual add, in place), then RMSNorm(h) * weight
//     silu_mul       silu(gate) * up from the fused gate|up matmul's output
//
// Why by hand: at 64 rows these tensors are a few hundred kilobytes, so each torch op costs its
// launch more than its arithmetic; the residual add, the norm, the slicing of gate|up, silu and the
// product were five ops a layer where these are two. Rounding: torch rounds to bf16 after every op
// (h + delta, silu(gate), then the product); here h + delta is rounded as torch's add rounds it
// (h is the residual stream and keeps bf16), the norm and silu * up are computed in fp32 and
// rounded once, as torch's bf16 rms_norm rounds its output once.
//
// Plain loops, vectorized by GCC under -O3 -march=native -ffast-math (with `fast_exp`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bf16.h"
#include "fast_exp.h"

#include <cstdint>
#include <optional>
#include <vector>

namespace {

using alignloop::load;
using alignloop::narrow;

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), what,
              ": a contiguous bf16 CPU matrix");
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* bits_mut(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

}  // namespace

// h [rows, width] bf16, updated in place to h + delta when delta [rows, width] is given; returns
// h * rsqrt(mean(h^2) + eps) * weight [rows, width] bf16 (statistics and product in fp32).
at::Tensor add_rms_norm(const at::Tensor& h, const std::optional<at::Tensor>& delta, const at::Tensor& weight,
                        double eps) {
  check_rows(h, "add_rms_norm: h");
  if (delta.has_value()) {
    check_rows(*delta, "add_rms_norm: delta");
    TORCH_CHECK(delta->sizes() == h.sizes(), "add_rms_norm: delta must have h's shape");
  }
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == h.size(1),
              "add_rms_norm: weight must be contiguous bf16 [width]");
  const int64_t rows = h.size(0), width = h.size(1);
  auto out = at::empty_like(h);
  uint16_t* hp = bits_mut(h);
  const uint16_t* dp = delta.has_value() ? bits(*delta) : nullptr;
  const uint16_t* wp = bits(weight);
  uint16_t* op = bits_mut(out);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(width), w(width);
    for (int64_t j = 0; j < width; ++j) w[j] = load(wp + j);
    for (int64_t r = begin; r < end; ++r) {
      uint16_t* hr = hp + r * width;
      if (dp != nullptr) {
        const uint16_t* dr = dp + r * width;
        for (int64_t j = 0; j < width; ++j) hr[j] = narrow(load(hr + j) + load(dr + j));
      }
      float squares = 0.f;
      for (int64_t j = 0; j < width; ++j) {
        x[j] = load(hr + j);
        squares += x[j] * x[j];
      }
      const float inv = 1.f / __builtin_sqrtf(squares / width + e);
      uint16_t* o = op + r * width;
      for (int64_t j = 0; j < width; ++j) o[j] = narrow(x[j] * inv * w[j]);
    }
  });
  return out;
}

// gate_up [rows, 2 * inner] bf16 (gate then up, side by side); returns silu(gate) * up [rows, inner].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul: gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up must have an even width");
  const int64_t rows = gate_up.size(0), inner = gate_up.size(1) / 2;
  auto out = at::empty({rows, inner}, gate_up.options());
  const uint16_t* gp = bits(gate_up);
  uint16_t* op = bits_mut(out);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* g = gp + r * 2 * inner;
      const uint16_t* u = g + inner;
      uint16_t* o = op + r * inner;
      int64_t j = 0;
      // 16 at a time with the CPU's approximate reciprocal (relative error < 2^-14, far below the
      // output's bf16 rounding): a division per vector cost twice the rest of the loop (46 us a
      // call at 64 x 1536).
      for (; j + 16 <= inner; j += 16) {
        const __m512 a = alignloop::widen16(g + j);
        const __m512 e = alignloop::exp16(_mm512_sub_ps(_mm512_setzero_ps(), a));
        const __m512 y = _mm512_mul_ps(_mm512_mul_ps(a, _mm512_rcp14_ps(_mm512_add_ps(e, _mm512_set1_ps(1.f)))),
                                       alignloop::widen16(u + j));
        alignloop::narrow16(o + j, y);
      }
      for (; j < inner; ++j) {
        const float a = load(g + j);
        o[j] = narrow(a / (1.f + alignloop::fast_exp(-a)) * load(u + j));
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(alignloop, m) {
  m.def("add_rms_norm(Tensor(a!) h, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(alignloop, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
}
