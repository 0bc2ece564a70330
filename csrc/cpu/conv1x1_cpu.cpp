// A 1x1 convolution with its epilogue fused, CPU forward (inference):
//
//   y = act(W x + b) [+ scale * residual]      act: none, gelu (exact erf) or relu
//
// The 1x1 convs of an MSCAN block are each followed by an elementwise pass in eager PyTorch:
// proj_1 by the GELU, proj_2 by the block's residual (x + layer_scale * (...), with the
// eval-mode norm folded in: a per-channel scale of the shortcut). Here that pass happens on the
// GEMM's register tiles (gemm.h) before the result is stored: y is written once and nothing is
// read back.
//
// Channels-last (the fast layout) reads x's pixel rows in place; other layouts are copied once.
// Tasks are blocks of pixels (any image); within a task, rows go to the GEMM in blocks sized so
// that they stay in L2 while every panel of the weight passes over them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "gemm.h"
#include "poison.h"
#include "scratch.h"
#include "simd.h"
#include "weight_cache.h"

namespace segnext {
namespace {

enum class Act { kNone, kGelu, kRelu };

template <typename scalar_t, typename T, Act kAct, bool kResidual, typename Packed>
void conv1x1_cl(const scalar_t* x, const Packed& w, const T* bias, const scalar_t* res,
                const T* scale, scalar_t* y, int64_t M, int64_t K, int64_t N) {
  constexpr int L = Lanes<T>::L;
  using V = vec_t<T>;
  const int64_t full = N / L, tail = N - full * L;
  // Pixel rows per GEMM call: a quarter of L2 of x rows.
  const int64_t rows = std::clamp<int64_t>(l2_cache_bytes() / 4 / (K * sizeof(scalar_t)), 16, 2048);
  const int64_t grain = std::max<int64_t>(rows, 256);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m_lo = begin; m_lo < end; m_lo += rows) {
      const int64_t m = std::min(rows, end - m_lo);
      gemm(x + m_lo * K, K, m, w, [&](int64_t m0, int64_t v0, const auto& acc) {
        for (int i = 0; i < tile_m<decltype(acc)>; ++i) {
          const int64_t row = (m_lo + m0 + i) * N;
          for (int j = 0; j < tile_v<decltype(acc)>; ++j) {
            const int64_t v = v0 + j;
            const int n = v < full ? L : static_cast<int>(tail);
            V out = acc[i][j] + vloadu(bias + v * L);
            if constexpr (kAct == Act::kGelu) out = vgelu(out);
            if constexpr (kAct == Act::kRelu) out = out > V{} ? out : V{};  // NaN propagates
            if constexpr (kResidual)
              out += vloadu(scale + v * L) * load_lanes<T>(res + row + v * L, n);
            store_lanes<T>(y + row + v * L, out, n);
          }
        }
      });
    }
  });
}

at::MemoryFormat format_of(const at::Tensor& t) {
  return (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast))
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::Tensor conv1x1_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, c10::string_view act,
                               const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& scale) {
  constexpr const char* op = "conv1x1_forward";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  const int64_t B = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == K && weight.size(2) == 1 &&
                        weight.size(3) == 1 && weight.size(0) >= 1,
                    op, ": weight must have shape (out, ", K, ", 1, 1), got ",
                    weight.sizes());
  const int64_t N = weight.size(0);
  Act a;
  if (act == "none") {
    a = Act::kNone;
  } else if (act == "gelu") {
    a = Act::kGelu;
  } else if (act == "relu") {
    a = Act::kRelu;
  } else {
    TORCH_CHECK_VALUE(false, op, ": act must be 'none', 'gelu' or 'relu', got '", act, "'");
  }
  auto check_same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name,
                     " must have x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ",
                t.device());
  };
  check_same(weight, "weight");
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (",
                      N, "), got ", bias->sizes());
    check_same(*bias, "bias");
  }
  TORCH_CHECK_VALUE(!scale || residual, op, ": scale is given without a residual");
  if (residual) {
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({B, N, H, W}),
                      op, ": residual must have shape (", B, ", ", N, ", ", H, ", ", W,
                      "), got ", residual->sizes());
    check_same(*residual, "residual");
    if (scale) {
      TORCH_CHECK_VALUE(scale->numel() == N, op, ": scale must have ", N,
                        " elements (one per output channel), got shape ", scale->sizes());
      check_same(*scale, "scale");
    }
  }
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   op, ": x must be a floating-point tensor, got ", x.scalar_type());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::MemoryFormat fmt = format_of(x);
  at::Tensor out = at::empty({B, N, H, W}, x.options(), fmt);
  if (x.numel() == 0 || out.numel() == 0) return out;
  const at::Tensor xc = x.detach().contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = fmt == at::MemoryFormat::ChannelsLast && out.is_contiguous(fmt)
                     ? out
                     : at::empty({B, N, H, W}, x.options(), at::MemoryFormat::ChannelsLast);
  if (poison_outputs()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  at::Tensor rc;
  if (residual) rc = residual->detach().contiguous(at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int L = Lanes<T>::L;
    std::vector<T> b(round_up(N, L), T(0)), s(round_up(N, L), T(1));
    if (bias) {
      const at::Tensor bb = bias->detach().to(c10::CppTypeToScalarType<T>::value).contiguous();
      std::copy(bb.data_ptr<T>(), bb.data_ptr<T>() + N, b.begin());
    }
    if (scale) {
      const at::Tensor ss = scale->detach().reshape({-1}).to(c10::CppTypeToScalarType<T>::value)
                                .contiguous();
      std::copy(ss.data_ptr<T>(), ss.data_ptr<T>() + N, s.begin());
    }
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* rp = residual ? rc.data_ptr<scalar_t>() : nullptr;
    const int64_t M = B * H * W;
    // (the weight as passed: the cache knows it by its TensorImpl, see weight_cache.h)
    auto run = [&](auto act_tag, auto res_tag) {
      constexpr Act kAct = decltype(act_tag)::value;
      constexpr bool kRes = decltype(res_tag)::value;
#ifdef SEGNEXT_GEMM_BF16
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (K % 2 == 0) {  // bfloat16 dot products
          const auto wp = packed<PackedBf16>(weight, K);
          conv1x1_cl<scalar_t, T, kAct, kRes>(xp, *wp, b.data(), rp, s.data(), yp, M, K, N);
          return;
        }
      }
#endif
      const auto wp = packed_weight<T>(weight, K);
      conv1x1_cl<scalar_t, T, kAct, kRes>(xp, *wp, b.data(), rp, s.data(), yp, M, K, N);
    };
    auto with_res = [&](auto act_tag) {
      if (residual) {
        run(act_tag, std::true_type{});
      } else {
        run(act_tag, std::false_type{});
      }
    };
    switch (a) {
      case Act::kNone: with_res(std::integral_constant<Act, Act::kNone>{}); break;
      case Act::kGelu: with_res(std::integral_constant<Act, Act::kGelu>{}); break;
      case Act::kRelu: with_res(std::integral_constant<Act, Act::kRelu>{}); break;
    }
  });
  if (!y.is_same(out)) out.copy_(y);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segnext_C, CPU, m) { m.impl("conv1x1_forward", &conv1x1_forward_cpu); }

}  // namespace segnext
