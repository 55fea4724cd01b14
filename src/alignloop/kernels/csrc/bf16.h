// Reading and writing the kernels' two element types, bf16 (as uint16_t bits) and fp32, as fp32.
#pragma once

#include <ATen/ATen.h>

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace alignloop {

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) { return __builtin_bit_cast(float, static_cast<uint32_t>(*p) << 16); }

inline uint16_t narrow(float x) {  // round to nearest even, as torch's float -> bfloat16 (finite values)
  uint32_t bits = __builtin_bit_cast(uint32_t, x);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) { *p = narrow(x); }

// 16 bf16 -> fp32, and back (rounded to nearest even: the CPU's convert where it has AVX512-BF16).
inline __m512 widen16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline void narrow16(uint16_t* p, __m512 x) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
#else
  alignas(64) float t[16];
  _mm512_store_ps(t, x);
  for (int i = 0; i < 16; ++i) p[i] = narrow(t[i]);
#endif
}

// f(data) with `t`'s data as `const float*` (fp32) or `const uint16_t*` (bf16); the caller checked
// the dtype is one of the two.
template <typename F>
void with_data(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kBFloat16)
    f(reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()));
  else
    f(t.data_ptr<float>());
}

// The element type behind a pointer `with_data` passed: the same type, writable, for an output.
template <typename P>
using element_t = std::remove_const_t<std::remove_pointer_t<P>>;

}  // namespace alignloop
