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
//
// bf16 on a CPU with AMX takes `one_head_tiles` instead: each product is a few tile instructions
// (a 16 x 16 block of scores is one `tdpbf16ps` over 32 head columns), so what is left is the
// softmax and laying keys and values out the way the tiles read them, all in AVX-512 intrinsics
// (written first as plain loops around the tiles, the layout's scalar stores made it no faster
// than the vector path). On the reward bench's batches (64 texts of 8-64 tokens, 12 heads of 32,
// 2 threads) a call takes 1.0 ms against the vector loops' 2.1 ms; about a fifth of it is the
// first read of each q/k/v cache line. As torch's own bf16 attention does, the weights are
// rounded to bf16 before they meet the values; sums stay fp32.
//
// bf16 on a CPU with AVX512-BF16 but no tiles (AMD Zen 4, say) runs the same layout with
// `vdpbf16ps` instead of the tile products (`products_pairs`: each instruction adds 16 pairs of bf16
// products into fp32 sums, half the multiply-adds of the fp32 loops and no widening): on a 2-core
// AMD EPYC, 1.29 ms a call against the fp32 vector loops' 1.88 ms on the batches above (one
// thread: 3.47 ms, and 3.15 with the next task's q/k/v prefetched, `prefetch_head`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bf16.h"
#include "fast_exp.h"

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define ALIGNLOOP_TILES 1
#endif
#if defined(ALIGNLOOP_TILES) || defined(__AVX512BF16__)
#define ALIGNLOOP_PAIRS 1  // bf16 operands laid out in pairs, for tiles or for AVX512-BF16 dot products
#endif

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

#ifdef ALIGNLOOP_PAIRS
// A tile-shaped operand in memory: `at(k, n)` is where block (k, n) starts, its rows `stride`
// bytes apart. A block is 16 rows of 64 bytes: 32 bf16 of a left operand (16 column pairs), or
// 16 pairs of rows of a right operand (16 columns, each pair's two values side by side).
struct Operand {
  const char* base;
  int64_t k_step, n_step, stride;  // bytes
  const void* at(int64_t k, int64_t n) const { return base + k * k_step + n * n_step; }
};
#endif

#ifdef ALIGNLOOP_TILES
// Linux hands out the tile registers' state only to a process that asks for it (oneDNN asks too,
// the first time it runs an AMX kernel; asking again is harmless).
bool tiles_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// Every tile this kernel uses is 16 rows of 64 bytes: 16 x 32 bf16 (a product's operands) or
// 16 x 16 fp32 (its result). Tiles 0-3 accumulate, 4 holds the left operand, 5-7 the right ones.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// c[n] = sum over k of a(k, 0) . b(k, n), for N (1-4) result blocks n side by side, stored into
// `c` (block n at c + n * c_step bytes, rows c_stride bytes apart). Tile registers are named by
// immediates, hence the template.
template <int N>
void product(const Operand& a, const Operand& b, int64_t n0, int64_t ksteps, char* c, int64_t c_step,
             int64_t c_stride) {
  _tile_zero(0);
  if constexpr (N > 1) _tile_zero(1);
  if constexpr (N > 2) _tile_zero(2);
  if constexpr (N > 3) _tile_zero(3);
  for (int64_t k = 0; k < ksteps; ++k) {
    _tile_loadd(4, a.at(k, 0), a.stride);
    _tile_loadd(5, b.at(k, n0), b.stride);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (N > 1) { _tile_loadd(6, b.at(k, n0 + 1), b.stride); _tile_dpbf16ps(1, 4, 6); }
    if constexpr (N > 2) { _tile_loadd(7, b.at(k, n0 + 2), b.stride); _tile_dpbf16ps(2, 4, 7); }
    if constexpr (N > 3) { _tile_loadd(5, b.at(k, n0 + 3), b.stride); _tile_dpbf16ps(3, 4, 5); }
  }
  _tile_stored(0, c + (n0 + 0) * c_step, c_stride);
  if constexpr (N > 1) _tile_stored(1, c + (n0 + 1) * c_step, c_stride);
  if constexpr (N > 2) _tile_stored(2, c + (n0 + 2) * c_step, c_stride);
  if constexpr (N > 3) _tile_stored(3, c + (n0 + 3) * c_step, c_stride);
}

void products(const Operand& a, const Operand& b, int64_t blocks, int64_t ksteps, char* c, int64_t c_step,
              int64_t c_stride) {
  for (int64_t n0 = 0; n0 < blocks; n0 += 4) {
    switch (blocks - n0 < 4 ? blocks - n0 : 4) {
      case 1: product<1>(a, b, n0, ksteps, c, c_step, c_stride); break;
      case 2: product<2>(a, b, n0, ksteps, c, c_step, c_stride); break;
      case 3: product<3>(a, b, n0, ksteps, c, c_step, c_stride); break;
      default: product<4>(a, b, n0, ksteps, c, c_step, c_stride); break;
    }
  }
}

