// Fused MSCA (SegNeXt's multi-scale convolutional attention), CPU forward and backward.
//
//   a   = dw5x5(u) + b0
//   s   = a + sum_k [ V_k(H_k(a) + bh_k) + bv_k ]      k = 7, 11, 21; H_k = 1xk, V_k = kx1
//   out = (W3 s + b3) * u                               W3: dense 1x1 conv (C -> C)
//
// How it runs (docs/kernels.md#msca-cpu):
// * Tasks are (batch, band of output rows), run with at::parallel_for. A task streams down its
//   band: every intermediate lives in per-thread ring buffers of a few rows, so nothing of u's
//   size is written but the result. Neighbouring bands recompute a halo of rows.
// * Internal rows are channel-blocked, [channel block][row][column][L], where L channels fill
//   one 64-byte vector of the accumulation type T (16 float / 8 double) and the channels are
//   zero-padded to a multiple of L. The depthwise loops are whole vectors of GCC/Clang vector
//   extensions, which the compiler lowers to whatever the build targets (AVX-512 with
//   -march=native here; SSE2 pairs otherwise: slower, never wrong). Columns outside the image
//   are zero pad columns of the row buffers and rows outside the image are a shared zero row,
//   so inner loops have fixed trip counts and nothing reads out of bounds. The caller's
//   tensors (contiguous, channels_last or any strides) are read and written row by row in
//   place: NCHW costs no full-size copy, and outputs have empty_like(u)'s strides.
// * H_k and V_k commute (separable, zero-padded), so each branch runs V_k first: one window of
//   21 rows of `a` feeds all three branches. The bias bh_k then becomes the per-row term
//   bh_k * sum_{taps j inside the image} wv_k[j] (beta below).
// * Rows go in blocks of RB: per channel block, the depthwise stages run over the RB rows
//   (that channel block's rings stay in L2), then the 1x1 conv is a register-blocked GEMM on
//   the block's RB*W pixels, then the epilogue.
// * The backward recomputes a and s from u (nothing but u and the weights is saved) and runs
//   the transposed stages in the same stream with fixed lags. Weight gradients are summed per
//   slot of SR rows (a multiple of RB); a slot is written by one task, rows in order, and the
//   slots are reduced in a fixed order, so every result is bitwise identical for any number
//   of threads (band boundaries depend on the thread count; RB and SR do not).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "msca_check.h"
#include "poison.h"
#include "scratch.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace segnext {
namespace {

constexpr int kBranches = msca::kNumBranches;
constexpr int kStripK[kBranches] = {msca::strip_size(0), msca::strip_size(1), msca::strip_size(2)};
constexpr int kStripOffset[kBranches] = {0, 7, 18};  // tap offsets of the branches in 39 taps
constexpr int kStripTaps = 39;
static_assert(kStripOffset[2] + kStripK[2] == kStripTaps && kStripOffset[1] == kStripK[0] &&
              kStripOffset[2] == kStripK[0] + kStripK[1]);
constexpr int kHalo = 10;  // the largest strip's half width
constexpr int kPad0 = 2;   // dw5x5's half width
constexpr int kVRows = 4;  // output rows per call of the vertical strips


thread_local ThreadScratch tls_scratch;  // (scratch.h)

// Rows of one quantity for every channel block: [cb][slot][pad + W + pad][L].
// row(cb, r) points at column 0 of image row r; columns -pad..-1 and W..W+pad-1 are zeros.
template <typename T>
struct RowRing {
  static constexpr int L = Lanes<T>::L;
  T* base = nullptr;
  int64_t slots = 1, W = 0, pad = 0, row_stride = 0, cb_stride = 0, ncb = 0;

  void carve(Carver& cv, int64_t ncb_, int64_t slots_, int64_t W_, int64_t pad_) {
    ncb = ncb_, slots = slots_, W = W_, pad = pad_;
    row_stride = (W + 2 * pad) * L;
    cb_stride = slots * row_stride;
    base = cv.take<T>(ncb * cb_stride);
  }
  T* row(int64_t cb, int64_t r) const {
    return base + cb * cb_stride + (r % slots) * row_stride + pad * L;
  }
  // row(0, r), recomputed only when r changes (the ring's modulo is a division).
  struct Cursor {
    const RowRing& ring;
    int64_t r = -1;
    T* p = nullptr;
    T* row(int64_t cb, int64_t rr) {
      if (rr != r) r = rr, p = ring.row(0, rr);
      return p + cb * ring.cb_stride;
    }
  };
  void zero_pads() const {
    if (pad == 0) return;
    for (int64_t i = 0; i < ncb * slots; ++i) {
      T* p = base + i * row_stride;
      std::memset(p, 0, pad * L * sizeof(T));
      std::memset(p + (pad + W) * L, 0, pad * L * sizeof(T));
    }
  }
};

// A block of RB rows, [cb][row][W][L]: the GEMM operand layout (pixel m = row * W + w).
template <typename T>
struct RowBlock {
  static constexpr int L = Lanes<T>::L;
  T* base = nullptr;
  int64_t cb_stride = 0, W = 0;
  void carve(Carver& cv, int64_t ncb, int64_t rows, int64_t W_) {
    W = W_;
    cb_stride = rows * W * L;
    base = cv.take<T>(ncb * cb_stride);
  }
  T* row(int64_t cb, int64_t i) const { return base + cb * cb_stride + i * W * L; }
};

// ------------------------------------------------------------------------------------------
// Weights, packed once per call into the accumulation type: depthwise taps as [cb][tap][L],
// per-channel vectors as [Cp], the 1x1 weight as [Cp][Cp] both ways round; zero padded.
// ------------------------------------------------------------------------------------------
template <typename T>
struct PackedWeights {
  static constexpr int L = Lanes<T>::L;
  int64_t C = 0, Cp = 0, ncb = 0;
  at::Tensor storage;
  T *w0 = nullptr, *w0_flip = nullptr;  // [cb][25][L]
  T *wh = nullptr, *wh_flip = nullptr;  // [cb][39][L]: the three 1xk kernels, taps 0..38
  T *wv = nullptr, *wv_flip = nullptr;  // [cb][39][L]: the three kx1 kernels
  T *b0 = nullptr, *bh = nullptr, *bv = nullptr, *b3 = nullptr;  // [Cp], bh/bv: [3][Cp]
  T *w3t = nullptr;                     // [Cp][Cp], w3t[k][n] = W3[n][k]  (y = s w3t)
  T *w3 = nullptr;                      // [Cp][Cp], w3[n][k] = W3[n][k]   (g_s = e w3)

  const T* w0_cb(int64_t cb, bool flip) const { return (flip ? w0_flip : w0) + cb * 25 * L; }
  const T* wh_cb(int64_t cb, int br, bool flip) const {
    return (flip ? wh_flip : wh) + (cb * kStripTaps + kStripOffset[br]) * L;
  }
  const T* wv_cb(int64_t cb, int br, bool flip) const {
    return (flip ? wv_flip : wv) + (cb * kStripTaps + kStripOffset[br]) * L;
  }
};

// w: the 16 weights of msca_weights.h (already converted to T, contiguous).
template <typename T>
PackedWeights<T> pack_weights(const std::vector<at::Tensor>& w, int64_t C, bool backward) {
  constexpr int L = Lanes<T>::L;
  PackedWeights<T> pw;
  pw.C = C;
  pw.Cp = round_up(C, L);
  pw.ncb = pw.Cp / L;
  const int64_t Cp = pw.Cp, ncb = pw.ncb;
  Carver sizing(nullptr);
  const int64_t n_dw0 = ncb * 25 * L, n_strip = ncb * kStripTaps * L;
  sizing.take<T>(n_dw0), sizing.take<T>(n_dw0), sizing.take<T>(n_strip), sizing.take<T>(n_strip);
  sizing.take<T>(n_strip), sizing.take<T>(n_strip), sizing.take<T>(Cp), sizing.take<T>(3 * Cp);
  sizing.take<T>(3 * Cp), sizing.take<T>(Cp), sizing.take<T>(Cp * Cp);
  if (backward) sizing.take<T>(Cp * Cp);
  pw.storage = at::zeros({sizing.used()}, at::TensorOptions().dtype(at::kByte));
  Carver cv(reinterpret_cast<char*>(pw.storage.data_ptr()));
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(pw.storage.data_ptr()) % 64 == 0);
  pw.w0 = cv.take<T>(n_dw0), pw.w0_flip = cv.take<T>(n_dw0);
  pw.wh = cv.take<T>(n_strip), pw.wh_flip = cv.take<T>(n_strip);
  pw.wv = cv.take<T>(n_strip), pw.wv_flip = cv.take<T>(n_strip);
  pw.b0 = cv.take<T>(Cp), pw.bh = cv.take<T>(3 * Cp), pw.bv = cv.take<T>(3 * Cp);
  pw.b3 = cv.take<T>(Cp), pw.w3t = cv.take<T>(Cp * Cp);
  if (backward) pw.w3 = cv.take<T>(Cp * Cp);

