// 64-byte vectors of the accumulation type for the CPU kernels (GCC/Clang vector extensions,
// lowered to AVX-512 with -march=native, to narrower vectors otherwise: slower, never wrong),
// and the vectorised exp/erf the GELU kernels need.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors in inline helpers: no ABI exposure
#endif

namespace segnext {
namespace {

// ------------------------------------------------------------------------------------------
// One 64-byte vector of the accumulation type.
// ------------------------------------------------------------------------------------------
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float vec __attribute__((vector_size(64), __may_alias__));
  static constexpr int L = 16;
};
template <>
struct Lanes<double> {
  typedef double vec __attribute__((vector_size(64), __may_alias__));
  static constexpr int L = 8;
};
template <typename T>
using vec_t = typename Lanes<T>::vec;

// All internal buffers are 64-byte aligned and indexed in whole vectors.
template <typename T>
inline vec_t<T> vload(const T* p) {
  return *reinterpret_cast<const vec_t<T>*>(p);
}
template <typename T>
inline void vstore(T* p, vec_t<T> v) {
  *reinterpret_cast<vec_t<T>*>(p) = v;
}
// The caller's tensors carry no alignment promise.
template <typename T>
inline vec_t<T> vloadu(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstoreu(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Broadcast (spelled out: `vec{} + x` costs an add, 0 + x being no identity for x = -0).
inline vec_t<float> vsplat(float x) {
  return vec_t<float>{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}
inline vec_t<double> vsplat(double x) { return vec_t<double>{x, x, x, x, x, x, x, x}; }

template <typename T>
struct NoDeduceImpl {
  using type = T;
};
template <typename T>
using NoDeduce = typename NoDeduceImpl<T>::type;  // (std::type_identity_t is C++20)

// ------------------------------------------------------------------------------------------
// L elements of the caller's dtype to and from a vector of the accumulation type; `n` < L
// moves a partial vector (the channel tail; loads zero-fill). bfloat16 and float16 convert 16
// lanes at a time with AVX-512 (bfloat16 rounds to nearest even, NaN kept, as c10 does);
// other builds convert lane by lane.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
constexpr bool kHalfType =
    std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SEGNEXT_VECTOR_HALF 1
template <typename scalar_t>
inline vec_t<float> half_to_float(__m256i h) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return reinterpret_cast<vec_t<float>>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return reinterpret_cast<vec_t<float>>(_mm512_cvtph_ps(h));
  }
}
template <typename scalar_t>
inline __m256i float_to_half(vec_t<float> v) {
  const __m512 f = reinterpret_cast<__m512>(v);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // Round to nearest even on the bits; NaN becomes a quiet NaN of its sign.
    const __m512i b = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
  } else {
    return _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}
#endif

template <typename T, typename scalar_t>
inline vec_t<T> load_lanes(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return vloadu(p);
  } else {
#ifdef SEGNEXT_VECTOR_HALF
    if constexpr (std::is_same_v<T, float> && kHalfType<scalar_t>) {
      return half_to_float<scalar_t>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
#endif
    vec_t<T> v;
    for (int l = 0; l < Lanes<T>::L; ++l) v[l] = static_cast<T>(p[l]);
    return v;
  }
}
template <typename T, typename scalar_t>
inline vec_t<T> load_lanes(const scalar_t* p, int n) {
  if (n == Lanes<T>::L) return load_lanes<T>(p);
#ifdef SEGNEXT_VECTOR_HALF
  if constexpr (std::is_same_v<T, float> && kHalfType<scalar_t>) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    return half_to_float<scalar_t>(_mm256_maskz_loadu_epi16(m, p));
  }
#endif
  vec_t<T> v = vsplat(T(0));
  for (int l = 0; l < n; ++l) v[l] = static_cast<T>(p[l]);
  return v;
}

template <typename T, typename scalar_t>
inline void store_lanes(scalar_t* p, vec_t<T> v) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    vstoreu(p, v);
  } else {
#ifdef SEGNEXT_VECTOR_HALF
    if constexpr (std::is_same_v<T, float> && kHalfType<scalar_t>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), float_to_half<scalar_t>(v));
      return;
    }
#endif
    for (int l = 0; l < Lanes<T>::L; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}
