// Fused depthwise 3x3 convolution + bias + GELU: the middle of every MSCAN block's MLP
// (fc1 -> dwconv 3x3 -> GELU -> fc2), CPU forward and backward.
//
//   z = dw3x3(x) + b        ('same' zero padding, one 3x3 filter per channel)
//   y = gelu(z) = z Phi(z)  (the exact erf GELU, nn.GELU's default)
//
// Eager PyTorch runs this as a oneDNN depthwise conv and a GELU: two full passes over the MLP's
// hidden activation (4-8x the block's channels, the largest tensor of the network) plus the
// z tensor in between. Here it is one pass that reads x and writes y.
//
// * Channels-last (the fast layout): rows of one image are W*C contiguous values, and channels
//   are the vector dimension (one 64-byte vector of the accumulation type, 16 floats, per step;
//   a partial vector for the channel tail). NCHW: plane by plane, vectorised along the rows
//   (below). Other strides are copied once; results come back with empty_like(x)'s strides,
//   as the Python fake promises.
// * Rows outside the image read a shared zero row; columns outside are skipped taps.
// * Backward: grad_z = grad_y * gelu'(z) with z recomputed from x (nothing but x is saved).
//   A task owns a slot of S rows of one image and streams down it with a ring of three grad_z
//   rows (zero padded by one column each side), so grad_x = the transposed 3x3 conv of grad_z
//   needs no full-size grad_z; the slot recomputes the grad_z rows just above and below it.
//   Weight and bias gradients are summed per slot, then the slots in a fixed order: S depends
//   on H only, so the result is bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "dwconv_gelu.h"
#include "device_check.h"
#include "layout.h"
#include "poison.h"
#include "simd.h"

namespace segnext {
namespace {

template <typename scalar_t, typename T>
void forward_cl(const scalar_t* x, const PackedFilter<T>& f, scalar_t* y, int64_t B, int64_t H,
                int64_t W, int64_t C) {
  const std::vector<scalar_t> zero_row(W * C, scalar_t(0));
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, W * C));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    const scalar_t* rows[3];
    for (int64_t r = begin; r < end; ++r) {
      input_rows(x, zero_row.data(), r / H, r % H, H, W, C, rows);
      dwconv_gelu_row(rows, f, y + r * W * C, W, C);
    }
  });
}

// Rows per backward slot: a function of H only (determinism), small enough to give the
// threads several slots per image, large enough that the two recomputed halo rows are cheap.
inline int64_t backward_slot_rows(int64_t H) {
  return std::min<int64_t>(16, std::max<int64_t>(4, ceil_div(H, 8)));
}