  auto tap = [&](int64_t c, int64_t t) { return (c / L * kStripTaps + t) * L + c % L; };
  const T* w0 = w[msca::kW0].data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    for (int t = 0; t < 25; ++t) {
      pw.w0[(c / L * 25 + t) * L + c % L] = w0[c * 25 + t];
      pw.w0_flip[(c / L * 25 + t) * L + c % L] = w0[c * 25 + 24 - t];  // both axes flipped
    }
    pw.b0[c] = w[msca::kB0].data_ptr<T>()[c];
    for (int br = 0; br < kBranches; ++br) {
      const int K = kStripK[br], off = kStripOffset[br];
      const int hc = msca::strip_conv(br, false), vc = msca::strip_conv(br, true);
      const T* wk1 = w[msca::weight_index(hc)].data_ptr<T>() + c * K;  // (C,1,1,K)
      const T* wk2 = w[msca::weight_index(vc)].data_ptr<T>() + c * K;  // (C,1,K,1)
      for (int j = 0; j < K; ++j) {
        pw.wh[tap(c, off + j)] = wk1[j];
        pw.wh_flip[tap(c, off + j)] = wk1[K - 1 - j];
        pw.wv[tap(c, off + j)] = wk2[j];
        pw.wv_flip[tap(c, off + j)] = wk2[K - 1 - j];
      }
      pw.bh[br * Cp + c] = w[msca::bias_index(hc)].data_ptr<T>()[c];
      pw.bv[br * Cp + c] = w[msca::bias_index(vc)].data_ptr<T>()[c];
    }
    pw.b3[c] = w[msca::kB3].data_ptr<T>()[c];
  }
  // W3 (C,C,1,1) = [n][k], both ways round, in tiles: a plain transposing loop would miss
  // cache on every write once C is a few hundred.
  const T* w3 = w[msca::kW3].data_ptr<T>();
  constexpr int64_t TB = 16;
  for (int64_t n0 = 0; n0 < C; n0 += TB) {
    for (int64_t k0 = 0; k0 < C; k0 += TB) {
      const int64_t n1 = std::min(C, n0 + TB), k1 = std::min(C, k0 + TB);
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t k = k0; k < k1; ++k) {
          pw.w3t[k * Cp + n] = w3[n * C + k];
          if (backward) pw.w3[n * Cp + k] = w3[n * C + k];
        }
      }
    }
  }
  return pw;
}

// The per-row bias of the branch sum for row h of an image of H rows: for each branch,
// bh * (sum of the kx1 taps that land inside the image) + bv.
template <typename T>
inline vec_t<T> branch_bias(const PackedWeights<T>& pw, int64_t cb, int64_t h, int64_t H) {
  constexpr int L = Lanes<T>::L;
  vec_t<T> beta = vec_t<T>{};
  for (int br = 0; br < kBranches; ++br) {
    const int K = kStripK[br], p = K / 2;
    const T* wv = pw.wv_cb(cb, br, false);
    vec_t<T> taps = vec_t<T>{};
    const int j0 = static_cast<int>(std::max<int64_t>(0, p - h));
    const int j1 = static_cast<int>(std::min<int64_t>(K, H - h + p));
    for (int j = j0; j < j1; ++j) taps += vload(wv + j * L);
    beta += vload(pw.bh + br * pw.Cp + cb * L) * taps + vload(pw.bv + br * pw.Cp + cb * L);
  }
  return beta;
}

// ------------------------------------------------------------------------------------------
// Row kernels (one channel block; rows are W vectors; `in` rows carry zero pad columns).
// ------------------------------------------------------------------------------------------

// out[w] = bias + init[w] + sum_{i,j<5} k[5i+j] * in[i][w+j-2]. in[i]: rows r-2..r+2 (zero row
// outside the image), padded by >= 2 columns. bias/init may be null.
template <typename T>
void conv5x5_row(T* out, const T* const in[5], const T* k, const NoDeduce<T>* bias,
                 const NoDeduce<T>* init, int64_t W) {
  constexpr int L = Lanes<T>::L;
  constexpr int WB = 8;  // independent accumulators: enough to hide the FMA latency
  using V = vec_t<T>;
  const V b = bias ? vload(bias) : V{};
  auto block = [&](int64_t w, auto nw_tag) {
    constexpr int NW = decltype(nw_tag)::value;
    V acc[NW];
    for (int x = 0; x < NW; ++x) acc[x] = init ? b + vload(init + (w + x) * L) : b;
    for (int i = 0; i < 5; ++i) {
      const T* r = in[i] + (w - kPad0) * L;
#pragma GCC unroll 5
      for (int j = 0; j < 5; ++j) {
        const V kk = vload(k + (5 * i + j) * L);
#pragma GCC unroll 8
        for (int x = 0; x < NW; ++x) acc[x] += kk * vload(r + (x + j) * L);
      }
    }
    for (int x = 0; x < NW; ++x) vstore(out + (w + x) * L, acc[x]);
  };
  int64_t w = 0;
  for (; w + WB <= W; w += WB) block(w, std::integral_constant<int, WB>{});
  for (; w < W; ++w) block(w, std::integral_constant<int, 1>{});
}

// acc[x] += sum_{j<K} k[j] * in[w + x + j - K/2], x < NW (in padded by >= K/2 columns).
template <int K, int NW, typename T>
inline void hconv_acc(vec_t<T>* acc, const T* in, const T* k, int64_t w) {
  constexpr int L = Lanes<T>::L;
  const T* base = in + (w - K / 2) * L;
#pragma GCC unroll 21
  for (int j = 0; j < K; ++j) {
    const vec_t<T> kk = vload(k + j * L);
#pragma GCC unroll 8
    for (int x = 0; x < NW; ++x) acc[x] += kk * vload(base + (x + j) * L);
  }
}

template <int NW, typename F>
inline void for_w_blocks(int64_t W, F&& f) {
  int64_t w = 0;
  for (; w + NW <= W; w += NW) f(w, std::integral_constant<int, NW>{});
  for (; w < W; ++w) f(w, std::integral_constant<int, 1>{});
}

// The three vertical strips for NH consecutive output rows:
//   acc_k[i][w] = sum_{t<K} k_k[t] * rows_k[i + t][w],   rows_k: K + NH - 1 input rows,
// handed to out(i, w, acc7, acc11, acc21). Each loaded input vector feeds up to 3 * NH FMAs:
// one output row at a time, the vertical strips would be bound by L2 bandwidth (every input
// line would serve a single output row). Per output element the taps are summed in the same
// order for any NH, so results do not depend on how rows are grouped.
// kShared: rows7/rows11 are the centred subsets of rows21 (one window of `a`; loads shared).
template <int NH, bool kShared, typename T, typename Out>
void strip_vertical3_rows(const T* const* rows7, const T* const* rows11, const T* const* rows21,
                          const T* k7, const T* k11, const T* k21, int64_t W, const Out& out) {
  constexpr int L = Lanes<T>::L;
  constexpr int NW = NH >= 4 ? 2 : 4;  // accumulators: 3 * NH * NW <= 24
  using V = vec_t<T>;
  for_w_blocks<NW>(W, [&](int64_t w, auto nw_tag) {
    constexpr int BW = decltype(nw_tag)::value;
    V a7[NH][BW] = {}, a11[NH][BW] = {}, a21[NH][BW] = {};
    // Walk the 21-strip's rows; the 11- and 7-strips' rows are the centred subsets.
#pragma GCC unroll 32
    for (int t = 0; t < 2 * kHalo + NH; ++t) {
      V x[BW];
      for (int c = 0; c < BW; ++c) x[c] = vload(rows21[t] + (w + c) * L);
      V x11[BW], x7[BW];
      for (int c = 0; c < BW; ++c) x11[c] = x7[c] = x[c];
      if (!kShared && t >= 5 && t < 15 + NH)
        for (int c = 0; c < BW; ++c) x11[c] = vload(rows11[t - 5] + (w + c) * L);
      if (!kShared && t >= 7 && t < 13 + NH)
        for (int c = 0; c < BW; ++c) x7[c] = vload(rows7[t - 7] + (w + c) * L);
#pragma GCC unroll 8
      for (int i = 0; i < NH; ++i) {
        const int j = t - i;
        if (j >= 0 && j < 21) {
          const V k = vload(k21 + j * L);
          for (int c = 0; c < BW; ++c) a21[i][c] += k * x[c];
        }
        if (j >= 5 && j < 16) {
          const V k = vload(k11 + (j - 5) * L);
          for (int c = 0; c < BW; ++c) a11[i][c] += k * x11[c];
        }
        if (j >= 7 && j < 14) {
          const V k = vload(k7 + (j - 7) * L);
          for (int c = 0; c < BW; ++c) a7[i][c] += k * x7[c];
        }
      }
    }
    for (int i = 0; i < NH; ++i)
      for (int c = 0; c < BW; ++c) out(i, w + c, a7[i][c], a11[i][c], a21[i][c]);
  });
}

