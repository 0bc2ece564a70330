// The whole MSCAN MLP for inference, CPU:  y = fc2(gelu(dw3x3(fc1(x))))
// (fc1: C -> Hd 1x1 conv with bias, dw3x3: depthwise 3x3 with bias, fc2: Hd -> C 1x1 with bias.)
//
// The hidden activation has Hd = 4C or 8C channels: the largest tensor of the network (16 MB
// per block at SegNeXt-T's stage 1 for a 512x512 image). Eager PyTorch writes it and reads it
// back three times (fc1 out, dwconv out, GELU out), each a fresh allocation. Here it never
// leaves the cache: a task owns a band of rows of one image and walks down it in chunks of R
// rows. fc1 rows go into a ring of R + 2 rows (a chunk's rows plus the dwconv's halo row above
// and below), each row computed once except the two halo rows at band edges; the dwconv + GELU
// of the chunk's rows goes to a chunk buffer, and fc2 reads it and writes the output rows.
// R is sized so that ring and chunk buffer stay in this core's L2.
//
// fc1 and fc2 are gemm.h's register-tiled GEMMs (the fc2 bias added in their epilogue); the
// dwconv + GELU is dwconv_gelu.h's row kernel, which also adds fc1's bias (folded into its own,
// see PackedFilter::fold_input_bias). Internal rows are in the accumulation type, their
// channels padded to whole vectors (zeros: the padded filter, bias and fc2 rows are zero).
//
// Forward only: with autograd the Python side runs fc1, the dwconv_gelu op and fc2 instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dwconv_gelu.h"
#include "device_check.h"
#include "gemm.h"
#include "layout.h"
#include "poison.h"
#include "scratch.h"
#include "simd.h"
#include "weight_cache.h"