template <typename scalar_t, typename T>
void backward_cl(const scalar_t* gy, const scalar_t* x, const PackedFilter<T>& f, scalar_t* gx,
                 T* partials /* [slots][kTaps + 1][Cp] */, int64_t B, int64_t H, int64_t W,
                 int64_t C) {
  constexpr int L = Lanes<T>::L;
  const int64_t Cp = f.Cp, S = backward_slot_rows(H), slots_per_image = ceil_div(H, S);
  const int64_t ring_row = (W + 2) * Cp;  // grad_z row with one zero column each side
  const std::vector<scalar_t> zero_row(W * C, scalar_t(0));

  at::parallel_for(0, B * slots_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ring_store(3 * ring_row);
    vec_t<T> wv[kTaps], bias, pad;
    const scalar_t* rows[3];

    // grad_z = grad_y * gelu'(z) of image row hh into dst (column w at dst + (w + 1) * Cp).
    auto grad_z_row = [&](int64_t b, int64_t hh, T* dst) {
      if (hh < 0 || hh >= H) {
        std::fill(dst, dst + ring_row, T(0));
        return;
      }
      input_rows(x, zero_row.data(), b, hh, H, W, C, rows);
      const scalar_t* gyrow = gy + ((b * H + hh) * W) * C;
      for_each_chunk<L>(W, C, [&](int64_t w0, int64_t w1, int64_t c0, int n, auto full,
                                  auto edge) {
        constexpr bool kFull = decltype(full)::value, kEdge = decltype(edge)::value;
        load_filter(f, c0, wv, bias, pad);
        const scalar_t* crow[3] = {rows[0] + c0, rows[1] + c0, rows[2] + c0};
        for (int64_t w = w0; w < w1; ++w) {
          const vec_t<T> z = conv_at<T, kFull, kEdge>(crow, wv, bias, pad, w, W, C, n);
          vstoreu(dst + (w + 1) * Cp + c0,
                  load_block<T, kFull>(gyrow + w * C + c0, n) * vgelu_grad(z));
        }
      });
      std::fill(dst, dst + Cp, T(0));
      std::fill(dst + (W + 1) * Cp, dst + ring_row, T(0));
    };

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / slots_per_image;
      const int64_t h0 = (task % slots_per_image) * S, h1 = std::min(H, h0 + S);
      T* part = partials + task * (kTaps + 1) * Cp;  // [tap or bias][Cp]
      std::fill(part, part + (kTaps + 1) * Cp, T(0));
      // ring[0] = grad_z row h - 1, ring[1] = row h, ring[2] = row h + 1.
      T* ring[3] = {ring_store.data(), ring_store.data() + ring_row,
                    ring_store.data() + 2 * ring_row};
      grad_z_row(b, h0 - 1, ring[0]);
      grad_z_row(b, h0, ring[1]);
      for (int64_t h = h0; h < h1; ++h) {
        grad_z_row(b, h + 1, ring[2]);
        input_rows(x, zero_row.data(), b, h, H, W, C, rows);
        scalar_t* gxrow = gx + ((b * H + h) * W) * C;
        //   grad_x[h][w] = sum_ij w_ij grad_z[h - i + 1][w - j + 1]   (ring row 2 - i)
        //   grad_w_ij   += x[h + i - 1][w + j - 1] grad_z[h][w],  grad_b += grad_z[h][w]
        for_each_chunk<L>(W, C, [&](int64_t w0, int64_t w1, int64_t c0, int n, auto full,
                                    auto edge) {
          constexpr bool kFull = decltype(full)::value, kEdge = decltype(edge)::value;
          load_filter(f, c0, wv, bias, pad);
          vec_t<T> gw[kTaps + 1];  // this block's weight/bias gradient sums, in registers
          for (int k = 0; k <= kTaps; ++k) gw[k] = vloadu(part + k * Cp + c0);
          for (int64_t w = w0; w < w1; ++w) {
            vec_t<T> gx_acc = vsplat(T(0));
            for (int i = 0; i < 3; ++i) {
              const T* g = ring[2 - i] + (w + 1) * Cp + c0;
              for (int j = 0; j < 3; ++j) gx_acc += wv[i * 3 + j] * vloadu(g - (j - 1) * Cp);
            }
            if constexpr (kFull) {
              store_lanes<T>(gxrow + w * C + c0, gx_acc);
            } else {
              store_lanes<T>(gxrow + w * C + c0, gx_acc, n);
            }
            const vec_t<T> gz = vloadu(ring[1] + (w + 1) * Cp + c0);
            for (int i = 0; i < 3; ++i) {
              for (int j = 0; j < 3; ++j) {
                const int64_t ww = w + j - 1;
                if (kEdge && (ww < 0 || ww >= W)) continue;
                gw[i * 3 + j] += gz * load_block<T, kFull>(rows[i] + ww * C + c0, n);
              }
            }
            gw[kTaps] += gz;
          }
          for (int k = 0; k <= kTaps; ++k) vstoreu(part + k * Cp + c0, gw[k]);
        });
        std::rotate(ring, ring + 1, ring + 3);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Contiguous (NCHW) inputs: every (image, channel) plane is its own 3x3 convolution, so the
// kernels go plane by plane and vectorise along a row. Each row is first copied into a padded
// buffer (column w at index w + 1, zeros before and after, up to whole vectors), so every tap
// is a whole-vector load with no edge cases; lanes past the row's end are never stored.
// ------------------------------------------------------------------------------------------
template <typename T, typename scalar_t>
inline void padded_row(const scalar_t* src, int64_t W, int64_t P, T* dst) {
  dst[0] = T(0);
  if (src == nullptr) {
    std::fill(dst + 1, dst + P, T(0));
    return;
  }
  for (int64_t w = 0; w < W; ++w) dst[w + 1] = static_cast<T>(src[w]);
  std::fill(dst + W + 1, dst + P, T(0));
}

// z for the L columns from w0 of one row: rows[i] = padded input row h + i - 1.
template <typename T>
inline vec_t<T> conv_padded(const T* const rows[3], const vec_t<T> wk[kTaps], vec_t<T> bias,
                            int64_t w0) {
  vec_t<T> acc = bias;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) acc += wk[i * 3 + j] * vloadu(rows[i] + w0 + j);
  }
  return acc;
}

template <typename T>
inline void plane_filter(const PackedFilter<T>& f, int64_t c, vec_t<T> wk[kTaps], vec_t<T>& bias) {
  for (int k = 0; k < kTaps; ++k) wk[k] = vsplat(f.taps[k * f.Cp + c]);
  bias = vsplat(f.bias[c]);
}

// NCHW: body(plane, wk, bias, store) for each of the B * C planes, in parallel; store is
// `rows` rows of P padded values per thread, wk and bias the plane's filter.
template <typename T, typename Body>
void for_each_plane(const PackedFilter<T>& f, int64_t B, int64_t C, int rows, int64_t P,
                    Body&& body) {
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> store(rows * P);
    vec_t<T> wk[kTaps], bias;
    for (int64_t plane = begin; plane < end; ++plane) {
      plane_filter(f, plane % C, wk, bias);
      body(plane, wk, bias, store.data());
    }
  });
}