#endif  // ALIGNLOOP_TILES

#ifdef __AVX512BF16__
// The same products as `products`, with AVX512-BF16 dot products (`vdpbf16ps`: 16 fp32 sums, each
// adding one pair of bf16 products) for CPUs without tiles: each 64-byte row of a right block is
// loaded once and fed to R rows of the left operand (R independent sums hide the instruction's
// latency). Only the first `rows` rows of the left operand are computed, rounded up to R.
template <int R>
void rows_pairs(const Operand& a, const Operand& b, int64_t n, int64_t ksteps, int64_t r0, char* c, int64_t c_step,
                int64_t c_stride) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < ksteps; ++k) {
    const char* ak = static_cast<const char*>(a.at(k, 0)) + r0 * a.stride;
    const char* bk = static_cast<const char*>(b.at(k, n));
    for (int p = 0; p < 16; ++p) {
      const __m512bh right = (__m512bh)_mm512_loadu_si512(bk + p * b.stride);
      for (int i = 0; i < R; ++i) {
        int32_t pair;
        std::memcpy(&pair, ak + i * a.stride + p * 4, 4);
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(pair), right);
      }
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(c + n * c_step + (r0 + i) * c_stride), acc[i]);
}

void products_pairs(const Operand& a, const Operand& b, int64_t blocks, int64_t ksteps, int64_t rows, char* c,
                    int64_t c_step, int64_t c_stride) {
  for (int64_t n = 0; n < blocks; ++n) {
    int64_t r0 = 0;
    for (; r0 + 8 <= rows; r0 += 8) rows_pairs<8>(a, b, n, ksteps, r0, c, c_step, c_stride);
    if (r0 < rows) {
      if (rows - r0 > 4) rows_pairs<8>(a, b, n, ksteps, r0, c, c_step, c_stride);
      else rows_pairs<4>(a, b, n, ksteps, r0, c, c_step, c_stride);
    }
  }
}
#endif

#ifdef ALIGNLOOP_PAIRS
// 16 x 16 32-bit words, rows `from` (words apart) -> columns of `to` (rows `to_stride` words apart).
void transpose16(const uint32_t* from, int64_t from_stride, uint32_t* to, int64_t to_stride) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(from + i * from_stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(to + i * to_stride, r[i]);
}

// `count` bf16 from `from` to `to`, then zeros up to `padded` (a multiple of 32).
inline void copy_padded(const uint16_t* from, uint16_t* to, int64_t count, int64_t padded) {
  for (int64_t c = 0; c < padded; c += 32) {
    const int64_t left = count - c;
    const __mmask32 m = left >= 32 ? ~__mmask32(0) : left <= 0 ? 0 : (__mmask32(1) << left) - 1;
    _mm512_storeu_si512(to + c, _mm512_maskz_loadu_epi16(m, from + c));
  }
}

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// The products of `one_head_pairs`: on tiles, or as dot products (only `rows` left rows computed).
template <bool Tiles>
inline void multiply(const Operand& a, const Operand& b, int64_t blocks, int64_t ksteps, int64_t rows, char* c,
                     int64_t c_step, int64_t c_stride) {
#ifdef ALIGNLOOP_TILES
  if constexpr (Tiles) {
    products(a, b, blocks, ksteps, c, c_step, c_stride);
    return;
  }
#endif
#ifdef __AVX512BF16__
  if constexpr (!Tiles) products_pairs(a, b, blocks, ksteps, rows, c, c_step, c_stride);
#endif
}

struct PairBuffers {
  std::vector<uint16_t> q, k;  // [queries (keys) to 16][head width to 32]: zero padded
  std::vector<uint32_t> kt;    // [head width to 32 / 2][keys to 16]: key column pairs, one key per lane
  std::vector<uint16_t> vv;    // [keys to 32 / 2][head width][2]: value rows two by two, interleaved
  std::vector<float> s;        // [16][keys to 16]: a block of scores
  std::vector<uint16_t> p;     // [16][keys to 32]: their softmax numerators as bf16, zero past the text
  std::vector<float> o;        // [16][head width]: a block of outputs before normalising
};

template <typename V>
void grow(V& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);  // new elements are zero
}

