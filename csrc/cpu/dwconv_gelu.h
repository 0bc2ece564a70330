// The depthwise 3x3 conv + bias + GELU of the MSCAN MLP, channels-last, one row at a time:
// shared by the dwconv_gelu op (dwconv_gelu_cpu.cpp) and the fused MLP (mlp_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace segnext {
namespace {

constexpr int kTaps = 9;  // 3x3; tap k = i * 3 + j reads x[h + i - 1][w + j - 1]

// The filter as [tap][Cp], the bias and the padding value as [Cp], in the accumulation type,
// zero padded to whole vectors. The padding value (what columns outside the image hold) is 0
// for the plain op; fold_input_bias makes the kernels compute the conv of x + b_in with x
// given (the fused MLP's fc1 output without its bias, which saves a pass over the hidden).
template <typename T>
struct PackedFilter {
  int64_t Cp;
  std::vector<T> taps, bias, pad;
  PackedFilter(const at::Tensor& weight, const at::Tensor& b, int64_t C)
      : Cp(round_up(C, Lanes<T>::L)), taps(kTaps * Cp, T(0)), bias(Cp, T(0)), pad(Cp, T(0)) {
    auto w = weight.to(at::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
    auto bb = b.to(at::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
    const T* wp = w.template data_ptr<T>();  // (C, 1, 3, 3)
    const T* bp = bb.template data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      for (int k = 0; k < kTaps; ++k) taps[k * Cp + c] = wp[c * kTaps + k];
      bias[c] = bp[c];
    }
  }
  // conv(x + b_in) = conv(x~) + bias + b_in * sum(taps), where x~ = x inside the image and
  // -b_in outside it (outside, x + b_in must be the zero padding). Rows outside the image are
  // then the caller's rows of -b_in; columns outside take `pad`.
  void fold_input_bias(const at::Tensor& b_in, int64_t C) {
    auto bb = b_in.to(at::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
    const T* bp = bb.template data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      T sum = T(0);
      for (int k = 0; k < kTaps; ++k) sum += taps[k * Cp + c];
      bias[c] += bp[c] * sum;
      pad[c] = -bp[c];
    }
  }
};

template <typename T>
inline void load_filter(const PackedFilter<T>& f, int64_t c0, vec_t<T> wv[kTaps], vec_t<T>& bias,
                        vec_t<T>& pad) {
  for (int k = 0; k < kTaps; ++k) wv[k] = vloadu(f.taps.data() + k * f.Cp + c0);
  bias = vloadu(f.bias.data() + c0);
  pad = vloadu(f.pad.data() + c0);
}

// A whole vector of channels (kFull) or the first n of one (the channel tail).
template <typename T, bool kFull, typename scalar_t>
inline vec_t<T> load_block(const scalar_t* p, int n) {
  return kFull ? load_lanes<T>(p) : load_lanes<T>(p, n);
}

// z at column w for one channel block: rows[i] is image row h + i - 1 (or a padding row),
// offset to the block's first channel. kEdge: w may be the first or last column (taps outside
// the image read `pad`).
template <typename T, bool kFull, bool kEdge, typename scalar_t>
inline vec_t<T> conv_at(const scalar_t* const rows[3], const vec_t<T> wv[kTaps], vec_t<T> bias,
                        vec_t<T> pad, int64_t w, int64_t W, int64_t C, int n) {
  vec_t<T> acc = bias;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      const int64_t ww = w + j - 1;
      if (kEdge && (ww < 0 || ww >= W)) {
        acc += wv[i * 3 + j] * pad;
        continue;
      }
      acc += wv[i * 3 + j] * load_block<T, kFull>(rows[i] + ww * C, n);
    }
  }
  return acc;
}

// z at the NC interior columns w..w+NC-1 for one whole channel block: the NC + 2 input columns
// of each row are loaded once and feed NC independent accumulators (with NC = 4, taps, inputs
// and accumulators fit the registers; 8 spills).
template <typename T, int NC, typename scalar_t>
inline void conv_cols(const scalar_t* const rows[3], const vec_t<T> wv[kTaps], vec_t<T> bias,
                      int64_t w, int64_t C, vec_t<T> out[NC]) {
  for (int c = 0; c < NC; ++c) out[c] = bias;
  for (int i = 0; i < 3; ++i) {
    vec_t<T> in[NC + 2];
    for (int t = 0; t < NC + 2; ++t) in[t] = load_block<T, true>(rows[i] + (w - 1 + t) * C, 0);
    for (int j = 0; j < 3; ++j)
      for (int c = 0; c < NC; ++c) out[c] += wv[i * 3 + j] * in[c + j];
  }
}