template <typename scalar_t, typename T>
void forward_nchw(const scalar_t* x, const PackedFilter<T>& f, scalar_t* y, int64_t B, int64_t C,
                  int64_t H, int64_t W) {
  constexpr int L = Lanes<T>::L;
  const int64_t P = round_up(W, L) + 2;
  for_each_plane(f, B, C, 3, P, [&](int64_t plane, const vec_t<T>* wk, vec_t<T> bias, T* store) {
    const scalar_t* xp = x + plane * H * W;
    scalar_t* yp = y + plane * H * W;
    T* rows[3] = {store, store + P, store + 2 * P};
    padded_row<T, scalar_t>(nullptr, W, P, rows[0]);
    padded_row(xp, W, P, rows[1]);
    for (int64_t h = 0; h < H; ++h) {
      padded_row(h + 1 < H ? xp + (h + 1) * W : nullptr, W, P, rows[2]);
      for (int64_t w0 = 0; w0 < W; w0 += L) {
        const int n = static_cast<int>(std::min<int64_t>(L, W - w0));
        store_lanes<T>(yp + h * W + w0, vgelu(conv_padded(rows, wk, bias, w0)), n);
      }
      std::rotate(rows, rows + 1, rows + 3);
    }
  });
}

// Weight and bias gradient sums go to partials[plane][kTaps + 1], each summed along the plane
// in a fixed order (per lane, then the lanes in order): deterministic for any thread count.
template <typename scalar_t, typename T>
void backward_nchw(const scalar_t* gy, const scalar_t* x, const PackedFilter<T>& f, scalar_t* gx,
                   T* partials, int64_t B, int64_t C, int64_t H, int64_t W) {
  constexpr int L = Lanes<T>::L;
  const int64_t P = round_up(W, L) + 2;
  for_each_plane(f, B, C, 7, P, [&](int64_t plane, const vec_t<T>* wk, vec_t<T> bias, T* store) {
    const scalar_t* xp = x + plane * H * W;
    const scalar_t* gp = gy + plane * H * W;
    scalar_t* gxp = gx + plane * H * W;
    auto x_row = [&](int64_t r) { return r >= 0 && r < H ? xp + r * W : nullptr; };
    // xr: padded x rows h - 1 .. h + 2; gz: padded grad_z rows h - 1 .. h + 1.
    T* xr[4] = {store, store + P, store + 2 * P, store + 3 * P};
    T* gz[3] = {store + 4 * P, store + 5 * P, store + 6 * P};
    // grad_z of row r from the padded x rows r - 1 .. r + 1; zero pads kept zero.
    auto grad_z_row = [&](int64_t r, const T* const rows[3], T* dst) {
      std::fill(dst, dst + P, T(0));
      if (r < 0 || r >= H) return;
      for (int64_t w0 = 0; w0 < W; w0 += L) {
        const int n = static_cast<int>(std::min<int64_t>(L, W - w0));
        const vec_t<T> g = load_lanes<T>(gp + r * W + w0, n);  // zero past the row's end
        vstoreu(dst + w0 + 1, g * vgelu_grad(conv_padded(rows, wk, bias, w0)));
      }
      std::fill(dst + W + 1, dst + P, T(0));
    };
    padded_row<T, scalar_t>(nullptr, W, P, xr[0]);
    padded_row(x_row(0), W, P, xr[1]);
    padded_row(x_row(1), W, P, xr[2]);
    std::fill(gz[0], gz[0] + P, T(0));
    grad_z_row(0, xr, gz[1]);
    vec_t<T> gw[kTaps + 1];
    for (auto& v : gw) v = vsplat(T(0));
    for (int64_t h = 0; h < H; ++h) {
      padded_row(x_row(h + 2), W, P, xr[3]);
      grad_z_row(h + 1, xr + 1, gz[2]);
      for (int64_t w0 = 0; w0 < W; w0 += L) {
        const int n = static_cast<int>(std::min<int64_t>(L, W - w0));
        //   grad_x[h][w] = sum_ij w_ij grad_z[h - i + 1][w - j + 1]
        vec_t<T> acc = vsplat(T(0));
        for (int i = 0; i < 3; ++i) {
          for (int j = 0; j < 3; ++j) acc += wk[i * 3 + j] * vloadu(gz[2 - i] + w0 + 2 - j);
        }
        store_lanes<T>(gxp + h * W + w0, acc, n);
        //   grad_w_ij += x[h + i - 1][w + j - 1] grad_z[h][w]   (grad_z is 0 past the end)
        const vec_t<T> g = vloadu(gz[1] + w0 + 1);
        for (int i = 0; i < 3; ++i) {
          for (int j = 0; j < 3; ++j) gw[i * 3 + j] += g * vloadu(xr[i] + w0 + j);
        }
        gw[kTaps] += g;
      }
      std::rotate(xr, xr + 1, xr + 4);
      std::rotate(gz, gz + 1, gz + 3);
    }
    T* part = partials + plane * (kTaps + 1);
    for (int k = 0; k <= kTaps; ++k) {
      T sum = T(0);
      for (int l = 0; l < L; ++l) sum += gw[k][l];
      part[k] = sum;
    }
  });
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                const at::Tensor& bias) {
  segnext::check_device(op, at::kCPU, {{"x", &x}, {"weight", &weight}, {"bias", &bias}});
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              op, ": weight must have shape (", C, ", 1, 3, 3), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, op, ": bias must have shape (", C,
              "), got ", bias.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
              op, ": weight and bias must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type(), " and ", bias.scalar_type());
}

at::Tensor dwconv_gelu_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& bias) {
  constexpr const char* op = "dwconv_gelu_forward";
  check_args(op, x, weight, bias);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (x.numel() == 0) return at::empty_like(x);
  const at::MemoryFormat fmt = layout_of(x);
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor y = at::empty_like(xc, fmt);
  if (poison_outputs()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const PackedFilter<T> f(weight, bias, C);
    if (fmt == at::MemoryFormat::ChannelsLast) {
      forward_cl<scalar_t, T>(xc.data_ptr<scalar_t>(), f, y.data_ptr<scalar_t>(), B, H, W, C);
    } else {
      forward_nchw<scalar_t, T>(xc.data_ptr<scalar_t>(), f, y.data_ptr<scalar_t>(), B, C, H, W);
    }
  });
  return in_format_of(y, x);
}

