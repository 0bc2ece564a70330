// Register-blocked GEMM for the 1x1 convolutions of the CPU kernels, on channels-last pixels:
//
//   y[m][n] = sum_{k<K} A[m][k] * B[k][n]      m < M pixels, n < N output channels
//
// A is M rows of K channels with row stride lda, in any storage dtype (each value is converted
// to the accumulation type T as it is broadcast); B is a weight packed once into panels of one
// vector of columns (PackedB); y is handed to an epilogue one register tile at a time, so that
// bias, activation, residual, dtype conversion and the store happen while the tile is in
// registers and no pass over y follows.
//
// Why not ATen's mm: on CPUs where MKL does not take its AVX-512 path (AMD), its sgemm runs
// at less than half the FMA peak on these shapes (K and N of 32 to 2048), while these tiles,
// with K small enough that a panel stays in L1/L2, stay close to the peak. The kernels are GCC
// vector extensions, lowered to AVX-512 FMAs with -march=native (narrower vectors otherwise).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace segnext {
namespace {

// B (K x N) as [N/L][K][L]: panel v holds columns v*L .. v*L+L-1 for every k, zero padded to
// whole vectors (and to K rows beyond the weight's own, see pack_weight).
template <typename T>
struct PackedB {
  static constexpr int L = Lanes<T>::L;
  int64_t K = 0, N = 0, nv = 0;
  T* data = nullptr;
  PackedB() = default;
  PackedB(const PackedB&) = delete;
  PackedB& operator=(const PackedB&) = delete;
  ~PackedB() { std::free(data); }
  const T* panel(int64_t v) const { return data + v * K * L; }
  int64_t bytes() const { return nv * K * L * static_cast<int64_t>(sizeof(T)); }
};

// Packs a (N, Kw) weight (a 1x1 conv's (out, in, 1, 1) viewed as a matrix, any dtype) as the
// B of y = A B, i.e. B[k][n] = weight[n][k], with K >= Kw rows: rows Kw..K-1 are zero, so A may
// carry zero (or any finite) padding channels beyond Kw.
template <typename T>
void pack_weight(PackedB<T>& B, const at::Tensor& weight, int64_t K) {
  constexpr int L = Lanes<T>::L;
  const at::Tensor w = weight.reshape({weight.size(0), -1})
                           .to(at::kCPU, c10::CppTypeToScalarType<T>::value)
                           .contiguous();
  const int64_t N = w.size(0), Kw = w.size(1);
  TORCH_CHECK(Kw <= K, "pack_weight: the weight has ", Kw, " input channels, more than K = ", K);
  B.K = K, B.N = N, B.nv = ceil_div(N, L);
  std::free(B.data);
  const size_t bytes = round_up(static_cast<int64_t>(B.nv * K * L * sizeof(T)), 64);
  B.data = static_cast<T*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(B.data != nullptr, "pack_weight: cannot allocate ", bytes, " bytes");
  std::fill(B.data, B.data + B.nv * K * L, T(0));
  const T* wp = w.data_ptr<T>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < Kw; ++k) B.data[((n / L) * K + k) * L + n % L] = wp[n * Kw + k];
}

template <typename T, typename scalar_t>
inline T to_acc(scalar_t v) {
  return static_cast<T>(v);
}

// One MR x NV tile of y = A B with general operand strides: A(i, k) = a[i * ai + k * ak], and
// the vector of B's row k, columns (v0 + j) * L .., at b[k * bk + (v0 + j) * bj] (64-byte
// aligned). acc[i][j] is y[m0 + i][(v0 + j) * L ..] when handed to epi(m0, v0, acc).
template <typename T, int MR, int NV, typename scalar_a, typename Epi>
inline void gemm_tile(const scalar_a* a, int64_t ai, int64_t ak, const T* b, int64_t bk,
                      int64_t bj, int64_t K, int64_t m0, int64_t v0, Epi& epi) {
  using V = vec_t<T>;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  // One pointer per row of A, advanced along k: row offsets i * ai kept in vector registers
  // (what the compiler does with more rows than free general registers) cost a move per FMA.
  const scalar_a* ar[MR];
  for (int i = 0; i < MR; ++i) ar[i] = a + (m0 + i) * ai;
  b += v0 * bj;
  for (int64_t k = 0; k < K; ++k, b += bk) {
    V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = vload(b + j * bj);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V ai_v = vsplat(to_acc<T>(*ar[i]));
      ar[i] += ak;
      for (int j = 0; j < NV; ++j) acc[i][j] += ai_v * bv[j];
    }
  }
  epi(m0, v0, acc);
}