// One (text, head) of bf16 qkv, its operands laid out in pairs: 16 queries at a time, each product
// in 16 x 16 blocks (`Tiles`: a few tile instructions per block; else AVX512-BF16 dot products);
// the softmax runs along each query's scores, 16 keys a vector.
template <bool Tiles>
void one_head_pairs(const uint16_t* qkv, uint16_t* out, int64_t first, int64_t len, int64_t h, int64_t heads,
                    int64_t dim, float scale, PairBuffers& b) {
  const int64_t width = heads * dim, row = 3 * width;
  const int64_t l16 = (len + 15) / 16 * 16, l32 = (len + 31) / 32 * 32, d32 = (dim + 31) / 32 * 32;
  grow(b.q, l16 * d32), grow(b.k, l16 * d32), grow(b.kt, d32 / 2 * l16), grow(b.vv, l32 * dim);
  grow(b.s, 16 * l16), grow(b.p, 16 * l32), grow(b.o, 16 * dim);
  const uint16_t* text = qkv + first * row + h * dim;
  for (int64_t j = 0; j < l16; ++j) {
    copy_padded(text + j * row, b.q.data() + j * d32, j < len ? dim : 0, d32);
    copy_padded(text + j * row + width, b.k.data() + j * d32, j < len ? dim : 0, d32);
  }
  // Keys for the right operand of q k^T: a 16 x 16 word transpose per (32 head columns, 16 keys).
  for (int64_t w = 0; w < d32 / 2; w += 16)
    for (int64_t j = 0; j < l16; j += 16)
      transpose16(reinterpret_cast<const uint32_t*>(b.k.data() + j * d32) + w, d32 / 2, b.kt.data() + w * l16 + j,
                  l16);
  // Values for the right operand of p v: rows 2i and 2i + 1 interleaved element by element.
  const __m512i lo_half = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi_half = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int64_t j = 0; j < l32; j += 2) {
    for (int64_t c = 0; c < dim; c += 32) {
      const __mmask32 m = dim - c >= 32 ? ~__mmask32(0) : (__mmask32(1) << (dim - c)) - 1;
      const __m512i a = j < len ? _mm512_maskz_loadu_epi16(m, text + j * row + 2 * width + c) : _mm512_setzero_si512();
      const __m512i z = j + 1 < len ? _mm512_maskz_loadu_epi16(m, text + (j + 1) * row + 2 * width + c)
                                    : _mm512_setzero_si512();
      const __m512i lo = _mm512_unpacklo_epi16(a, z), hi = _mm512_unpackhi_epi16(a, z);
      uint16_t* dst = b.vv.data() + (j / 2 * dim + c) * 2;
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(lo, lo_half, hi));
      if (dim - c > 16) _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi64(lo, hi_half, hi));
    }
  }
  const Operand keys{reinterpret_cast<const char*>(b.kt.data()), 16 * l16 * 4, 16 * 4, l16 * 4};
  const Operand values{reinterpret_cast<const char*>(b.vv.data()), 16 * dim * 4, 16 * 4, dim * 4};
  const Operand weights{reinterpret_cast<const char*>(b.p.data()), 32 * 2, 0, l32 * 2};
  const __m512 scaled = _mm512_set1_ps(scale);
  for (int64_t i0 = 0; i0 < len; i0 += 16) {
    const int64_t rows = len - i0 < 16 ? len - i0 : 16;
    const Operand queries{reinterpret_cast<const char*>(b.q.data() + i0 * d32), 32 * 2, 0, d32 * 2};
    multiply<Tiles>(queries, keys, l16 / 16, d32 / 32, rows, reinterpret_cast<char*>(b.s.data()), 16 * 4, l16 * 4);
    float inv[16];
    for (int64_t r = 0; r < rows; ++r) {
      const float* x = b.s.data() + r * l16;
      __m512 top = _mm512_set1_ps(-3.0e38f);
      for (int64_t j = 0; j < len; j += 16)
        top = _mm512_mask_max_ps(top, first_lanes(len - j), top, _mm512_loadu_ps(x + j));
      const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
      __m512 total = _mm512_setzero_ps();
      uint16_t* w = b.p.data() + r * l32;
      for (int64_t j = 0; j < l32; j += 16) {
        const __mmask16 m = j < len ? first_lanes(len - j) : 0;
        const __m512 e = _mm512_maskz_mov_ps(m, alignloop::exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + (j < l16 ? j : 0)), shift), scaled)));
        total = _mm512_add_ps(total, e);
        alignloop::narrow16(w + j, e);
      }
      inv[r] = 1.f / _mm512_reduce_add_ps(total);
    }
    multiply<Tiles>(weights, values, dim / 16, l32 / 32, rows, reinterpret_cast<char*>(b.o.data()), 16 * 4, dim * 4);
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* o = out + (first + i0 + r) * width + h * dim;
      const __m512 norm = _mm512_set1_ps(inv[r]);
      for (int64_t d = 0; d < dim; d += 16)
        alignloop::narrow16(o + d, _mm512_mul_ps(_mm512_loadu_ps(b.o.data() + r * dim + d), norm));
    }
  }
}
#endif

// Whether bf16 calls can take the tile path here.
bool has_tiles() {
#ifdef ALIGNLOOP_TILES
  return tiles_permitted();
#else
  return false;
#endif
}

