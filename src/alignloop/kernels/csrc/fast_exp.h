// exp for the kernels' softmaxes. fast_exp(x): exp of a finite float x, in plain arithmetic that
// GCC vectorizes (glibc's scalar expf stops the vectorizer). Cody-Waite range reduction, a degree-6
// polynomial on [-ln2/2, ln2/2], and 2^n built from the exponent bits: within a few ulp of expf on [-87.3, 88]; inputs are clamped to that range
// (below it the true value is under 1.2e-38, which softmaxes read as zero).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace alignloop {

inline float fast_exp(float x) {
  x = __builtin_fminf(__builtin_fmaxf(x, -87.3f), 88.0f);
  const float n = __builtin_rintf(x * 1.44269504088896341f);
  float r = x - n * 0.693145751953125f;  // ln 2 in two parts (Cody-Waite): r stays exact
  r -= n * 1.428606765330187e-06f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

// x[0..n) <- exp(x - max x), in place; returns their sum (n >= 1).
inline float exp_shifted(float* x, int64_t n) {
  float top = x[0];
  for (int64_t i = 1; i < n; ++i) top = __builtin_fmaxf(top, x[i]);
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = fast_exp(x[i] - top);
    total += x[i];
  }
  return total;
}

// exp of 16 floats at once, the same arithmetic as `fast_exp`, in AVX-512 intrinsics.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

}  // namespace alignloop
