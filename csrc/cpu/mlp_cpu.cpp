// The whole MSCAN MLP for inference, CPU:  y = fc2(gelu(dw3x3(fc1(x))))
// (fc1: C -> Hd 1x1 conv with bias, dw3x3: depthwise 3x3 with bias, fc2: Hd -> C 1x1 with bias.)
//
// The hidden activation has Hd = 4C or 8C channels: the largest tensor of the network (16 MB
// per block at SegNeXt-T's stage 1 for a 512x512 image). Eager PyTorch writes it and reads it
// back three times (fc1 out, dwconv out, GELU out), each a fresh allocation. Here it never
// leaves the cache: a task owns a band of rows of one image and walks down it in chunks of R
// rows, keeping the fc1 output of the chunk plus one row above and below (the dwconv's halo)
// in a per-task buffer; the two overlap rows roll over to the next chunk, so fc1 is computed
// once per row except at band edges. fc1 and fc2 are ATen GEMMs (MKL/oneDNN sgemm) on the
// chunk, run single-threaded inside the task; the dwconv + GELU is dwconv_gelu.h's row kernel,
// which also adds fc1's bias (folded into its own, see PackedFilter::fold_input_bias).
//
// Forward only: with autograd the Python side runs fc1, the dwconv_gelu op and fc2 instead.
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
#include "poison.h"
#include "simd.h"

namespace segnext {
namespace {

// Rows per chunk: the task's working set, the fc1 buffer ((R + 2) rows of W * Hd values) and the
// GELU rows (R more), stays near 1.5 MB, inside this machine's 2 MB L2.
inline int64_t chunk_rows(int64_t W, int64_t Hd, int64_t elem) {
  const int64_t row_bytes = std::max<int64_t>(1, W * Hd * elem);
  return std::max<int64_t>(1, ((1536 * 1024) / row_bytes - 2) / 2);
}

template <typename scalar_t, typename T>
void mlp_forward_cl(const at::Tensor& x, const at::Tensor& w1t, const PackedFilter<T>& f, const at::Tensor& w2t, const at::Tensor& b2,
                    at::Tensor& y) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hd = w1t.size(1);
  const int64_t R = chunk_rows(W, Hd, sizeof(scalar_t));
  // Bands: enough per image to give every thread work, each a whole number of chunks if
  // possible; a band recomputes the fc1 rows just above and below it.
  const int64_t threads = at::get_num_threads();
  // (at least 4 rows each: a band recomputes 2 fc1 rows).
  const int64_t bands_per_image =
      std::min<int64_t>(ceil_div(H, 4), std::max<int64_t>(1, ceil_div(threads, B)));
  const int64_t band = ceil_div(H, bands_per_image);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const auto opts = x.options();
  // fc1 runs without its bias (no pass over the hidden to add it): the dwconv folds it in
  // (PackedFilter::fold_input_bias), and rows outside the image hold -b1.
  std::vector<scalar_t> pad_row(W * Hd);
  for (int64_t w = 0; w < W; ++w) {
    for (int64_t c = 0; c < Hd; ++c) pad_row[w * Hd + c] = static_cast<scalar_t>(f.pad[c]);
  }