template <typename Acc>
constexpr int tile_m = std::extent_v<std::remove_reference_t<Acc>, 0>;
template <typename Acc>
constexpr int tile_v = std::extent_v<std::remove_reference_t<Acc>, 1>;

// y = A B for M rows and nv vectors of columns, operands as gemm_tile's. Every (row, vector)
// reaches the epilogue exactly once (the rows left over by MR go in halving tiles), so an
// epilogue may accumulate. Column vectors are the outer loop: a panel group (K x NV vectors)
// stays in L1/L2 while the rows of A stream past it.
template <typename T, int MR, int NV, typename scalar_a, typename Epi>
inline void gemm_rows(const scalar_a* a, int64_t ai, int64_t ak, int64_t m0, int64_t m1,
                      const T* b, int64_t bk, int64_t bj, int64_t K, int64_t v0, Epi& epi) {
  for (; m0 + MR <= m1; m0 += MR) gemm_tile<T, MR, NV>(a, ai, ak, b, bk, bj, K, m0, v0, epi);
  if constexpr (MR > 1) {
    if (m0 < m1) gemm_rows<T, (MR + 1) / 2, NV>(a, ai, ak, m0, m1, b, bk, bj, K, v0, epi);
  }
}

template <typename T, typename scalar_a, typename Epi>
void gemm_strided(const scalar_a* a, int64_t ai, int64_t ak, int64_t M, const T* b, int64_t bk,
                  int64_t bj, int64_t nv, int64_t K, Epi&& epi) {
  if (M <= 0) return;
  // 6 rows x 4 vectors (24 accumulators), then 8 x 3, 8 x 2, 8 x 1 for the last vectors
  // (at most 8 rows: more row strides than that no longer fit the general registers).
  int64_t v0 = 0;
  for (; v0 + 4 <= nv; v0 += 4) gemm_rows<T, 6, 4>(a, ai, ak, 0, M, b, bk, bj, K, v0, epi);
  if (nv - v0 == 3) gemm_rows<T, 8, 3>(a, ai, ak, 0, M, b, bk, bj, K, v0, epi);
  if (nv - v0 == 2) gemm_rows<T, 8, 2>(a, ai, ak, 0, M, b, bk, bj, K, v0, epi);
  if (nv - v0 == 1) gemm_rows<T, 8, 1>(a, ai, ak, 0, M, b, bk, bj, K, v0, epi);
}

// y = A B for M rows of A (row stride lda, channels contiguous) and a packed B.
template <typename T, typename scalar_a, typename Epi>
void gemm(const scalar_a* A, int64_t lda, int64_t M, const PackedB<T>& B, Epi&& epi) {
  constexpr int L = Lanes<T>::L;
  gemm_strided(A, lda, 1, M, B.data, L, B.K * L, B.nv, B.K, epi);
}


// ------------------------------------------------------------------------------------------
// bfloat16 operands, float32 accumulation, with AVX512_BF16's VDPBF16PS: each instruction
// multiplies 16 lanes of bfloat16 pairs and adds both products to a float32 lane, so one
// instruction does the work of two float32 FMAs. B is packed in k pairs, [nv][K/2][L][2]; a pair
// of A's values (A[m][k], A[m][k+1], adjacent in a pixel row) is broadcast as one 32-bit lane.
// K must be even (a channel count: every SegNeXt width is); callers use the float32 GEMM else.
// ------------------------------------------------------------------------------------------
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define SEGNEXT_GEMM_BF16 1

