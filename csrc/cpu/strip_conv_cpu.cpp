// Depthwise strip convolution (1xk or kx1, 'same' zero padding, bias), CPU forward.
//
// Channels-last: each output pixel is a contiguous run of C channels, so the tap loop is
// outside and the channel loop inside (contiguous, auto-vectorised). NCHW: each (b, c) plane
// is independent; the horizontal case runs taps over a contiguous row.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "device_check.h"

namespace segnext {
namespace {

template <typename scalar_t>
void strip_conv_channels_last(const scalar_t* x, const float* wt /* [k][C] */, const float* bias,
                              scalar_t* out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t k,
                              bool horizontal) {
  const int64_t pad = k / 2;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // A whole output row of accumulators: each tap is then one long contiguous multiply-add
    // over (valid columns x C), which the compiler vectorises.
    std::vector<float> row_acc(W * C);
    float* __restrict acc = row_acc.data();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c) acc[w * C + c] = bias ? bias[c] : 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t d = j - pad;
        const float* __restrict wp = wt + j * C;
        if (horizontal) {
          const int64_t w0 = std::max<int64_t>(0, -d), w1 = std::min<int64_t>(W, W - d);
          const scalar_t* __restrict src = x + ((b * H + h) * W + d) * C;
          for (int64_t w = w0; w < w1; ++w) {
            float* __restrict a = acc + w * C;
            const scalar_t* __restrict xs = src + w * C;
            for (int64_t c = 0; c < C; ++c) a[c] += wp[c] * static_cast<float>(xs[c]);
          }
        } else {
          const int64_t hh = h + d;
          if (hh < 0 || hh >= H) continue;
          const scalar_t* __restrict src = x + (b * H + hh) * W * C;
          for (int64_t w = 0; w < W; ++w) {
            float* __restrict a = acc + w * C;
            const scalar_t* __restrict xs = src + w * C;
            for (int64_t c = 0; c < C; ++c) a[c] += wp[c] * static_cast<float>(xs[c]);
          }
        }
      }
      scalar_t* __restrict op = out + (b * H + h) * W * C;
      for (int64_t i = 0; i < W * C; ++i) op[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

template <typename scalar_t, typename acc_t>
void strip_conv_nchw(const scalar_t* x, const acc_t* wt /* [C][k] */, const acc_t* bias,
                     scalar_t* out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t k,
                     bool horizontal) {
  const int64_t pad = k / 2;
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(W);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t c = bc % C;
      const scalar_t* xp = x + bc * H * W;
      scalar_t* op = out + bc * H * W;
      const acc_t* wp = wt + c * k;
      const acc_t b0 = bias ? bias[c] : acc_t(0);
      for (int64_t h = 0; h < H; ++h) {
        std::fill(row.begin(), row.end(), b0);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t d = j - pad;
          if (horizontal) {
            // valid w: 0 <= w + d < W
            const int64_t w0 = std::max<int64_t>(0, -d), w1 = std::min<int64_t>(W, W - d);
            const scalar_t* src = xp + h * W + d;
            for (int64_t w = w0; w < w1; ++w) row[w] += wp[j] * static_cast<acc_t>(src[w]);
          } else {
            const int64_t hh = h + d;
            if (hh < 0 || hh >= H) continue;
            const scalar_t* src = xp + hh * W;
            for (int64_t w = 0; w < W; ++w) row[w] += wp[j] * static_cast<acc_t>(src[w]);
          }
        }
        for (int64_t w = 0; w < W; ++w) op[h * W + w] = static_cast<scalar_t>(row[w]);
      }
    }
  });
}

at::Tensor strip_conv_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "strip_conv_forward";
  segnext::check_device(op, at::kCPU, {{"x", &x}, {"weight", &weight}});
  if (bias.has_value()) segnext::check_device(op, at::kCPU, {{"bias", &*bias}});
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                  (weight.size(2) == 1 || weight.size(3) == 1),
              op, ": weight must be (C, 1, 1, k) or (C, 1, k, 1) with C=", C, ", got ",
              weight.sizes());
  const bool horizontal = weight.size(2) == 1;
  const int64_t k = horizontal ? weight.size(3) : weight.size(2);
  TORCH_CHECK(k % 2 == 1, op, ": kernel size must be odd, got ", k);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must be (", C,
                "), got ", bias->sizes());
  }
  const bool channels_last = !x.is_contiguous() &&
                             x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = at::empty_like(xc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (channels_last) {
      // Taps-major weights so the inner loop runs over contiguous channels (float accumulation).
      const at::Tensor wt = weight.reshape({C, k}).t().contiguous().to(at::kFloat);
      at::Tensor bf;
      if (bias.has_value()) bf = bias->contiguous().to(at::kFloat);
      if constexpr (std::is_same_v<scalar_t, double>) {
        // double keeps a double path: reuse the NCHW kernel on a contiguous copy.
        const at::Tensor xn = xc.contiguous();
        at::Tensor on = at::empty_like(xn);
        const at::Tensor wd = weight.reshape({C, k}).contiguous();
        at::Tensor bd;
        if (bias.has_value()) bd = bias->contiguous();
        strip_conv_nchw<double, double>(xn.data_ptr<double>(), wd.data_ptr<double>(),
                                        bias.has_value() ? bd.data_ptr<double>() : nullptr,
                                        on.data_ptr<double>(), B, C, H, W, k, horizontal);
        out.copy_(on);
      } else {
        strip_conv_channels_last<scalar_t>(xc.data_ptr<scalar_t>(), wt.data_ptr<float>(),
                                           bias.has_value() ? bf.data_ptr<float>() : nullptr,
                                           out.data_ptr<scalar_t>(), B, C, H, W, k, horizontal);
      }
    } else {
      const at::Tensor wa = weight.reshape({C, k}).contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
      at::Tensor ba;
      if (bias.has_value()) ba = bias->contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
      strip_conv_nchw<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), wa.data_ptr<acc_t>(),
                                       bias.has_value() ? ba.data_ptr<acc_t>() : nullptr,
                                       out.data_ptr<scalar_t>(), B, C, H, W, k, horizontal);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segnext_C, CPU, m) { m.impl("strip_conv_forward", &strip_conv_forward_cpu); }

}  // namespace segnext