// Forward horizontal strips and the sum: s[w] = a[w] + beta + sum_k H_k(z_k)[w].
template <typename T>
void strip_horizontal3_sum_row(T* s, const T* a, vec_t<T> beta, const T* const z[3],
                               const PackedWeights<T>& pw, int64_t cb, int64_t W) {
  constexpr int L = Lanes<T>::L;
  using V = vec_t<T>;
  const T* k7 = pw.wh_cb(cb, 0, false);
  const T* k11 = pw.wh_cb(cb, 1, false);
  const T* k21 = pw.wh_cb(cb, 2, false);
  for_w_blocks<8>(W, [&](int64_t w, auto nw_tag) {
    constexpr int NW = decltype(nw_tag)::value;
    V acc[NW];
    for (int x = 0; x < NW; ++x) acc[x] = vload(a + (w + x) * L) + beta;
    hconv_acc<7, NW>(acc, z[0], k7, w);
    hconv_acc<11, NW>(acc, z[1], k11, w);
    hconv_acc<21, NW>(acc, z[2], k21, w);
    for (int x = 0; x < NW; ++x) vstore(s + (w + x) * L, acc[x]);
  });
}

// out[w] = sum_j k[j] in[w + j - K/2] (one strip; the transposed H_k with flipped taps).
template <int K, typename T>
void strip_horizontal_row(T* out, const T* in, const T* k, int64_t W) {
  constexpr int L = Lanes<T>::L;
  using V = vec_t<T>;
  for_w_blocks<8>(W, [&](int64_t w, auto nw_tag) {
    constexpr int NW = decltype(nw_tag)::value;
    V acc[NW] = {};
    hconv_acc<K, NW>(acc, in, k, w);
    for (int x = 0; x < NW; ++x) vstore(out + (w + x) * L, acc[x]);
  });
}

// Weight-gradient correlations. Each adds one row's contribution to g (K vectors).
// Horizontal: g[j] += sum_w d[w] * x[w + j - K/2] (x padded by >= K/2 columns).
template <int K, typename T>
void corr_horizontal_row(T* g, const T* d, const T* x, int64_t W) {
  constexpr int L = Lanes<T>::L;
  using V = vec_t<T>;
  V acc[K] = {};
  const T* xb = x - (K / 2) * L;
  for (int64_t w = 0; w < W; ++w) {
    const V dv = vload(d + w * L);
#pragma GCC unroll 21
    for (int j = 0; j < K; ++j) acc[j] += dv * vload(xb + (w + j) * L);
  }
  for (int j = 0; j < K; ++j) vstore(g + j * L, vload(g + j * L) + acc[j]);
}

// Vertical, NH rows of d at once: g[t] += sum_i sum_w d[i][w] * rows[i + t][w] (K + NH - 1
// rows). Sums in a different order for each NH: callers group rows the same way always.
template <int K, int NH, typename T>
void corr_vertical_rows(T* g, const T* const* d, const T* const* rows, int64_t W) {
  constexpr int L = Lanes<T>::L;
  using V = vec_t<T>;
  V acc[K] = {};
  for (int64_t w = 0; w < W; ++w) {
    V dv[NH];
    for (int i = 0; i < NH; ++i) dv[i] = vload(d[i] + w * L);
#pragma GCC unroll 32
    for (int s = 0; s < K + NH - 1; ++s) {
      const V x = vload(rows[s] + w * L);
#pragma GCC unroll 8
      for (int i = 0; i < NH; ++i) {
        const int t = s - i;
        if (t >= 0 && t < K) acc[t] += dv[i] * x;
      }
    }
  }
  for (int t = 0; t < K; ++t) vstore(g + t * L, vload(g + t * L) + acc[t]);
}

// 5x5: g[5i+j] += sum_w d[w] * in[i][w + j - 2].
template <typename T>
void corr_5x5_row(T* g, const T* d, const T* const in[5], int64_t W) {
  constexpr int L = Lanes<T>::L;
  using V = vec_t<T>;
  V acc[25] = {};
  for (int64_t w = 0; w < W; ++w) {
    const V dv = vload(d + w * L);
#pragma GCC unroll 5
    for (int i = 0; i < 5; ++i) {
      const T* r = in[i] + (w - kPad0) * L;
#pragma GCC unroll 5
      for (int j = 0; j < 5; ++j) acc[5 * i + j] += dv * vload(r + j * L);
    }
  }
  for (int t = 0; t < 25; ++t) vstore(g + t * L, vload(g + t * L) + acc[t]);
}

// sum over the row's columns (a bias gradient's contribution).
template <typename T>
inline void row_sum(T* out, const T* d, int64_t W) {
  constexpr int L = Lanes<T>::L;
  vec_t<T> acc = vec_t<T>{};
  for (int64_t w = 0; w < W; ++w) acc += vload(d + w * L);
  vstore(out, acc);
}

// ------------------------------------------------------------------------------------------
// The 1x1 conv as register-blocked GEMMs on a block of M pixels.
// ------------------------------------------------------------------------------------------

// y[m][nb] = sum_{k<C} A[kb][m][kl] * Bp[k][nb*L..] for m < M, nb < ncb, handed over a tile
// at a time to epi(m0, nb0, acc), acc[i][j] = y[m0 + i][nb0 + j] (vectors of L channels).
// A is channel-blocked ([cb][m][L], block stride bs), Bp packed [Cp][Cp].
template <typename T, int MR, int NR, typename Epi>
inline void gemm_cb_tile(const T* A, const T* Bp, int64_t bs, int64_t Cp, int64_t C, int64_t m0,
                         int64_t nb0, const Epi& epi) {
  constexpr int L = Lanes<T>::L;
  using V = vec_t<T>;
  V acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = V{};
  const int64_t nkb = ceil_div(C, L);
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const T* a = A + kb * bs + m0 * L;
    const int kl_end = static_cast<int>(std::min<int64_t>(L, C - kb * L));
    const T* brow = Bp + kb * L * Cp + nb0 * L;
    for (int kl = 0; kl < kl_end; ++kl, brow += Cp) {
      V bv[NR];
      for (int j = 0; j < NR; ++j) bv[j] = vload(brow + j * L);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const V ai = vsplat(a[i * L + kl]);
        for (int j = 0; j < NR; ++j) acc[i][j] += ai * bv[j];
      }
    }
  }
  epi(m0, nb0, acc);
}

// The epilogue may run twice for some pixels (the last tile overlaps the previous one): it
// must only write, as a function of (m, nb, y).
// (Tiles, not single vectors, go to the epilogue so that it finds a pixel's row and column
// with one division per tile: a division per vector costs more than the FMAs at small C.)
template <typename T, typename Epi>
void gemm_cb(const T* A, const T* Bp, int64_t bs, int64_t Cp, int64_t C, int64_t M,
             const Epi& epi) {
  constexpr int L = Lanes<T>::L;
  const int64_t ncb = Cp / L;
  auto run = [&](int64_t nb0, auto mr_tag, auto nr_tag) {
    constexpr int MR = decltype(mr_tag)::value, NR = decltype(nr_tag)::value;
    if (M >= MR) {
      for (int64_t m0 = 0; m0 < M; m0 += MR)
        gemm_cb_tile<T, MR, NR>(A, Bp, bs, Cp, C, std::min(m0, M - MR), nb0, epi);
    } else {
      for (int64_t m0 = 0; m0 < M; ++m0) gemm_cb_tile<T, 1, NR>(A, Bp, bs, Cp, C, m0, nb0, epi);
    }
  };
  // Register tiles: 6 pixels x 4 vectors (24 accumulators), then 8 x 2, 8 x 1 for the rest.
  int64_t nb0 = 0;
  for (; nb0 + 4 <= ncb; nb0 += 4)
    run(nb0, std::integral_constant<int, 6>{}, std::integral_constant<int, 4>{});
  for (; nb0 + 2 <= ncb; nb0 += 2)
    run(nb0, std::integral_constant<int, 8>{}, std::integral_constant<int, 2>{});
  if (nb0 < ncb) run(nb0, std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{});
}

template <typename Acc>
constexpr int tile_rows = std::extent_v<std::remove_reference_t<Acc>, 0>;
template <typename Acc>
constexpr int tile_vecs = std::extent_v<std::remove_reference_t<Acc>, 1>;

// Epilogue: store into a channel-blocked block Y ([cb][m][L], block stride bs).
template <typename T>
struct StoreBlocked {
  T* Y;
  int64_t bs;
  template <typename Acc>
  void operator()(int64_t m0, int64_t nb0, const Acc& acc) const {
    for (int i = 0; i < tile_rows<Acc>; ++i)
      for (int j = 0; j < tile_vecs<Acc>; ++j)
        vstore(Y + (nb0 + j) * bs + (m0 + i) * Lanes<T>::L, acc[i][j]);
  }
};

