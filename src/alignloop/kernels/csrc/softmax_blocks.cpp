// What sampling needs from a [rows, vocab] logits matrix, in one pass per row: the log of the
// softmax's normaliser, and the probability mass of each block of `block` tokens.
//
// Why by hand: sampling by inverse CDF needs only these (`sampling._inverse_cdf` then looks inside
// one block per row), but in torch ops they cost a float copy of the logits, a softmax written
// out and a block sum read back: four passes over 64 x 49152 x 4 bytes, ~5.5 ms a decode step
// on 2 cores. Here each row is read once (it stays in L2 cache between its two sweeps) and nothing
// vocabulary-sized is written.
//
// Plain loops, vectorized by GCC under -O3 -march=native -ffast-math (with `fast_exp`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bf16.h"
#include "fast_exp.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using alignloop::load;

// One row: x = logits * inv_t (kept for the second sweep), its max, then exp(x - max) summed per
// block. Returns whether every logit was finite (checked on the bits: the build assumes finite
// floats, so the caller falls back to torch ops for a row that is not).
template <typename T>
bool one_row(const T* row, int64_t vocab, int64_t block, float inv_t, float* x, float* logz, double* mass) {
  int bad = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    const float raw = load(row + i);
    bad |= (__builtin_bit_cast(uint32_t, raw) & 0x7F800000u) == 0x7F800000u;
    x[i] = raw * inv_t;
  }
  if (bad) return false;
  float top = x[0];
  for (int64_t i = 1; i < vocab; ++i) top = __builtin_fmaxf(top, x[i]);
  double total = 0.0;
  const int64_t blocks = vocab / block;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * block;
    float s = 0.f;
    for (int64_t i = 0; i < block; ++i) s += alignloop::fast_exp(xb[i] - top);
    mass[b] = s;
    total += s;
  }
  const double inv = 1.0 / total;
  for (int64_t b = 0; b < blocks; ++b) mass[b] *= inv;
  *logz = top + static_cast<float>(std::log(total));
  return true;
}

}  // namespace

// logits [rows, vocab] bf16 or fp32 (contiguous rows); inv_temperature [rows] fp32; `block`
// divides vocab. Returns (logz [rows] fp32, mass [rows, vocab / block] fp64, finite): the
// probability of token i of row r is exp(logits[r, i] * inv_temperature[r] - logz[r]), and
// mass[r, b] sums it over block b; `finite` (a bool scalar) is false if any logit was inf or NaN,
// and then logz and mass are not to be read.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_blocks(const at::Tensor& logits, const at::Tensor& inv_temperature,
                                                  int64_t block) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu() && logits.stride(1) == 1,
              "softmax_blocks: logits must be a CPU [rows, vocab] matrix with contiguous rows");
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat,
              "softmax_blocks: bf16 or fp32 logits");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(block >= 1 && vocab % block == 0, "softmax_blocks: the block size must divide the vocabulary");
  TORCH_CHECK(inv_temperature.scalar_type() == at::kFloat && inv_temperature.is_contiguous() &&
                  inv_temperature.numel() == rows, "softmax_blocks: one fp32 inverse temperature per row");
  auto logz = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto mass = at::empty({rows, vocab / block}, logits.options().dtype(at::kDouble));
  const float* inv_t = inv_temperature.data_ptr<float>();
  float* lz = logz.data_ptr<float>();
  double* ms = mass.data_ptr<double>();
  const int64_t stride = logits.stride(0), blocks = vocab / block;
  std::atomic<bool> finite{true};
  alignloop::with_data(logits, [&](auto* data) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> x(vocab);
      for (int64_t r = begin; r < end; ++r)
        if (!one_row(data + r * stride, vocab, block, inv_t[r], x.data(), lz + r, ms + r * blocks)) finite = false;
    });
  });
  return {logz, mass, at::scalar_tensor(finite.load(), logits.options().dtype(at::kBool))};
}

// For each listed row r = rows[i] of the same logits: the probability mass of the tokens more
// likely than token[i], sum of exp(logits[r, j] * inv_temperature[r] - logz[r]) over logits[r, j] >
// logits[r, token[i]] (the top-p test of a draw that is not obviously inside the nucleus).
// Returns fp32 [len(rows)].
at::Tensor mass_above(const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& token,
                      const at::Tensor& inv_temperature, const at::Tensor& logz) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu() && logits.stride(1) == 1 &&
                  (logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat),
              "mass_above: bf16 or fp32 CPU logits with contiguous rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong && token.scalar_type() == at::kLong && rows.is_contiguous() &&
                  token.is_contiguous() && rows.numel() == token.numel(), "mass_above: int64 rows and tokens");
  TORCH_CHECK(inv_temperature.scalar_type() == at::kFloat && logz.scalar_type() == at::kFloat &&
                  inv_temperature.is_contiguous() && logz.is_contiguous() &&
                  inv_temperature.numel() == logits.size(0) && logz.numel() == logits.size(0),
              "mass_above: fp32 inverse temperature and logz, one per logits row");
  const int64_t n = rows.numel(), vocab = logits.size(1), stride = logits.stride(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* tp = token.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < logits.size(0) && tp[i] >= 0 && tp[i] < vocab, "mass_above: index out of range");
  auto out = at::empty({n}, logits.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const float* inv_t = inv_temperature.data_ptr<float>();
  const float* lz = logz.data_ptr<float>();
  alignloop::with_data(logits, [&](auto* data) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> x(vocab);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = rp[i];
        for (int64_t j = 0; j < vocab; ++j) x[j] = load(data + r * stride + j);
        const float chosen = x[tp[i]], t = inv_t[r], z = lz[r];
        float total = 0.f;
        for (int64_t j = 0; j < vocab; ++j) total += x[j] > chosen ? alignloop::fast_exp(x[j] * t - z) : 0.f;
        op[i] = total;
      }
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(alignloop, m) {
  m.def("softmax_blocks(Tensor logits, Tensor inv_temperature, int block) -> (Tensor, Tensor, Tensor)");
  m.def("mass_above(Tensor logits, Tensor rows, Tensor token, Tensor inv_temperature, Tensor logz) -> Tensor");
}

TORCH_LIBRARY_IMPL(alignloop, CPU, m) {
  m.impl("softmax_blocks", &softmax_blocks);
  m.impl("mass_above", &mass_above);
}