std::vector<at::Tensor> dwconv_gelu_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                 const at::Tensor& weight,
                                                 const at::Tensor& bias) {
  constexpr const char* op = "dwconv_gelu_backward";
  check_args(op, x, weight, bias);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              op, ": grad must match x (", x.sizes(), ", ", x.scalar_type(),
              "), got ", grad.sizes(), ", ", grad.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (x.numel() == 0) {
    return {at::empty_like(x), at::zeros_like(weight), at::zeros_like(bias)};
  }
  const at::MemoryFormat fmt = layout_of(x);
  const at::Tensor xc = x.contiguous(fmt), gc = grad.contiguous(fmt);
  at::Tensor gx = at::empty_like(xc, fmt);
  if (poison_outputs()) gx.fill_(std::numeric_limits<double>::quiet_NaN());
  at::Tensor gw, gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const PackedFilter<T> f(weight, bias, C);
    std::vector<T> total((kTaps + 1) * f.Cp, T(0));  // [tap or bias][Cp]
    if (fmt == at::MemoryFormat::ChannelsLast) {
      const int64_t slots = B * ceil_div(H, backward_slot_rows(H));
      std::vector<T> partials(slots * (kTaps + 1) * f.Cp);
      backward_cl<scalar_t, T>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), f,
                               gx.data_ptr<scalar_t>(), partials.data(), B, H, W, C);
      // Slots in order: a fixed summation order whatever the thread count.
      for (int64_t s = 0; s < slots; ++s) {
        const T* p = partials.data() + s * (kTaps + 1) * f.Cp;
        for (size_t i = 0; i < total.size(); ++i) total[i] += p[i];
      }
    } else {
      std::vector<T> partials(B * C * (kTaps + 1));
      backward_nchw<scalar_t, T>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), f,
                                 gx.data_ptr<scalar_t>(), partials.data(), B, C, H, W);
      for (int64_t b = 0; b < B; ++b) {  // images in order
        for (int64_t c = 0; c < C; ++c) {
          const T* p = partials.data() + (b * C + c) * (kTaps + 1);
          for (int k = 0; k <= kTaps; ++k) total[k * f.Cp + c] += p[k];
        }
      }
    }
    auto opts = weight.options().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor tw = at::empty({C, 1, 3, 3}, opts), tb = at::empty({C}, opts);
    T* twp = tw.data_ptr<T>();
    T* tbp = tb.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      for (int k = 0; k < kTaps; ++k) twp[c * kTaps + k] = total[k * f.Cp + c];
      tbp[c] = total[kTaps * f.Cp + c];
    }
    gw = at::empty_like(weight);  // the strides the fake promises (a channels-last weight too)
    gw.copy_(tw);
    gb = at::empty_like(bias);
    gb.copy_(tb);
  });
  return {in_format_of(gx, x), gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(segnext_C, CPU, m) {
  m.impl("dwconv_gelu_forward", &dwconv_gelu_forward_cpu);
  m.impl("dwconv_gelu_backward", &dwconv_gelu_backward_cpu);
}

}  // namespace segnext