// Calls body(w0, w1, c0, n, kFull, kEdge) for every chunk of kChunk columns [w0, w1) and
// channel block c0 (n channels) of a row: chunks outer, channel blocks inner, columns of the
// chunk innermost. A chunk's rows are a few KB of contiguous memory, so they stream through the
// hardware prefetchers (a channel-outer order walks whole rows with a stride of C and stalls on
// every line), while per-block state (filter, gradient sums) is loaded once per chunk. Interior
// chunks and whole channel blocks get the branch-free instantiations.
constexpr int64_t kChunk = 8;
template <int L, typename F>
inline void for_each_chunk(int64_t W, int64_t C, F&& body) {
  const int64_t full = C / L * L;
  auto blocks = [&](int64_t w0, int64_t w1, auto edge) {
    for (int64_t c0 = 0; c0 < full; c0 += L) body(w0, w1, c0, L, std::true_type{}, edge);
    if (full < C) body(w0, w1, full, static_cast<int>(C - full), std::false_type{}, edge);
  };
  for (int64_t w0 = 0; w0 < W; w0 += kChunk) {
    const int64_t w1 = std::min(W, w0 + kChunk);
    if (w0 == 0 || w1 == W) {
      blocks(w0, w1, std::true_type{});
    } else {
      blocks(w0, w1, std::false_type{});
    }
  }
}

// One row of y = gelu(dw3x3(x) + b): rows[i] is input row h + i - 1 (a padding row outside
// the image: zeros, or -b_in after fold_input_bias), each W * C values, channels-last.
// A chunk of columns at a time: the convolution of every channel block into a small buffer
// (in L1), then the GELU over the chunk as one flat run of values. Kept apart, each loop has
// the vector registers to itself (fused, the filter taps and the GELU's constants spill).
template <typename scalar_t, typename T, typename out_t = scalar_t>
inline void dwconv_gelu_row(const scalar_t* const rows[3], const PackedFilter<T>& f,
                            out_t* yrow, int64_t W, int64_t C) {
  constexpr int L = Lanes<T>::L;
  const int64_t cols = std::clamp<int64_t>(16384 / static_cast<int64_t>(sizeof(T) * C), 1, 8);
  alignas(64) T zbuf[16384 / sizeof(T) + Lanes<T>::L];
  vec_t<T> wv[kTaps], bias, pad;
  const int64_t full = C / L * L;
  for (int64_t w0 = 0; w0 < W; w0 += cols) {
    const int64_t w1 = std::min(W, w0 + cols);
    const bool edge = w0 == 0 || w1 == W;
    auto block = [&](int64_t c0, int n, auto full_tag, auto edge_tag) {
      constexpr bool kFull = decltype(full_tag)::value, kEdge = decltype(edge_tag)::value;
      load_filter(f, c0, wv, bias, pad);
      const scalar_t* crow[3] = {rows[0] + c0, rows[1] + c0, rows[2] + c0};
      int64_t w = w0;
      if constexpr (kFull && !kEdge) {
        for (; w + 4 <= w1; w += 4) {
          vec_t<T> z[4];
          conv_cols<T, 4>(crow, wv, bias, w, C, z);
          for (int c = 0; c < 4; ++c) vstoreu(zbuf + (w - w0 + c) * C + c0, z[c]);
        }
      }
      for (; w < w1; ++w) {
        const vec_t<T> z = conv_at<T, kFull, kEdge>(crow, wv, bias, pad, w, W, C, n);
        if constexpr (kFull) {
          vstoreu(zbuf + (w - w0) * C + c0, z);
        } else {
          for (int l = 0; l < n; ++l) zbuf[(w - w0) * C + c0 + l] = z[l];
        }
      }
    };
    for (int64_t c0 = 0; c0 < full; c0 += L) {
      if (edge) {
        block(c0, L, std::true_type{}, std::true_type{});
      } else {
        block(c0, L, std::true_type{}, std::false_type{});
      }
    }
    if (full < C) block(full, static_cast<int>(C - full), std::false_type{}, std::true_type{});
    // The chunk's columns are contiguous in the output row: one flat GELU pass.
    const int64_t n = (w1 - w0) * C;
    out_t* y = yrow + w0 * C;
    int64_t i = 0;
    for (; i + L <= n; i += L) store_lanes<T>(y + i, vgelu(vloadu(zbuf + i)));
    if (i < n) {
      const int rest = static_cast<int>(n - i);
      store_lanes<T>(y + i, vgelu(load_lanes<T>(zbuf + i, rest)), rest);
    }
  }
}

// The three input rows around row h of image b (a zero row outside the image).
template <typename scalar_t>
inline void input_rows(const scalar_t* x, const scalar_t* zero_row, int64_t b, int64_t h,
                       int64_t H, int64_t W, int64_t C, const scalar_t* rows[3]) {
  for (int i = 0; i < 3; ++i) {
    const int64_t hh = h + i - 1;
    rows[i] = (hh >= 0 && hh < H) ? x + ((b * H + hh) * W) * C : zero_row;
  }
}

}  // namespace
}  // namespace segnext
