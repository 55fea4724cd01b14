// Self-attention of many short texts packed one after another in a [tokens, 3 x width] matrix of
// fused q|k|v rows (the reward encoder's layout): each text attends to itself only, no padding.
//
// Why by hand: torch's fused CPU attention needs texts of one length per call, so a batch of 64
// texts of 7-18 distinct lengths took 7-18 calls per layer, each too small for its kernel (on the
// reward bench, 576 calls ran at ~45 GFLOP/s, a third of the encoder's time). This is one call per
// layer, parallel over (text, head), with every loop a vector loop: keys are transposed once per
// (text, head) and padded to 16, so scores come out as vectors over 16 keys, four queries at a
// time (no horizontal sum per score), and values are summed as vectors over the head width.
//
// The two products are AVX-512 intrinsics (the library builds only where AVX-512 is): GCC, left to
// itself, vectorized them across the four queries instead of across keys and columns, 2x slower.
// The rest is plain loops, vectorized under -O3 -march=native -ffast-math (with `fast_exp`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bf16.h"
#include "fast_exp.h"

#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

using alignloop::load;
using alignloop::store;

constexpr int64_t kLanes = 16;  // fp32 lanes of a 512-bit vector: keys are padded to a multiple
constexpr int64_t kRows = 4;    // queries per pass over a text's keys (each key load feeds 4 FMAs)

// One (text, head): the scores of kRows queries at a time, as vectors over 16 keys, then their
// softmax and the weighted sum of values.
template <typename T>
void one_head(const T* qkv, T* out, int64_t first, int64_t len, int64_t h, int64_t heads, int64_t dim,
              float scale, std::vector<float>& kt, std::vector<float>& v, std::vector<float>& s) {
  const int64_t width = heads * dim, row = 3 * width;
  const int64_t padded = (len + kLanes - 1) / kLanes * kLanes;
  kt.assign(dim * padded, 0.f);  // keys transposed: [dim][padded]
  v.resize(len * dim);
  s.resize(kRows * padded);
  for (int64_t j = 0; j < len; ++j) {
    const T* r = qkv + (first + j) * row + h * dim;
    for (int64_t d = 0; d < dim; ++d) kt[d * padded + j] = load(r + width + d);
    for (int64_t d = 0; d < dim; ++d) v[j * dim + d] = load(r + 2 * width + d);
  }
  float q[kRows][512];  // the head width is at most 512 (checked by the caller)
  float acc[kRows][512];
  for (int64_t i0 = 0; i0 < len; i0 += kRows) {
    const int64_t rows = len - i0 < kRows ? len - i0 : kRows;
    for (int64_t r = 0; r < kRows; ++r) {
      const T* src = qkv + (first + i0 + (r < rows ? r : 0)) * row + h * dim;
      for (int64_t d = 0; d < dim; ++d) q[r][d] = load(src + d) * scale;
    }
    // Scores: four queries against 16 keys at a time, accumulated in registers.
    for (int64_t jb = 0; jb < padded; jb += kLanes) {
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t d = 0; d < dim; ++d) {
        const __m512 k = _mm512_loadu_ps(kt.data() + d * padded + jb);
        c0 = _mm512_fmadd_ps(_mm512_set1_ps(q[0][d]), k, c0);
        c1 = _mm512_fmadd_ps(_mm512_set1_ps(q[1][d]), k, c1);
        c2 = _mm512_fmadd_ps(_mm512_set1_ps(q[2][d]), k, c2);
        c3 = _mm512_fmadd_ps(_mm512_set1_ps(q[3][d]), k, c3);
      }
      _mm512_storeu_ps(s.data() + 0 * padded + jb, c0);
      _mm512_storeu_ps(s.data() + 1 * padded + jb, c1);
      _mm512_storeu_ps(s.data() + 2 * padded + jb, c2);
      _mm512_storeu_ps(s.data() + 3 * padded + jb, c3);
    }
    float inv[kRows];
    for (int64_t r = 0; r < kRows; ++r) inv[r] = 1.f / alignloop::exp_shifted(s.data() + r * padded, len);
    // Weighted values: the four queries' sums over 16 output columns at a time, in registers.
    for (int64_t db = 0; db < dim; db += kLanes) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < len; ++j) {
        const __m512 vj = _mm512_loadu_ps(v.data() + j * dim + db);
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(s[0 * padded + j]), vj, a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(s[1 * padded + j]), vj, a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(s[2 * padded + j]), vj, a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(s[3 * padded + j]), vj, a3);
      }
      _mm512_storeu_ps(&acc[0][db], a0);
      _mm512_storeu_ps(&acc[1][db], a1);
      _mm512_storeu_ps(&acc[2][db], a2);
      _mm512_storeu_ps(&acc[3][db], a3);
    }
    for (int64_t r = 0; r < rows; ++r) {
      T* o = out + (first + i0 + r) * width + h * dim;
      for (int64_t d = 0; d < dim; ++d) store(o + d, acc[r][d] * inv[r]);
    }
  }
}