// f(i, r, w) for the pixels m0 + i (i < n) of a block W columns wide: r = m / W, w = m % W,
// with one division.
template <typename F>
inline void for_tile_pixels(int64_t m0, int n, int64_t W, F&& f) {
  int64_t r = m0 / W, w = m0 - r * W;
  for (int i = 0; i < n; ++i) {
    f(i, r, w);
    if (++w == W) w = 0, ++r;
  }
}

// G[n][k] += sum_{m<M} E[n][m] * S[m][k] (E, S channel-blocked, G [Cp][Cp]); the 1x1
// weight's gradient over a block of pixels, summed over m in order.
template <typename T, int MR, int NR>
inline void gemm_tn_tile(const T* E, const T* S, T* G, int64_t bs, int64_t Cp, int64_t M,
                         int64_t n0, int64_t kb0) {
  constexpr int L = Lanes<T>::L;
  using V = vec_t<T>;
  V acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = V{};
  const T* e = E + (n0 / L) * bs + n0 % L;
  const T* s = S + kb0 * bs;
  for (int64_t m = 0; m < M; ++m) {
    V sv[NR];
    for (int j = 0; j < NR; ++j) sv[j] = vload(s + j * bs + m * L);
    for (int i = 0; i < MR; ++i) {
      const V ei = vsplat(e[m * L + i]);
      for (int j = 0; j < NR; ++j) acc[i][j] += ei * sv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      T* g = G + (n0 + i) * Cp + (kb0 + j) * L;
      vstore(g, vload(g) + acc[i][j]);
    }
}

template <typename T>
void gemm_tn(const T* E, const T* S, T* G, int64_t bs, int64_t Cp, int64_t C, int64_t M) {
  constexpr int L = Lanes<T>::L;
  constexpr int MR = 8;  // divides L: n tiles never straddle channel blocks
  const int64_t ncb = Cp / L;
  for (int64_t n0 = 0; n0 < C; n0 += MR) {
    // 8 x 3 register tiles (24 accumulators), then 8 x 2, 8 x 1.
    int64_t kb0 = 0;
    for (; kb0 + 3 <= ncb; kb0 += 3) gemm_tn_tile<T, MR, 3>(E, S, G, bs, Cp, M, n0, kb0);
    for (; kb0 + 2 <= ncb; kb0 += 2) gemm_tn_tile<T, MR, 2>(E, S, G, bs, Cp, M, n0, kb0);
    if (kb0 < ncb) gemm_tn_tile<T, MR, 1>(E, S, G, bs, Cp, M, n0, kb0);
  }
}

// ------------------------------------------------------------------------------------------
// Moving rows between the caller's tensors (any strides) and channel-blocked rows.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
struct Strided {
  scalar_t* p;
  int64_t sb, sc, sh, sw;
  Strided(const at::Tensor& t)  // NOLINT
      : p(t.data_ptr<std::remove_const_t<scalar_t>>()),
        sb(t.stride(0)), sc(t.stride(1)), sh(t.stride(2)), sw(t.stride(3)) {}
  scalar_t* at(int64_t b, int64_t c, int64_t h, int64_t w) const {
    return p + b * sb + c * sc + h * sh + w * sw;
  }
};

// dst[w][l] = src[b, c0 + l, h, w] for l < nl, 0 for the padding lanes.
template <typename T, typename scalar_t>
void load_row(T* dst, const Strided<const scalar_t>& src, int64_t b, int64_t h, int64_t c0,
              int nl, int64_t W) {
  constexpr int L = Lanes<T>::L;
  const scalar_t* s = src.at(b, c0, h, 0);
  if (src.sc == 1 && nl == L) {  // channels-last, a whole vector of channels
    for (int64_t w = 0; w < W; ++w) {
      const scalar_t* sp = s + w * src.sw;
      __builtin_prefetch(sp + src.sh);  // rows are loaded in order: fetch the next one early
      vstore(dst + w * L, load_lanes<T>(sp));
    }
  } else if (src.sc == 1) {  // channels-last: one pixel's channels are contiguous
    for (int64_t w = 0; w < W; ++w) vstore(dst + w * L, load_lanes<T>(s + w * src.sw, nl));
  } else {  // NCHW (or any other strides): walk each channel's row
    for (int l = 0; l < nl; ++l) {
      const scalar_t* sp = s + l * src.sc;
      for (int64_t w = 0; w < W; ++w) dst[w * L + l] = static_cast<T>(sp[w * src.sw]);
    }
    for (int l = nl; l < L; ++l)
      for (int64_t w = 0; w < W; ++w) dst[w * L + l] = T(0);
  }
}

// dst[b, c0 + l, h, w] = f(w, l) for l < nl.
template <typename scalar_t, typename F>
inline void store_row(const Strided<scalar_t>& dst, int64_t b, int64_t h, int64_t c0, int nl,
                      int64_t W, F&& f) {
  scalar_t* d = dst.at(b, c0, h, 0);
  if (dst.sc == 1) {
    for (int64_t w = 0; w < W; ++w)
      for (int l = 0; l < nl; ++l) d[w * dst.sw + l] = static_cast<scalar_t>(f(w, l));
  } else {
    for (int l = 0; l < nl; ++l)
      for (int64_t w = 0; w < W; ++w) d[l * dst.sc + w * dst.sw] = static_cast<scalar_t>(f(w, l));
  }
}

// dst[b, c0 + l, h, w] = row[w][l] for l < nl.
template <typename T, typename scalar_t>
void store_row_values(const Strided<scalar_t>& dst, int64_t b, int64_t h, int64_t c0, int nl,
                      int64_t W, const T* row) {
  constexpr int L = Lanes<T>::L;
  if (dst.sc == 1 && nl == L) {
    scalar_t* d = dst.at(b, c0, h, 0);
    for (int64_t w = 0; w < W; ++w) store_lanes<T>(d + w * dst.sw, vload(row + w * L));
    return;
  }
  store_row(dst, b, h, c0, nl, W, [&](int64_t w, int l) { return row[w * L + l]; });
}

// The forward's epilogue: out[b, c0 + l, h, w] = (y[w][l] + b3[l]) * u[w][l] (u: the ring row).
template <typename T, typename scalar_t>
void gate_store_row(const Strided<scalar_t>& out, int64_t b, int64_t h, int64_t c0, int nl,
                    int64_t W, const T* y, const T* b3, const T* u) {
  constexpr int L = Lanes<T>::L;
  const vec_t<T> bias = vload(b3);
  if (out.sc == 1 && nl == L) {
    scalar_t* o = out.at(b, c0, h, 0);
    for (int64_t w = 0; w < W; ++w)
      store_lanes<T>(o + w * out.sw, (vload(y + w * L) + bias) * vload(u + w * L));
    return;
  }
  store_row(out, b, h, c0, nl, W, [&](int64_t w, int l) {
    return (y[w * L + l] + b3[l]) * u[w * L + l];
  });
}

// ------------------------------------------------------------------------------------------
// Problem geometry and the split into tasks.
// ------------------------------------------------------------------------------------------
struct Plan {
  int64_t B, C, H, W, Cp, ncb;
  int64_t RB;          // rows per block (the GEMM's M = RB * W)
  int64_t SR;          // rows per weight-gradient slot (multiple of RB)
  int64_t band_rows;   // rows per task (multiple of SR)
  int64_t nbands;
  int64_t ntasks() const { return B * nbands; }
};

Plan make_plan(int64_t B, int64_t C, int64_t H, int64_t W, int L, bool backward) {
  Plan p;
  p.B = B, p.C = C, p.H = H, p.W = W;
  p.Cp = round_up(C, L);
  p.ncb = p.Cp / L;
  // Blocks of ~1024 pixels keep the GEMM efficient and the block buffers in L2.
  p.RB = std::clamp<int64_t>(1024 / std::max<int64_t>(W, 1), 1, backward ? 8 : 16);
  // A slot holds a Cp x Cp partial of the 1x1 weight's gradient: give it at least ~Cp pixels
  // so that the slots together are no larger than an activation.
  // A multiple of kVRows too: the backward groups rows in aligned windows of kVRows.
  p.SR = round_up(p.RB * std::max<int64_t>(1, ceil_div(p.Cp, p.RB * W)),
                  std::lcm<int64_t>(p.RB, kVRows));
  // Bands: enough of them that B * nbands is a multiple of the thread count (a balanced
  // split), but no thinner than one slot. This depends on the thread count; results do not.
  const int64_t nt = std::max<int>(1, at::get_num_threads());
  const int64_t want = nt / std::gcd(B, nt);
  p.band_rows = round_up(ceil_div(H, want), p.SR);
  p.nbands = ceil_div(H, p.band_rows);
  return p;
}

// ------------------------------------------------------------------------------------------
// Forward.
// ------------------------------------------------------------------------------------------

// Computes a rows [next_a, target) of channel block cb into a_ring, loading u rows into u_ring
// as they are needed (next_u: the next u row not yet loaded).
template <typename T, typename scalar_t>
struct ARows {
  static constexpr int L = Lanes<T>::L;
  const Plan& p;
  const PackedWeights<T>& pw;
  const Strided<const scalar_t>& u;
  const RowRing<T>& u_ring;
  const RowRing<T>& a_ring;
  const T* zero_row;
  int64_t b;

  void advance(int64_t cb, int64_t& next_a, int64_t& next_u, int64_t target) const {
    const int nl = static_cast<int>(std::min<int64_t>(L, p.C - cb * L));
    for (int64_t i = next_a; i < target; ++i) {
      for (int64_t r = std::max(next_u, i - kPad0); r < std::min(p.H, i + kPad0 + 1); ++r)
        load_row(u_ring.row(cb, r), u, b, r, cb * L, nl, p.W);
      next_u = std::max(next_u, std::min(p.H, i + kPad0 + 1));
      const T* in[5];
      for (int d = 0; d < 5; ++d) {
        const int64_t r = i + d - kPad0;
        in[d] = (r >= 0 && r < p.H) ? u_ring.row(cb, r) : zero_row;
      }
      conv5x5_row(a_ring.row(cb, i), in, pw.w0_cb(cb, false), pw.b0 + cb * L, nullptr, p.W);
    }
    next_a = std::max(next_a, target);
  }
};

// The 21 rows h-10..h+10 of a ring (zero row outside the image).
template <typename T>
inline void window_rows(const T** rows, int n, const RowRing<T>& ring, int64_t cb, int64_t first,
                        int64_t H, const T* zero_row) {
  for (int t = 0; t < n; ++t) {
    const int64_t r = first + t;
    rows[t] = (r >= 0 && r < H) ? ring.row(cb, r) : zero_row;
  }
}

// z_k and s for the n <= kVRows rows h..h+n-1 of channel block cb (a rows h-10..h+n+9 must be
// in a_ring): s = a + beta + sum_k H_k(V_k(a)).
template <typename T>
void strips_and_sum_rows(int64_t h, int n, const RowRing<T>& a_ring, int64_t cb, int64_t H,
                         const T* zero_row, const PackedWeights<T>& pw, T* const z[][3],
                         T* const* s_rows, int64_t W) {
  constexpr int L = Lanes<T>::L;
  const T* rows[2 * kHalo + kVRows];
  window_rows(rows, 2 * kHalo + n, a_ring, cb, h - kHalo, H, zero_row);
  const T* k7 = pw.wv_cb(cb, 0, false);
  const T* k11 = pw.wv_cb(cb, 1, false);
  const T* k21 = pw.wv_cb(cb, 2, false);
  for (int i0 = 0; i0 < n;) {
    auto store = [&](int i, int64_t w, vec_t<T> a7, vec_t<T> a11, vec_t<T> a21) {
      vstore(z[i0 + i][0] + w * L, a7);
      vstore(z[i0 + i][1] + w * L, a11);
      vstore(z[i0 + i][2] + w * L, a21);
    };
    const T* const* r = rows + i0;
    if (n - i0 >= kVRows) {
      strip_vertical3_rows<kVRows, true>(r + 7, r + 5, r, k7, k11, k21, W, store);
      i0 += kVRows;
    } else {
      strip_vertical3_rows<1, true>(r + 7, r + 5, r, k7, k11, k21, W, store);
      i0 += 1;
    }
  }
  for (int i = 0; i < n; ++i)
    strip_horizontal3_sum_row(s_rows[i], a_ring.row(cb, h + i), branch_bias(pw, cb, h + i, H),
                              z[i], pw, cb, W);
}

// A task's buffers, carved from the thread's scratch by carve(Carver&) (run twice: to size,
// then to place them), followed by a zero row of W + 2 * kHalo columns (the rows outside the
// image). Returns the zero row's column 0.
template <typename T, typename Carve>
const T* carve_task_scratch(int64_t W, const Carve& carve) {
  constexpr int L = Lanes<T>::L;
  Carver sizing(nullptr);
  carve(sizing);
  const int64_t zero_len = (W + 2 * kHalo) * L;
  const int64_t bytes = sizing.used() + round_up(zero_len * sizeof(T), 64);
  Carver cv(static_cast<char*>(tls_scratch.get(bytes)));
  carve(cv);
  T* zero_buf = cv.take<T>(zero_len);
  std::memset(zero_buf, 0, zero_len * sizeof(T));
  return zero_buf + kHalo * L;
}

template <typename T, typename scalar_t>
void msca_forward_band(const Plan& p, const PackedWeights<T>& pw, const Strided<const scalar_t>& u,
                       const Strided<scalar_t>& out, int64_t b, int64_t h0, int64_t h1) {
  constexpr int L = Lanes<T>::L;
  const int64_t H = p.H, W = p.W, ncb = p.ncb, RB = p.RB;

  RowRing<T> u_ring, a_ring, z_rows;
  RowBlock<T> S, Y;
  auto carve = [&](Carver& cv) {
    // u rows from the block's first (its epilogue) to the last one dw5x5 reads.
    u_ring.carve(cv, ncb, RB + kHalo + 2 * kPad0, W, kPad0);
    a_ring.carve(cv, ncb, 2 * kHalo + kVRows, W, 0);
    z_rows.carve(cv, 1, 3 * kVRows, W, kHalo);
    S.carve(cv, ncb, RB, W);
    Y.carve(cv, ncb, RB, W);
  };
  const T* zero_row = carve_task_scratch<T>(W, carve);
  u_ring.zero_pads();
  z_rows.zero_pads();

  const ARows<T, scalar_t> arows{p, pw, u, u_ring, a_ring, zero_row, b};
  int64_t next_a = std::max<int64_t>(0, h0 - kHalo), next_u = std::max<int64_t>(0, next_a - kPad0);
  T* z[kVRows][3];
  for (int i = 0; i < kVRows; ++i)
    for (int br = 0; br < kBranches; ++br) z[i][br] = z_rows.row(0, 3 * i + br);
  const bool gate_in_gemm = out.sc == 1 && p.C % L == 0;

  for (int64_t hb = h0; hb < h1; hb += RB) {
    const int64_t he = std::min(h1, hb + RB);
    int64_t na = next_a, nu = next_u;
    for (int64_t cb = 0; cb < ncb; ++cb) {
      na = next_a, nu = next_u;
      for (int64_t h = hb; h < he; h += kVRows) {
        const int n = static_cast<int>(std::min<int64_t>(kVRows, he - h));
        arows.advance(cb, na, nu, std::min(H, h + n + kHalo));
        T* s_rows[kVRows];
        for (int i = 0; i < n; ++i) s_rows[i] = S.row(cb, h - hb + i);
        strips_and_sum_rows(h, n, a_ring, cb, H, zero_row, pw, z, s_rows, W);
      }
    }
    next_a = na, next_u = nu;

    const int64_t M = (he - hb) * W;
    if (gate_in_gemm) {
      // out = (y + b3) * u straight from the GEMM's registers (channels-last, full blocks).
      gemm_cb(S.base, pw.w3t, S.cb_stride, p.Cp, p.C, M, [&](int64_t m0, int64_t nb0, const auto& y) {
        typename RowRing<T>::Cursor ur{u_ring};
        for_tile_pixels(m0, tile_rows<decltype(y)>, W, [&](int i, int64_t r, int64_t w) {
          scalar_t* o = out.at(b, 0, hb + r, w);
          for (int j = 0; j < tile_vecs<decltype(y)>; ++j) {
            const int64_t nb = nb0 + j;
            const vec_t<T> g = (y[i][j] + vload(pw.b3 + nb * L)) * vload(ur.row(nb, hb + r) + w * L);
            store_lanes<T>(o + nb * L, g);
          }
        });
      });
      continue;
    }
    gemm_cb(S.base, pw.w3t, S.cb_stride, p.Cp, p.C, M, StoreBlocked<T>{Y.base, Y.cb_stride});

    for (int64_t cb = 0; cb < ncb; ++cb) {
      const int nl = static_cast<int>(std::min<int64_t>(L, p.C - cb * L));
      const T* b3 = pw.b3 + cb * L;
      for (int64_t h = hb; h < he; ++h)
        gate_store_row(out, b, h, cb * L, nl, W, Y.row(cb, h - hb), b3, u_ring.row(cb, h));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward.
//
// Stream of one task, by g_s row h (the row whose 1x1 conv runs in the current block):
//   a row h+10        (from u rows h+8..h+12)                      pre-GEMM
//   z_k, s row h      (a rows h-10..h+10)                          pre-GEMM
//   y, e = g*u, g_s = W3^T e, gW3 += e s^T                          GEMM on the block
//   gz_21 row h, gz_11 row h-5, gz_7 row h-7  (H_k^T g_s), gwh += corr(g_s, z), gwv += corr(gz, a)
//   g_a row h-10 = g_s + sum_k V_k^T gz_k,   gw0 += corr(g_a, u)
//   g_u row h-12 = g*y + dw5^T g_a
// Weight-gradient terms are added only for rows the task owns ([h0, h1)), into the slot of
// the row; rows of the halo are computed for the values they feed, not summed.
// ------------------------------------------------------------------------------------------
template <typename T>
struct GradSlots {
  static constexpr int L = Lanes<T>::L;
  int64_t Cp = 0, ncb = 0, per_slot = 0, slots_per_image = 0, SR = 1;
  T* base = nullptr;
  // Offsets inside a slot.
  int64_t o_w3 = 0, o_w0 = 0, o_wh = 0, o_wv = 0;

  void init(const Plan& p, T* storage) {
    Cp = p.Cp, ncb = p.ncb, SR = p.SR;
    slots_per_image = ceil_div(p.H, p.SR);
    o_w3 = 0;
    o_w0 = Cp * Cp;
    o_wh = o_w0 + ncb * 25 * L;
    o_wv = o_wh + ncb * kStripTaps * L;
    per_slot = o_wv + ncb * kStripTaps * L;
    base = storage;
  }
  static int64_t size(const Plan& p) {
    const int64_t per = p.Cp * p.Cp + p.ncb * (25 + 2 * kStripTaps) * Lanes<T>::L;
    return p.B * ceil_div(p.H, p.SR) * per;
  }
  T* slot(int64_t b, int64_t h) const { return base + (b * slots_per_image + h / SR) * per_slot; }
  T* w3(int64_t b, int64_t h) const { return slot(b, h) + o_w3; }
  T* w0(int64_t b, int64_t h, int64_t cb) const { return slot(b, h) + o_w0 + cb * 25 * L; }
  T* wh(int64_t b, int64_t h, int64_t cb, int br) const {
    return slot(b, h) + o_wh + (cb * kStripTaps + kStripOffset[br]) * L;
  }
  T* wv(int64_t b, int64_t h, int64_t cb, int br) const {
    return slot(b, h) + o_wv + (cb * kStripTaps + kStripOffset[br]) * L;
  }
};

// Per-row sums over the columns, [B][H][Cp]: of g_s (for the strip biases), of e (b3) and of
// g_a (b0).
template <typename T>
struct RowSums {
  T *gs = nullptr, *e = nullptr, *ga = nullptr;
  int64_t H = 0, Cp = 0;
  T* at(T* base, int64_t b, int64_t h, int64_t cb) const {
    return base + (b * H + h) * Cp + cb * Lanes<T>::L;
  }
};

// One backward task (image b, owned rows [h0, h1)): its buffers and the stages of the stream
// above, each a method; run() drives them block by block.
template <typename T, typename scalar_t>
struct BackwardTask {
  static constexpr int L = Lanes<T>::L;
  static constexpr int NG = kVRows;  // the post-GEMM stage runs in groups of NG rows
  static constexpr int kLagZ[kBranches] = {7, 5, 0};  // gz_k row = h - lag_k  (lag_k + p_k = 10)
  using V = vec_t<T>;

  const Plan& p;
  const PackedWeights<T>& pw;
  const Strided<const scalar_t>& u;
  const Strided<const scalar_t>& g;
  const Strided<scalar_t>& gu;
  const GradSlots<T>& slots;
  const RowSums<T>& sums;
  const int64_t b, h0, h1;
  const int64_t H = p.H, W = p.W, ncb = p.ncb, RB = p.RB, C = p.C;

  RowRing<T> u_ring, a_ring, z_blk[3], gs_ring, gud_ring, gz_ring[3], ga_ring, gu_row;
  RowBlock<T> S, E, G;
  const T* zero_row = nullptr;
  int64_t next_a = 0, next_u = 0;  // the next a and u rows not yet computed / loaded

  BackwardTask(const Plan& p_, const PackedWeights<T>& pw_, const Strided<const scalar_t>& u_,
               const Strided<const scalar_t>& g_, const Strided<scalar_t>& gu_,
               const GradSlots<T>& slots_, const RowSums<T>& sums_, int64_t b_, int64_t h0_,
               int64_t h1_)
      : p(p_), pw(pw_), u(u_), g(g_), gu(gu_), slots(slots_), sums(sums_), b(b_), h0(h0_),
        h1(h1_) {
    zero_row = carve_task_scratch<T>(W, [&](Carver& cv) { carve(cv); });
    u_ring.zero_pads();
    for (auto& r : z_blk) r.zero_pads();
    gs_ring.zero_pads();
    ga_ring.zero_pads();
    // Zero this task's slots (first touch by the thread that fills them).
    for (int64_t h = h0; h < h1; h += p.SR)
      std::memset(slots.slot(b, h), 0, slots.per_slot * sizeof(T));
  }

  void carve(Carver& cv) {
    // Capacities: the span of rows alive at once, for g_s rows h over a block of RB rows and
    // the lagged stages over a group of NG rows (see the stream above).
    u_ring.carve(cv, ncb, RB + 2 * (kHalo + 2 * kPad0), W, kPad0);  // u rows h-12 .. h+12
    a_ring.carve(cv, ncb, RB + 2 * kHalo + NG - 1, W, 0);           // a rows h-13 .. h+10
    for (int br = 0; br < kBranches; ++br) z_blk[br].carve(cv, ncb, RB, W, kHalo);
    S.carve(cv, ncb, RB, W);
    E.carve(cv, ncb, RB, W);
    G.carve(cv, ncb, RB, W);
    // Written by the GEMMs for the whole block while rows down to hb - 10 (g_s) and
    // hb - 12 (g * y) are still to be read.
    gs_ring.carve(cv, ncb, RB + kHalo, W, kHalo);
    gud_ring.carve(cv, ncb, RB + kHalo + kPad0, W, 0);
    for (int br = 0; br < kBranches; ++br) gz_ring[br].carve(cv, ncb, kStripK[br] + NG - 1, W, 0);
    ga_ring.carve(cv, ncb, 2 * kPad0 + NG, W, kPad0);
    gu_row.carve(cv, 1, 1, W, 0);
  }

  bool owned(int64_t r) const { return r >= h0 && r < h1; }
  bool in_image(int64_t r) const { return r >= 0 && r < H; }
  int lanes(int64_t cb) const { return static_cast<int>(std::min<int64_t>(L, C - cb * L)); }

  void run() {
    const ARows<T, scalar_t> arows{p, pw, u, u_ring, a_ring, zero_row, b};
    // g_s rows of the stream: [h0 - 12, h1 + 12); the lagged stages run past the image's end.
    const int64_t hs = std::max<int64_t>(0, h0 - kHalo - kPad0);
    const int64_t hend = h1 + kHalo + kPad0;
    next_a = std::max<int64_t>(0, hs - kHalo), next_u = std::max<int64_t>(0, next_a - kPad0);
    for (int64_t hb = hs; hb < hend;) {
      // Blocks end at multiples of RB so that a block is entirely owned or entirely halo.
      const int64_t he = std::min(hend, (hb / RB + 1) * RB);
      const int64_t he_img = std::min(he, H);  // rows of this block inside the image
      const int64_t nrows = std::max<int64_t>(0, he_img - hb);
      if (nrows > 0) {
        recompute_block(arows, hb, he_img);
        block_gemms(hb, nrows * W, owned(hb));
      }
      for (int64_t cb = 0; cb < ncb; ++cb) {
        for (int64_t hg = hb; hg < he; hg += NG) {
          const int64_t hgn = std::min(he, hg + NG);
          for (int64_t h = hg; h < hgn; ++h) row_stages(cb, h, hb);
          grad_a_rows(cb, hg, hgn);
          grad_u_rows(cb, hg, hgn);
        }
      }
      hb = he;
    }
  }

  // ---- pre-GEMM: recompute s (keeping z) for the block's rows [hb, he_img); e = g * u.
  void recompute_block(const ARows<T, scalar_t>& arows, int64_t hb, int64_t he_img) {
    int64_t na = next_a, nu = next_u;
    for (int64_t cb = 0; cb < ncb; ++cb) {
      na = next_a, nu = next_u;
      const int nl = lanes(cb);
      for (int64_t h = hb; h < he_img; h += kVRows) {
        const int n = static_cast<int>(std::min<int64_t>(kVRows, he_img - h));
        arows.advance(cb, na, nu, std::min(H, h + n + kHalo));
        T* z[kVRows][3];
        T* s_rows[kVRows];
        for (int i = 0; i < n; ++i) {
          for (int br = 0; br < kBranches; ++br) z[i][br] = z_blk[br].row(cb, h - hb + i);
          s_rows[i] = S.row(cb, h - hb + i);
        }
        strips_and_sum_rows(h, n, a_ring, cb, H, zero_row, pw, z, s_rows, W);
      }
      for (int64_t h = hb; h < he_img; ++h) {
        T* gr = G.row(cb, h - hb);
        T* e = E.row(cb, h - hb);
        const T* ur = u_ring.row(cb, h);
        load_row(gr, g, b, h, cb * L, nl, W);
        for (int64_t w = 0; w < W; ++w) vstore(e + w * L, vload(gr + w * L) * vload(ur + w * L));
      }
    }
    next_a = na, next_u = nu;
  }

  // ---- the GEMMs on the block's M pixels: g_s = W3^T e into its ring, gW3 += e s^T (owned
  // blocks), and g_u's direct term g * (W3 s + b3), kept in a ring until its row is finished.
  void block_gemms(int64_t hb, int64_t M, bool block_owned) {
    gemm_cb(E.base, pw.w3, E.cb_stride, p.Cp, C, M, [&](int64_t m0, int64_t nb0, const auto& v) {
      typename RowRing<T>::Cursor gr{gs_ring};
      for_tile_pixels(m0, tile_rows<decltype(v)>, W, [&](int i, int64_t r, int64_t w) {
        for (int j = 0; j < tile_vecs<decltype(v)>; ++j)
          vstore(gr.row(nb0 + j, hb + r) + w * L, v[i][j]);
      });
    });
    if (block_owned) gemm_tn(E.base, S.base, slots.w3(b, hb), E.cb_stride, p.Cp, C, M);
    gemm_cb(S.base, pw.w3t, S.cb_stride, p.Cp, C, M, [&](int64_t m0, int64_t nb0, const auto& y) {
      typename RowRing<T>::Cursor gr{gud_ring};
      for_tile_pixels(m0, tile_rows<decltype(y)>, W, [&](int i, int64_t r, int64_t w) {
        for (int j = 0; j < tile_vecs<decltype(y)>; ++j) {
          const int64_t nb = nb0 + j;
          const V gv = vload(G.row(nb, r) + w * L);
          vstore(gr.row(nb, hb + r) + w * L, gv * (y[i][j] + vload(pw.b3 + nb * L)));
        }
      });
    });
  }

  // ---- post-GEMM, row-local stages of g_s row h (of the block starting at hb): its bias row
  // sums and the 1xk weight gradients corr(g_s, z); then gz_k = H_k^T g_s for row h - lag_k and
  // the kx1 weight gradients corr(gz_k, a).
  void row_stages(int64_t cb, int64_t h, int64_t hb) {
    if (in_image(h) && owned(h)) {
      const T* gs = gs_ring.row(cb, h);
      row_sum(sums.at(sums.gs, b, h, cb), gs, W);
      row_sum(sums.at(sums.e, b, h, cb), E.row(cb, h - hb), W);
      corr_horizontal_row<7>(slots.wh(b, h, cb, 0), gs, z_blk[0].row(cb, h - hb), W);
      corr_horizontal_row<11>(slots.wh(b, h, cb, 1), gs, z_blk[1].row(cb, h - hb), W);
      corr_horizontal_row<21>(slots.wh(b, h, cb, 2), gs, z_blk[2].row(cb, h - hb), W);
    }
    for (int br = 0; br < kBranches; ++br) {
      const int64_t r = h - kLagZ[br];
      const int pk = kStripK[br] / 2;
      if (!in_image(r) || r < h0 - kPad0 - pk || r >= h1 + kPad0 + pk) continue;
      T* gz = gz_ring[br].row(cb, r);
      const T* gsr = gs_ring.row(cb, r);
      const T* kf = pw.wh_cb(cb, br, true);
      if (br == 0) strip_horizontal_row<7>(gz, gsr, kf, W);
      if (br == 1) strip_horizontal_row<11>(gz, gsr, kf, W);
      if (br == 2) strip_horizontal_row<21>(gz, gsr, kf, W);
      if (owned(r)) corr_vertical_window(cb, br, r);
    }
  }

  // The kx1 weight gradient of owned gz rows, in windows of NG rows aligned to multiples of NG
  // (h0 is one), so that the summation order is the same whatever the band split.
  void corr_vertical_window(int64_t cb, int br, int64_t r_last) {
    const int64_t r_end = std::min(r_last + 1, std::min(h1, H));
    if (r_last + 1 != r_end || (r_end % NG != 0 && r_end != std::min(h1, H))) return;
    const int64_t r0 = std::max(h0, (r_end - 1) / NG * NG);
    const int n = static_cast<int>(r_end - r0);
    const int K = kStripK[br], pk = K / 2;
    const T* d[NG];
    const T* rows[21 + NG - 1];
    for (int i = 0; i < n; ++i) d[i] = gz_ring[br].row(cb, r0 + i);
    window_rows(rows, K + n - 1, a_ring, cb, r0 - pk, H, zero_row);
    T* gw = slots.wv(b, r0, cb, br);
    auto run = [&](auto k_tag) {
      constexpr int KK = decltype(k_tag)::value;
      if (n == NG) {
        corr_vertical_rows<KK, NG>(gw, d, rows, W);
      } else {
        for (int i = 0; i < n; ++i) corr_vertical_rows<KK, 1>(gw, d + i, rows + i, W);
      }
    };
    if (br == 0) run(std::integral_constant<int, 7>{});
    if (br == 1) run(std::integral_constant<int, 11>{});
    if (br == 2) run(std::integral_constant<int, 21>{});
  }

  // ---- g_a rows [hg - 10, hgn - 10) = g_s + sum_k V_k^T gz_k, NG rows per call; for owned
  // rows, the b0 row sums and the 5x5 weight gradient corr(g_a, u).
  void grad_a_rows(int64_t cb, int64_t hg, int64_t hgn) {
    const int64_t ra = std::max({hg - kHalo, h0 - kPad0, int64_t(0)});
    const int64_t rb = std::min({hgn - kHalo, h1 + kPad0, H});
    for (int64_t r = ra; r < rb;) {
      const int n = rb - r >= NG ? NG : 1;
      const T* rows7[7 + NG - 1];
      const T* rows11[11 + NG - 1];
      const T* rows21[21 + NG - 1];
      window_rows(rows7, 7 + n - 1, gz_ring[0], cb, r - 3, H, zero_row);
      window_rows(rows11, 11 + n - 1, gz_ring[1], cb, r - 5, H, zero_row);
      window_rows(rows21, 21 + n - 1, gz_ring[2], cb, r - 10, H, zero_row);
      T* ga[NG];
      const T* init[NG];
      for (int i = 0; i < n; ++i) ga[i] = ga_ring.row(cb, r + i), init[i] = gs_ring.row(cb, r + i);
      auto store = [&](int i, int64_t w, V a7, V a11, V a21) {
        vstore(ga[i] + w * L, ((vload(init[i] + w * L) + a7) + a11) + a21);
      };
      const T* k7 = pw.wv_cb(cb, 0, true);
      const T* k11 = pw.wv_cb(cb, 1, true);
      const T* k21 = pw.wv_cb(cb, 2, true);
      if (n == NG) {
        strip_vertical3_rows<NG, false>(rows7, rows11, rows21, k7, k11, k21, W, store);
      } else {
        strip_vertical3_rows<1, false>(rows7, rows11, rows21, k7, k11, k21, W, store);
      }
      for (int i = 0; i < n; ++i) {
        if (!owned(r + i)) continue;
        row_sum(sums.at(sums.ga, b, r + i, cb), ga[i], W);
        const T* in[5];
        window_rows(in, 5, u_ring, cb, r + i - kPad0, H, zero_row);
        corr_5x5_row(slots.w0(b, r + i, cb), ga[i], in, W);
      }
      r += n;
    }
  }

  // ---- g_u rows [hg - 12, hgn - 12) = g * y + dw5^T(g_a), written to the caller's tensor.
  void grad_u_rows(int64_t cb, int64_t hg, int64_t hgn) {
    const int nl = lanes(cb);
    for (int64_t q = std::max(hg - kHalo - kPad0, h0);
         q < std::min({hgn - kHalo - kPad0, h1, H}); ++q) {
      const T* in[5];
      window_rows(in, 5, ga_ring, cb, q - kPad0, H, zero_row);
      T* acc = gu_row.row(0, 0);
      conv5x5_row(acc, in, pw.w0_cb(cb, true), nullptr, gud_ring.row(cb, q), W);
      store_row_values(gu, b, q, cb * L, nl, W, acc);
    }
  }
};

// ------------------------------------------------------------------------------------------
// Entry points.
// ------------------------------------------------------------------------------------------
void check_inputs(const char* op, const at::Tensor& u, at::TensorList w) {
  msca::check_inputs(op, u, w, at::kCPU, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16},
                     "float32, float64, float16 or bfloat16");
}

std::vector<at::Tensor> weights_as(at::TensorList w, at::ScalarType dt) {
  std::vector<at::Tensor> out;
  out.reserve(w.size());
  for (const auto& t : w) out.push_back(t.to(dt).contiguous());
  return out;
}

template <typename F>
void run_tasks(const Plan& p, F&& band) {
  at::parallel_for(0, p.ntasks(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.nbands, h0 = (t % p.nbands) * p.band_rows;
      band(b, h0, std::min(p.H, h0 + p.band_rows));
    }
  });
}

// The weight-gradient slots summed in a fixed order, each element on its own (parallel over
// elements): one slot's worth, [per_slot], in T.
template <typename T>
at::Tensor sum_slots(const GradSlots<T>& slots, int64_t B) {
  constexpr int L = Lanes<T>::L;
  const int64_t nslots = B * slots.slots_per_image;
  at::Tensor total_t = at::empty({slots.per_slot},
                                 at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* total = total_t.data_ptr<T>();
  // per_slot is a multiple of L and the slots are 64-byte aligned: sum whole vectors.
  at::parallel_for(0, slots.per_slot / L, 256, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      vec_t<T> acc = vec_t<T>{};
      for (int64_t s = 0; s < nslots; ++s) acc += vload(slots.base + s * slots.per_slot + v * L);
      vstore(total + v * L, acc);
    }
  });
  return total_t;
}

// The bias gradients, [Cp] per bias, and the bias term of the kx1 weights' gradients (wv_bias,
// [cb][39 taps][L], to be scaled by bh), from the per-row sums: with P(h) = sum_b rowsum_gs(b, h),
// gbv = sum_h P(h), gbh = sum_h P(h) * (sum of the kx1 taps inside the image at row h),
// gwv_bias[tap] = sum of P(h) over the rows h where the tap lands inside the image.
template <typename T>
struct BiasGrads {
  std::vector<T> b3, b0, bv, bh, wv_bias;
};

template <typename T>
BiasGrads<T> bias_grads(const Plan& p, const PackedWeights<T>& pw, const RowSums<T>& sums) {
  constexpr int L = Lanes<T>::L;
  const int64_t B = p.B, H = p.H, Cp = p.Cp, ncb = p.ncb;
  BiasGrads<T> g;
  g.b3.assign(Cp, T(0)), g.b0.assign(Cp, T(0)), g.bv.assign(Cp, T(0));
  g.bh.assign(3 * Cp, T(0)), g.wv_bias.assign(ncb * kStripTaps * L, T(0));
  std::vector<T> ps(Cp), colsum(Cp);
  for (int64_t h = 0; h < H; ++h) {
    std::fill(ps.begin(), ps.end(), T(0));
    for (int64_t b = 0; b < B; ++b) {
      const T* rs = sums.gs + (b * H + h) * Cp;
      const T* re = sums.e + (b * H + h) * Cp;
      const T* ra = sums.ga + (b * H + h) * Cp;
      for (int64_t c = 0; c < Cp; ++c) ps[c] += rs[c], g.b3[c] += re[c], g.b0[c] += ra[c];
    }
    for (int64_t c = 0; c < Cp; ++c) g.bv[c] += ps[c];
    for (int br = 0; br < kBranches; ++br) {
      const int K = kStripK[br], pk = K / 2;
      const int j0 = static_cast<int>(std::max<int64_t>(0, pk - h));
      const int j1 = static_cast<int>(std::min<int64_t>(K, H - h + pk));
      std::fill(colsum.begin(), colsum.end(), T(0));
      for (int64_t cb = 0; cb < ncb; ++cb) {
        for (int j = j0; j < j1; ++j) {
          const int64_t t = (cb * kStripTaps + kStripOffset[br] + j) * L;
          for (int l = 0; l < L; ++l) {
            colsum[cb * L + l] += pw.wv[t + l];
            g.wv_bias[t + l] += ps[cb * L + l];
          }
        }
      }
      for (int64_t c = 0; c < Cp; ++c) g.bh[br * Cp + c] += ps[c] * colsum[c];
    }
  }
  return g;
}

// The 16 weight gradients in the weights' shapes, strides and dtype, from the summed slot
// (`total`, channel-blocked and padded) and the bias terms.
template <typename T>
std::vector<at::Tensor> unpack_weight_grads(at::TensorList w, const Plan& p,
                                            const PackedWeights<T>& pw, const GradSlots<T>& slots,
                                            const T* total, const BiasGrads<T>& bias) {
  constexpr int L = Lanes<T>::L;
  const int64_t C = p.C, Cp = p.Cp;
  std::vector<at::Tensor> out(msca::kNumWeights);
  // Weight i as (C, inner) from value(c, j), then in w[i]'s shape, strides and dtype.
  auto emit = [&](int i, int64_t inner, auto value) {
    at::Tensor r = at::empty(w[i].sizes(),
                             at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* d = r.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < inner; ++j) d[c * inner + j] = value(c, j);
    out[i] = at::empty_like(w[i]);
    out[i].copy_(r);
  };
  auto per_channel = [](const T* v) { return [v](int64_t c, int64_t) { return v[c]; }; };
  const T* t_w3 = total + slots.o_w3;
  const T* t_w0 = total + slots.o_w0;
  const T* t_wh = total + slots.o_wh;
  const T* t_wv = total + slots.o_wv;
  emit(msca::kW0, 25, [&](int64_t c, int64_t t) { return t_w0[(c / L * 25 + t) * L + c % L]; });
  emit(msca::kB0, 1, per_channel(bias.b0.data()));
  for (int br = 0; br < kBranches; ++br) {
    const int hc = msca::strip_conv(br, false), vc = msca::strip_conv(br, true);
    auto tap = [&](int64_t c, int64_t j) {
      return (c / L * kStripTaps + kStripOffset[br] + j) * L + c % L;
    };
    emit(msca::weight_index(hc), kStripK[br], [&](int64_t c, int64_t j) { return t_wh[tap(c, j)]; });
    emit(msca::bias_index(hc), 1, per_channel(bias.bh.data() + br * Cp));
    emit(msca::weight_index(vc), kStripK[br], [&](int64_t c, int64_t j) {
      return t_wv[tap(c, j)] + pw.bh[br * Cp + c] * bias.wv_bias[tap(c, j)];
    });
    emit(msca::bias_index(vc), 1, per_channel(bias.bv.data()));
  }
  emit(msca::kW3, C, [&](int64_t n, int64_t k) { return t_w3[n * Cp + k]; });
  emit(msca::kB3, 1, per_channel(bias.b3.data()));
  return out;
}

at::Tensor msca_forward_cpu(const at::Tensor& u, at::TensorList w) {
  check_inputs("msca_forward", u, w);
  at::Tensor out = at::empty_like(u);  // the caller's strides (the fake is empty_like too)
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  if (u.numel() == 0) return out;
  const int64_t B = u.size(0), C = u.size(1), H = u.size(2), W = u.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "msca_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto pw = pack_weights<T>(weights_as(w, c10::CppTypeToScalarType<T>::value), C, false);
    const Plan p = make_plan(B, C, H, W, Lanes<T>::L, /*backward=*/false);
    const Strided<const scalar_t> us(u);
    const Strided<scalar_t> os(out);
    run_tasks(p, [&](int64_t b, int64_t h0, int64_t h1) {
      msca_forward_band<T, scalar_t>(p, pw, us, os, b, h0, h1);
    });
  });
  return out;
}