// Whether bf16 calls can take the AVX512-BF16 dot-product path here (the library is built for this CPU).
bool has_pairs() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

// Tasks i of [0, tasks) in an order that gives each thread a share of the long texts: texts come
// sorted by length and a thread gets a contiguous range of i, so tasks are taken from both ends in
// turn (cost grows as length^2).
inline int64_t interleaved(int64_t i, int64_t tasks) { return i % 2 == 0 ? i / 2 : tasks - 1 - i / 2; }

#ifdef ALIGNLOOP_PAIRS
// Asks for one (text, head)'s q, k and v lines (into L2), for the task after the running one: perf
// put a third of the dot-product path's layout time on its first loads of them (the rows are
// 3 x width apart, a stride the hardware prefetchers do not follow across tasks).
inline void prefetch_head(const uint16_t* qkv, int64_t first, int64_t len, int64_t h, int64_t width, int64_t dim) {
  for (int64_t j = 0; j < len; ++j) {
    const uint16_t* r = qkv + (first + j) * 3 * width + h * dim;
    for (int64_t b = 0; b < dim; b += 32) {  // 32 bf16 to a 64-byte line
      _mm_prefetch(reinterpret_cast<const char*>(r + b), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(r + width + b), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(r + 2 * width + b), _MM_HINT_T1);
    }
  }
}

// Every (text, head) of bf16 qkv on the paired layout: on tiles, or with dot products (those
// prefetch the next task's rows).
template <bool Tiles>
void run_pairs(const uint16_t* qkv, uint16_t* out, const int64_t* offsets, int64_t texts, int64_t heads, int64_t dim,
               float scale) {
  const int64_t tasks = texts * heads;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
#ifdef ALIGNLOOP_TILES
    // The tile configuration is per thread, and oneDNN's kernels load their own on these
    // threads: load ours for this stretch of tasks, release the tiles after it.
    if constexpr (Tiles) {
      static const TileConfig config;
      _tile_loadconfig(&config);
    }
#endif
    auto b = std::make_unique<PairBuffers>();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t task = interleaved(i, tasks), text = task / heads, h = task % heads;
      if (!Tiles && i + 1 < end) {
        const int64_t next = interleaved(i + 1, tasks), t = next / heads;
        prefetch_head(qkv, offsets[t], offsets[t + 1] - offsets[t], next % heads, heads * dim, dim);
      }
      one_head_pairs<Tiles>(qkv, out, offsets[text], offsets[text + 1] - offsets[text], h, heads, dim, scale, *b);
    }
#ifdef ALIGNLOOP_TILES
    if constexpr (Tiles) _tile_release();
#endif
  });
}
#endif

template <typename T>
void run(const T* qkv, T* out, const int64_t* offsets, int64_t texts, int64_t heads, int64_t dim, float scale,
         bool tiles, bool pairs) {
  if constexpr (std::is_same_v<T, uint16_t>) {
#ifdef ALIGNLOOP_TILES
    if (tiles && has_tiles()) return run_pairs<true>(qkv, out, offsets, texts, heads, dim, scale);
#endif
#ifdef __AVX512BF16__
    if (pairs) return run_pairs<false>(qkv, out, offsets, texts, heads, dim, scale);
#endif
  }
  const int64_t tasks = texts * heads;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt, v, s;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t task = interleaved(i, tasks), text = task / heads, h = task % heads;
      one_head(qkv, out, offsets[text], offsets[text + 1] - offsets[text], h, heads, dim, scale, kt, v, s);
    }
  });
}

}  // namespace

// qkv [tokens, 3 * heads * dim] bf16 or fp32, contiguous: q, k, v side by side in each row, the
// rows of text t at offsets[t] .. offsets[t + 1] - 1 (offsets [texts + 1] int64, from 0 to tokens).
// Returns [tokens, heads * dim] in qkv's dtype: softmax(q k^T * scale) v per text and head, summed in
// fp32. bf16 takes the first path this CPU has of: AMX tiles (`tiles`), AVX512-BF16 dot products
// (`pairs`), the fp32 vector loops (the flags are off switches, for tests and measurements).
at::Tensor packed_attention(const at::Tensor& qkv, const at::Tensor& offsets, int64_t heads, double scale,
                            bool tiles, bool pairs) {
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
    run(in, static_cast<alignloop::element_t<decltype(in)>*>(out.data_ptr()), off, texts, heads, dim, s, tiles, pairs);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(alignloop, m) {
  m.def("packed_attention(Tensor qkv, Tensor offsets, int heads, float scale, bool tiles=True, bool pairs=True) -> Tensor");
  m.def("packed_attention_has_tiles() -> bool", &has_tiles);
  m.def("packed_attention_has_pairs() -> bool", &has_pairs);
}

TORCH_LIBRARY_IMPL(alignloop, CPU, m) { m.impl("packed_attention", &packed_attention); }