template <typename T>
void run(const T* qkv, T* out, const int64_t* offsets, int64_t texts, int64_t heads, int64_t dim, float scale) {
  const int64_t tasks = texts * heads;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt, v, s;
    for (int64_t i = begin; i < end; ++i) {
      // Texts come sorted by length and a thread gets a contiguous range of i: taking tasks from
      // both ends in turn gives each thread a share of the long texts (cost grows as length^2).
      const int64_t task = i % 2 == 0 ? i / 2 : tasks - 1 - i / 2;
      const int64_t text = task / heads, h = task % heads;
      one_head(qkv, out, offsets[text], offsets[text + 1] - offsets[text], h, heads, dim, scale, kt, v, s);
    }
  });
}

}  // namespace

// qkv [tokens, 3 * heads * dim] bf16 or fp32, contiguous: q, k, v side by side in each row, the
// rows of text t at offsets[t] .. offsets[t + 1] - 1 (offsets [texts + 1] int64, from 0 to tokens).
// Returns [tokens, heads * dim] in qkv's dtype: softmax(q k^T * scale) v per text and head, in fp32.
at::Tensor packed_attention(const at::Tensor& qkv, const at::Tensor& offsets, int64_t heads, double scale) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 2 && qkv.is_contiguous(),
              "packed_attention: qkv must be a contiguous CPU [tokens, 3 * width] matrix");
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 || qkv.scalar_type() == at::kFloat,
              "packed_attention: bf16 or fp32 qkv");
  TORCH_CHECK(heads >= 1 && qkv.size(1) % (3 * heads) == 0, "packed_attention: qkv width is not 3 x heads x dim");
  TORCH_CHECK(qkv.size(1) / (3 * heads) % 16 == 0 && qkv.size(1) / (3 * heads) <= 512,
              "packed_attention: the head width must be a multiple of 16, at most 512");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.numel() >= 1, "packed_attention: offsets must be int64 [texts + 1]");
  const int64_t tokens = qkv.size(0), dim = qkv.size(1) / (3 * heads), texts = offsets.numel() - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[texts] == tokens, "packed_attention: offsets must run from 0 to the token count");
  for (int64_t t = 0; t < texts; ++t) TORCH_CHECK(off[t + 1] > off[t], "packed_attention: an empty text");
  auto out = at::empty({tokens, heads * dim}, qkv.options());
  const float s = static_cast<float>(scale);
  alignloop::with_data(qkv, [&](auto* in) {
    run(in, static_cast<alignloop::element_t<decltype(in)>*>(out.data_ptr()), off, texts, heads, dim, s);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(alignloop, m) {
  m.def("packed_attention(Tensor qkv, Tensor offsets, int heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(alignloop, CPU, m) { m.impl("packed_attention", &packed_attention); }