namespace segnext {
namespace {

thread_local ThreadScratch tls_scratch;

// Rows per chunk: ring (R + 2 rows) and chunk buffer (R rows) in half of L2 (the other half
// for the streaming input/output rows and the weight panels).
inline int64_t chunk_rows(int64_t W, int64_t Hdp, int64_t elem) {
  const int64_t row_bytes = std::max<int64_t>(1, W * Hdp * elem);
  return std::max<int64_t>(1, (l2_cache_bytes() / 2 / row_bytes - 2) / 2);
}

// act_t: the element type of the GELU rows fc2 reads (T, or bfloat16 for bfloat16 GEMMs);
// P1, P2: the packed fc1 and fc2 weights (gemm.h's PackedB<T> or PackedBf16).
template <typename scalar_t, typename T, typename act_t, typename P1, typename P2>
void mlp_forward_cl(const at::Tensor& x, const P1& w1p, const PackedFilter<T>& f,
                    const P2& w2p, const at::Tensor& b2, at::Tensor& y) {
  constexpr int L = Lanes<T>::L;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hdp = f.Cp;  // hidden channels padded to whole vectors
  const int64_t R = chunk_rows(W, Hdp, sizeof(T));
  const int64_t S = R + 2;  // ring slots
  // Bands: enough per image to give every thread work (at least 4 rows each: a band
  // recomputes 2 fc1 rows).
  const int64_t threads = at::get_num_threads();
  const int64_t bands_per_image =
      std::min<int64_t>(ceil_div(H, 4), std::max<int64_t>(1, ceil_div(threads, B)));
  const int64_t band = ceil_div(H, bands_per_image);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t row = W * Hdp;
  // fc2's bias, padded.
  std::vector<T> bias2(w2p.nv * L, T(0));
  {
    const at::Tensor b = b2.to(c10::CppTypeToScalarType<T>::value).contiguous();
    std::copy(b.data_ptr<T>(), b.data_ptr<T>() + C, bias2.begin());
  }
  const int64_t full_vecs = C / L, tail = C - full_vecs * L;

  at::parallel_for(0, B * bands_per_image, 1, [&](int64_t begin, int64_t end) {
    Carver sizing(nullptr);
    sizing.take<T>(S * row), sizing.take<act_t>(R * row), sizing.take<T>(row);
    Carver cv(static_cast<char*>(tls_scratch.get(sizing.used())));
    T* ring = cv.take<T>(S * row);
    act_t* act = cv.take<act_t>(R * row);
    T* pad_row = cv.take<T>(row);  // rows outside the image: fc1 without bias there is -b1
    if (poison_outputs()) {  // a ring or chunk row read before it is written shows up
      std::fill(ring, ring + S * row, std::numeric_limits<T>::quiet_NaN());
      std::fill(act, act + R * row, static_cast<act_t>(std::numeric_limits<T>::quiet_NaN()));
    }
    for (int64_t w = 0; w < W; ++w) std::copy(f.pad.begin(), f.pad.end(), pad_row + w * Hdp);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / bands_per_image;
      const int64_t h0 = (task % bands_per_image) * band, h1 = std::min(H, h0 + band);
      if (h0 >= h1) continue;
      const scalar_t* xb = xp + b * H * W * C;
      auto slot = [&](int64_t r) { return ring + ((r - h0 + 1) % S) * row; };
      // fc1 (without its bias) of image rows [lo, hi) into their ring slots, as GEMMs over
      // runs of rows contiguous in the ring.
      auto fc1_rows = [&](int64_t lo, int64_t hi) {
        while (lo < hi) {
          const int64_t s0 = (lo - h0 + 1) % S;
          const int64_t n = std::min(hi - lo, S - s0);
          T* out = ring + s0 * row;
          gemm(xb + lo * W * C, C, n * W, w1p, [&](int64_t m0, int64_t v0, const auto& acc) {
            for (int i = 0; i < tile_m<decltype(acc)>; ++i)
              for (int j = 0; j < tile_v<decltype(acc)>; ++j)
                vstore(out + (m0 + i) * Hdp + (v0 + j) * L, acc[i][j]);
          });
          lo += n;
        }
      };
      int64_t done = std::max<int64_t>(0, h0 - 1);  // first row fc1 has not computed yet
      for (int64_t r0 = h0; r0 < h1; r0 += R) {
        const int64_t n = std::min(R, h1 - r0);
        const int64_t need = std::min(H, r0 + n + 1);
        fc1_rows(done, need);
        done = need;
        for (int64_t k = 0; k < n; ++k) {
          const int64_t h = r0 + k;
          const T* rows[3];
          for (int i = 0; i < 3; ++i) {
            const int64_t hh = h + i - 1;
            rows[i] = (hh >= 0 && hh < H) ? slot(hh) : pad_row;
          }
          dwconv_gelu_row(rows, f, act + k * row, W, Hdp);
        }
        // fc2 + bias straight into the output rows (contiguous in channels-last).
        scalar_t* yo = yp + ((b * H + r0) * W) * C;
        gemm(act, Hdp, n * W, w2p, [&](int64_t m0, int64_t v0, const auto& acc) {
          for (int i = 0; i < tile_m<decltype(acc)>; ++i) {
            scalar_t* o = yo + (m0 + i) * C;
            for (int j = 0; j < tile_v<decltype(acc)>; ++j) {
              const int64_t v = v0 + j;
              const vec_t<T> out = acc[i][j] + vloadu(bias2.data() + v * L);
              if (v < full_vecs) {
                store_lanes<T>(o + v * L, out);
              } else {
                store_lanes<T>(o + v * L, out, static_cast<int>(tail));
              }
            }
          }
        });
      }
    }
  });
}

at::Tensor mlp_forward_cpu(const at::Tensor& x, at::TensorList weights) {
  constexpr const char* op = "mlp_forward";
  TORCH_CHECK(weights.size() == 6, op, ": expected 6 weights (w1, b1, wd, bd, w2, b2), got ",
              weights.size());
  const at::Tensor &w1 = weights[0], &b1 = weights[1], &wd = weights[2], &bd = weights[3],
                   &w2 = weights[4], &b2 = weights[5];
  segnext::check_device(op, at::kCPU, {{"x", &x}, {"w1", &w1}, {"b1", &b1}, {"wd", &wd},
                                       {"bd", &bd}, {"w2", &w2}, {"b2", &b2}});
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  const int64_t C = x.size(1);
  TORCH_CHECK(w1.dim() == 4 && w1.size(1) == C && w1.size(2) == 1 && w1.size(3) == 1,
              op, ": w1 must have shape (hidden, ", C, ", 1, 1), got ", w1.sizes());
  const int64_t Hd = w1.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == Hd, op, ": b1 must have shape (", Hd, "), got ",
              b1.sizes());
  TORCH_CHECK(wd.dim() == 4 && wd.size(0) == Hd && wd.size(1) == 1 && wd.size(2) == 3 &&
                  wd.size(3) == 3,
              op, ": wd must have shape (", Hd, ", 1, 3, 3), got ", wd.sizes());
  TORCH_CHECK(bd.dim() == 1 && bd.size(0) == Hd, op, ": bd must have shape (", Hd, "), got ",
              bd.sizes());
  TORCH_CHECK(w2.dim() == 4 && w2.size(0) == C && w2.size(1) == Hd && w2.size(2) == 1 &&
                  w2.size(3) == 1,
              op, ": w2 must have shape (", C, ", ", Hd, ", 1, 1), got ", w2.sizes());
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == C, op, ": b2 must have shape (", C, "), got ",
              b2.sizes());
  for (const at::Tensor* t : {&w1, &b1, &wd, &bd, &w2, &b2}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": weights must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
  if (x.numel() == 0) return at::empty_like(x);
  // The GEMMs below are internal: no autograd for them, whatever the inputs require (they run
  // on detached views, also in the worker threads).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor xc = x.detach().contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::ChannelsLast);
  if (poison_outputs()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    PackedFilter<T> f(wd.detach(), bd.detach(), Hd);
    f.fold_input_bias(b1.detach(), Hd);
    // (the weights as passed: the cache knows them by their TensorImpl). fc2 reads the
    // padded hidden rows.
#ifdef SEGNEXT_GEMM_BF16
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (C % 2 == 0) {  // bfloat16 dot products; the GELU rows rounded to bfloat16 for fc2
        const auto w1p = packed<PackedBf16>(w1, C);
        const auto w2p = packed<PackedBf16>(w2, f.Cp);
        mlp_forward_cl<scalar_t, T, c10::BFloat16>(xc, *w1p, f, *w2p, b2.detach(), y);
        return;
      }
    }
#endif
    const auto w1p = packed_weight<T>(w1, C);
    const auto w2p = packed_weight<T>(w2, f.Cp);
    mlp_forward_cl<scalar_t, T, T>(xc, *w1p, f, *w2p, b2.detach(), y);
  });
  return in_format_of(y, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(segnext_C, CPU, m) { m.impl("mlp_forward", &mlp_forward_cpu); }

}  // namespace segnext