  at::parallel_for(0, B * bands_per_image, 1, [&](int64_t begin, int64_t end) {
    // hid row k holds fc1 of image row r0 - 1 + k; act holds the chunk's GELU output.
    at::Tensor hid = at::empty({(R + 2) * W, Hd}, opts);
    at::Tensor act = at::empty({R * W, Hd}, opts);
    if (poison_outputs()) {  // the scratch too: a row read before it is written shows up
      hid.fill_(std::numeric_limits<double>::quiet_NaN());
      act.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    scalar_t* hp = hid.data_ptr<scalar_t>();
    scalar_t* ap = act.data_ptr<scalar_t>();
    const int64_t row = W * Hd;
    auto fc1_rows = [&](int64_t b, int64_t first, int64_t count, int64_t slot) {
      // fc1 of image rows [first, first + count) into hid rows from `slot`; x rows of one
      // image are contiguous in channels-last, so this is one GEMM.
      if (count <= 0) return;
      at::Tensor in = at::from_blob(const_cast<scalar_t*>(xp) + ((b * H + first) * W) * C,
                                    {count * W, C}, opts);
      at::Tensor out = hid.narrow(0, slot * W, count * W);
      at::mm_out(out, in, w1t);
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / bands_per_image;
      const int64_t h0 = (task % bands_per_image) * band, h1 = std::min(H, h0 + band);
      if (h0 >= h1) continue;
      // First chunk: fc1 rows h0 - 1 .. min(h0 + R, H - 1) (those inside the image).
      int64_t r0 = h0;
      {
        const int64_t lo = std::max<int64_t>(0, r0 - 1);
        const int64_t hi = std::min<int64_t>({H, h1 + 1, r0 + R + 1});
        fc1_rows(b, lo, hi - lo, lo - (r0 - 1));
      }
      while (true) {
        const int64_t n = std::min(R, h1 - r0);
        // dwconv + GELU of rows r0 .. r0 + n - 1 (hid rows 1 .. n).
        for (int64_t k = 0; k < n; ++k) {
          const int64_t h = r0 + k;
          const scalar_t* rows[3];
          for (int i = 0; i < 3; ++i) {
            const int64_t hh = h + i - 1;
            rows[i] = (hh >= 0 && hh < H) ? hp + (k + i) * row : pad_row.data();
          }
          dwconv_gelu_row(rows, f, ap + k * row, W, Hd);
        }
        // fc2 straight into the output rows (contiguous in channels-last).
        at::Tensor yout = at::from_blob(yp + ((b * H + r0) * W) * C, {n * W, C}, opts);
        at::addmm_out(yout, b2, act.narrow(0, 0, n * W), w2t);
        r0 += n;
        if (r0 >= h1) break;
        // Roll: image rows r0 - 1 and r0 (hid rows n and n + 1) become hid rows 0 and 1.
        std::copy(hp + n * row, hp + (n + 2) * row, hp);
        const int64_t next = std::min(R, h1 - r0);
        const int64_t lo = r0 + 1, hi = std::min<int64_t>(H, r0 + next + 1);
        fc1_rows(b, lo, hi - lo, 2);
      }
    }
  });
}

at::Tensor mlp_fwd_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                       const at::Tensor& wd, const at::Tensor& bd, const at::Tensor& w2,
                       const at::Tensor& b2) {
  segnext::check_device("mlp_fwd", at::kCPU, {{"x", &x}, {"w1", &w1}, {"b1", &b1}, {"wd", &wd},
                                               {"bd", &bd}, {"w2", &w2}, {"b2", &b2}});
  TORCH_CHECK(x.dim() == 4, "mlp_fwd: x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  const int64_t C = x.size(1);
  TORCH_CHECK(w1.dim() == 4 && w1.size(1) == C && w1.size(2) == 1 && w1.size(3) == 1,
              "mlp_fwd: w1 must have shape (hidden, ", C, ", 1, 1), got ", w1.sizes());
  const int64_t Hd = w1.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == Hd, "mlp_fwd: b1 must have shape (", Hd,
              "), got ", b1.sizes());
  TORCH_CHECK(wd.dim() == 4 && wd.size(0) == Hd && wd.size(1) == 1 && wd.size(2) == 3 &&
                  wd.size(3) == 3,
              "mlp_fwd: wd must have shape (", Hd, ", 1, 3, 3), got ", wd.sizes());
  TORCH_CHECK(bd.dim() == 1 && bd.size(0) == Hd, "mlp_fwd: bd must have shape (", Hd,
              "), got ", bd.sizes());
  TORCH_CHECK(w2.dim() == 4 && w2.size(0) == C && w2.size(1) == Hd && w2.size(2) == 1 &&
                  w2.size(3) == 1,
              "mlp_fwd: w2 must have shape (", C, ", ", Hd, ", 1, 1), got ", w2.sizes());
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == C, "mlp_fwd: b2 must have shape (", C,
              "), got ", b2.sizes());
  for (const at::Tensor* t : {&w1, &b1, &wd, &bd, &w2, &b2}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "mlp_fwd: weights must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
  if (x.numel() == 0) return at::empty_like(x);
  // The GEMMs below are internal: no autograd for them, whatever the inputs require (they run
  // on detached views, also in the worker threads).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor xc = x.detach().contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::ChannelsLast);
  if (poison_outputs()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  const at::Tensor w1t = w1.detach().reshape({Hd, C}).t();  // (C, Hd): GEMMs take it transposed
  const at::Tensor w2t = w2.detach().reshape({C, Hd}).t();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mlp_fwd", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    PackedFilter<T> f(wd, bd, Hd);
    f.fold_input_bias(b1.detach(), Hd);
    mlp_forward_cl<scalar_t, T>(xc, w1t, f, w2t, b2.detach().contiguous(), y);
  });
  at::Tensor out = at::empty_like(x);
  if (out.strides() == y.strides()) return y;
  out.copy_(y);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segnext, CPU, m) { m.impl("mlp_fwd", &mlp_fwd_cpu); }

}  // namespace segnext