template <typename T, typename scalar_t>
inline void store_lanes(scalar_t* p, vec_t<T> v, int n) {
  if (n == Lanes<T>::L) return store_lanes<T>(p, v);
#ifdef SEGNEXT_VECTOR_HALF
  if constexpr (std::is_same_v<T, float> && kHalfType<scalar_t>) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    _mm256_mask_storeu_epi16(p, m, float_to_half<scalar_t>(v));
    return;
  }
#endif
  for (int l = 0; l < n; ++l) p[l] = static_cast<scalar_t>(v[l]);
}

// ------------------------------------------------------------------------------------------
// exp, erf and GELU on whole vectors. float: polynomial approximations (erf to 4.2e-7
// absolute, exp to ~1 ulp), NaN propagating; double: the C library, lane by lane (the float64
// path exists for gradcheck, where the function and its derivative must agree exactly).
// ------------------------------------------------------------------------------------------
inline vec_t<float> vclamp(vec_t<float> x, float lo, float hi) {
  x = x < vsplat(lo) ? vsplat(lo) : x;  // comparisons are false for NaN: NaN passes through
  return x > vsplat(hi) ? vsplat(hi) : x;
}

inline vec_t<float> vexp(vec_t<float> x) {
  typedef int32_t ivec __attribute__((vector_size(64)));
  x = vclamp(x, -87.0f, 88.0f);  // 2^n stays a normal float
  // x = n ln2 + r, |r| <= ln2/2; n by the 1.5 * 2^23 rounding trick (round to nearest).
  const vec_t<float> shifter = vsplat(12582912.0f);
  vec_t<float> n = (x * vsplat(1.44269504088896341f) + shifter) - shifter;
  vec_t<float> r = x - n * vsplat(0.693359375f);  // ln2 in two pieces: the product is exact
  r = r - n * vsplat(-2.12194440e-4f);
  vec_t<float> p = vsplat(1.0f / 5040.0f);
  p = p * r + vsplat(1.0f / 720.0f);
  p = p * r + vsplat(1.0f / 120.0f);
  p = p * r + vsplat(1.0f / 24.0f);
  p = p * r + vsplat(1.0f / 6.0f);
  p = p * r + vsplat(0.5f);
  p = p * r + vsplat(1.0f);
  p = p * r + vsplat(1.0f);
  n = n == n ? n : vsplat(0.0f);  // NaN (p is NaN then): keep the conversion defined
  ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec_t<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 1 / q: the 14-bit AVX-512 estimate and one Newton step (~1 ulp), several times the
// throughput of a vector division; a division elsewhere.
inline vec_t<float> vrecip(vec_t<float> q) {
#if defined(__AVX512F__)
  const vec_t<float> r = reinterpret_cast<vec_t<float>>(_mm512_rcp14_ps(reinterpret_cast<__m512>(q)));
  return r * (vsplat(2.0f) - q * r);
#else
  return vsplat(1.0f) / q;
#endif
}

// erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 in float beyond), P of degree 6, Q of 4.
inline vec_t<float> verf(vec_t<float> x) {
  x = vclamp(x, -4.0f, 4.0f);
  const vec_t<float> x2 = x * x;
  vec_t<float> p = vsplat(-2.72614225801306e-10f);
  p = p * x2 + vsplat(2.77068142495902e-08f);
  p = p * x2 + vsplat(-2.10102402082508e-06f);
  p = p * x2 + vsplat(-5.69250639462346e-05f);
  p = p * x2 + vsplat(-7.34990630326855e-04f);
  p = p * x2 + vsplat(-2.95459980854025e-03f);
  p = p * x2 + vsplat(-1.60960333262415e-02f);
  vec_t<float> q = vsplat(-1.45660718464996e-05f);
  q = q * x2 + vsplat(-2.13374055278905e-04f);
  q = q * x2 + vsplat(-1.68282697438203e-03f);
  q = q * x2 + vsplat(-7.37332916720468e-03f);
  q = q * x2 + vsplat(-1.42647390514189e-02f);
  const vec_t<float> r = x * p * vrecip(q);  // Q <= -0.0142 everywhere: never 0
  // erf(3.92) rounds to 1.0f; beyond, return +-1 exactly (the reciprocal's last-bit error
  // would otherwise leave 1 -+ 1 ulp, and gelu(z) = z (1 + erf) a spurious z * 6e-8).
  return x >= vsplat(3.92f) ? vsplat(1.0f) : (x <= vsplat(-3.92f) ? vsplat(-1.0f) : r);
}

constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// gelu(z) = z Phi(z), Phi the standard normal CDF (nn.GELU with approximate='none').
// Phi(z) = 1/2 + erf(z / sqrt 2) / 2 = 1/2 + z P'(z^2) / Q'(z^2): verf's rational function with
// x = z / sqrt 2 and the 1/2 folded into its coefficients (powers of 2 apart from 1/sqrt 2), so
// that Phi costs no more than erf; beyond verf's saturation point (x = 3.92) Phi is 1 or 0.
namespace gelu_detail {
constexpr double kP[7] = {-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                          -1.60960333262415e-02};  // verf's P, x^12 .. x^0
constexpr double kQ[5] = {-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                          -7.37332916720468e-03, -1.42647390514189e-02};  // Q, x^8 .. x^0
constexpr float p(int i) {  // coefficient of z^(2 (6 - i)): / 2^(6 - i), * (1/2) / sqrt 2
  double c = kP[i] * 0.5 * kSqrtHalf;
  for (int k = i; k < 6; ++k) c *= 0.5;
  return static_cast<float>(c);
}
constexpr float q(int i) {  // coefficient of z^(2 (4 - i)): / 2^(4 - i)
  double c = kQ[i];
  for (int k = i; k < 4; ++k) c *= 0.5;
  return static_cast<float>(c);
}
}  // namespace gelu_detail

inline vec_t<float> vgelu(vec_t<float> z) {
  using namespace gelu_detail;
  const vec_t<float> z2 = z * z;
  vec_t<float> pp = vsplat(p(0));
  for (int i = 1; i < 7; ++i) pp = pp * z2 + vsplat(p(i));
  vec_t<float> qq = vsplat(q(0));
  for (int i = 1; i < 5; ++i) qq = qq * z2 + vsplat(q(i));
  // Q' < 0 everywhere: never 0. For |z| beyond the saturation point (z^2 overflowing included)
  // the selects below replace whatever the rational function gave; NaN passes through.
  const vec_t<float> phi = vsplat(0.5f) + z * pp * vrecip(qq);
  const float sat = static_cast<float>(3.92 / kSqrtHalf);
  return z * (z >= vsplat(sat) ? vsplat(1.0f) : (z <= vsplat(-sat) ? vsplat(0.0f) : phi));
}
inline vec_t<double> vgelu(vec_t<double> z) {
  for (int l = 0; l < Lanes<double>::L; ++l) z[l] = z[l] * 0.5 * (1.0 + std::erf(z[l] * kSqrtHalf));
  return z;
}

// gelu'(z) = Phi(z) + z phi(z), phi the standard normal density.
inline vec_t<float> vgelu_grad(vec_t<float> z) {
  const vec_t<float> half = vsplat(0.5f);
  const vec_t<float> cdf = half + half * verf(z * vsplat(static_cast<float>(kSqrtHalf)));
  const vec_t<float> z2 = z * z;
  const vec_t<float> zpdf = z * vsplat(static_cast<float>(kInvSqrt2Pi)) * vexp(z2 * vsplat(-0.5f));
  // |z| > 13.2: z phi(z) < 1e-36 is 0 (vexp's clamp would keep it ~1e-38 * z, and inf * 0 at
  // z = +-inf): gelu' is then exactly 1 or 0. NaN fails the comparison and propagates.
  return cdf + (z2 > vsplat(174.0f) ? vsplat(0.0f) : zpdf);
}
inline vec_t<double> vgelu_grad(vec_t<double> z) {
  for (int l = 0; l < Lanes<double>::L; ++l) {
    const double x = z[l];
    z[l] = 0.5 * (1.0 + std::erf(x * kSqrtHalf)) + x * kInvSqrt2Pi * std::exp(-0.5 * x * x);
  }
  return z;
}

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
constexpr int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

}  // namespace
}  // namespace segnext