struct PackedBf16 {
  static constexpr int L = 16;
  int64_t K = 0, N = 0, nv = 0;  // K even
  uint16_t* data = nullptr;
  PackedBf16() = default;
  PackedBf16(const PackedBf16&) = delete;
  PackedBf16& operator=(const PackedBf16&) = delete;
  ~PackedBf16() { std::free(data); }
  int64_t bytes() const { return nv * K * L * 2; }
};

inline void pack_weight(PackedBf16& B, const at::Tensor& weight, int64_t K) {
  constexpr int L = PackedBf16::L;
  const at::Tensor w = weight.reshape({weight.size(0), -1}).to(at::kCPU, at::kBFloat16).contiguous();
  const int64_t N = w.size(0), Kw = w.size(1);
  TORCH_CHECK(Kw <= K && K % 2 == 0, "pack_weight: need K even and >= ", Kw, ", got ", K);
  B.K = K, B.N = N, B.nv = ceil_div(N, L);
  std::free(B.data);
  const size_t bytes = round_up(B.nv * K * L * 2, 64);
  B.data = static_cast<uint16_t*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(B.data != nullptr, "pack_weight: cannot allocate ", bytes, " bytes");
  std::fill(B.data, B.data + B.nv * K * L, uint16_t(0));
  const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < Kw; ++k)
      B.data[(((n / L) * (K / 2) + k / 2) * L + n % L) * 2 + k % 2] = wp[n * Kw + k].x;
}

template <int MR, int NV, typename Epi>
inline void gemm_bf16_tile(const c10::BFloat16* a, int64_t lda, const PackedBf16& B, int64_t m0,
                           int64_t v0, Epi& epi) {
  using V = vec_t<float>;
  constexpr int L = PackedBf16::L;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  const c10::BFloat16* ar[MR];
  for (int i = 0; i < MR; ++i) ar[i] = a + (m0 + i) * lda;
  const int64_t K2 = B.K / 2, ps = K2 * L * 2;
  const uint16_t* b = B.data + v0 * ps;
  for (int64_t k2 = 0; k2 < K2; ++k2, b += 2 * L) {
    __m512bh bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = (__m512bh)_mm512_load_si512(b + j * ps);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      uint32_t pair;
      std::memcpy(&pair, ar[i] + 2 * k2, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int j = 0; j < NV; ++j)
        acc[i][j] = reinterpret_cast<V>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(acc[i][j]), av, bv[j]));
    }
  }
  epi(m0, v0, acc);
}

template <int MR, int NV, typename Epi>
inline void gemm_bf16_rows(const c10::BFloat16* a, int64_t lda, int64_t m0, int64_t m1,
                           const PackedBf16& B, int64_t v0, Epi& epi) {
  for (; m0 + MR <= m1; m0 += MR) gemm_bf16_tile<MR, NV>(a, lda, B, m0, v0, epi);
  if constexpr (MR > 1) {
    if (m0 < m1) gemm_bf16_rows<(MR + 1) / 2, NV>(a, lda, m0, m1, B, v0, epi);
  }
}

// y = A B for M rows of bfloat16 A (row stride lda, K contiguous channels) and a packed B;
// the epilogue sees float32 tiles, each (row, vector) once, as gemm's.
template <typename Epi>
void gemm(const c10::BFloat16* A, int64_t lda, int64_t M, const PackedBf16& B, Epi&& epi) {
  if (M <= 0) return;
  int64_t v0 = 0;
  for (; v0 + 4 <= B.nv; v0 += 4) gemm_bf16_rows<6, 4>(A, lda, 0, M, B, v0, epi);
  if (B.nv - v0 == 3) gemm_bf16_rows<8, 3>(A, lda, 0, M, B, v0, epi);
  if (B.nv - v0 == 2) gemm_bf16_rows<8, 2>(A, lda, 0, M, B, v0, epi);
  if (B.nv - v0 == 1) gemm_bf16_rows<8, 1>(A, lda, 0, M, B, v0, epi);
}
#endif  // AVX512_BF16

}  // namespace
}  // namespace segnext