std::vector<at::Tensor> msca_backward_cpu(const at::Tensor& grad, const at::Tensor& u,
                                          at::TensorList w) {
  check_inputs("msca_backward", u, w);
  msca::check_grad("msca_backward", grad, u);

  at::Tensor grad_u = at::empty_like(u);
  if (poison_outputs()) grad_u.fill_(std::numeric_limits<double>::quiet_NaN());
  std::vector<at::Tensor> result{grad_u};
  const int64_t B = u.size(0), C = u.size(1), H = u.size(2), W = u.size(3);
  if (u.numel() == 0) {
    for (const auto& t : w) result.push_back(at::zeros_like(t));
    return result;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "msca_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<T>::value;
    const auto pw = pack_weights<T>(weights_as(w, acc_dtype), C, true);
    const Plan p = make_plan(B, C, H, W, Lanes<T>::L, /*backward=*/true);

    at::Tensor slot_storage = at::empty({GradSlots<T>::size(p)}, at::TensorOptions().dtype(acc_dtype));
    GradSlots<T> slots;
    slots.init(p, slot_storage.data_ptr<T>());
    at::Tensor sum_storage = at::empty({3, B, H, p.Cp}, at::TensorOptions().dtype(acc_dtype));
    RowSums<T> sums;
    sums.H = H, sums.Cp = p.Cp;
    sums.gs = sum_storage[0].data_ptr<T>();
    sums.e = sum_storage[1].data_ptr<T>();
    sums.ga = sum_storage[2].data_ptr<T>();

    const Strided<const scalar_t> us(u), gs(grad);
    const Strided<scalar_t> gus(grad_u);
    run_tasks(p, [&](int64_t b, int64_t h0, int64_t h1) {
      BackwardTask<T, scalar_t>(p, pw, us, gs, gus, slots, sums, b, h0, h1).run();
    });

    const at::Tensor total = sum_slots(slots, B);
    const BiasGrads<T> bias = bias_grads(p, pw, sums);
    for (auto& t : unpack_weight_grads(w, p, pw, slots, total.data_ptr<T>(), bias))
      result.push_back(std::move(t));
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(segnext_C, CPU, m) {
  m.impl("msca_forward", &msca_forward_cpu);
  m.impl("msca_backward", &msca_backward_cpu);
}

}  // namespace segnext
