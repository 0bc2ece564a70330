// NMF2D of the Hamburger head, CPU forward (inference), on channels-last maps.
//
// Per item (image b, channel group s): X is D x N (D = C / S channels, N = H * W pixels),
// bases B is D x R, coef C is N x R, K = steps:
//
//   U_t = X^T B_t,  G_t = B_t^T B_t
//   C_0 = softmax(inv_t U_0)                               (over R)
//   C_{t+1} = C_t * U_t / (C_t G_t + eps)          t = 0..K
//   B_{t+1} = B_t * (X C_{t+1}) / (B_t (C_{t+1}^T C_{t+1}) + eps)    t = 0..K-1
//   Y = B_K C_{K+1}^T
//
// which is the reference's order of updates (segnext_kernels/nmf2d/reference.py).
//
// * A channels-last map holds X^T: pixel rows of C channels, the group's D at offset s * D.
//   So U = X^T B and Y^T = C B^T are GEMMs over pixel rows (gemm.h), and X C = (C^T X^T)^T is a
//   GEMM that sums over the pixels; nothing is transposed or copied at full size.
// * One pass over X per step: the pixels are cut into chunks; a chunk's X rows are copied once
//   into a zero-padded buffer of the accumulation type (in L2), and everything that needs them
//   is done while they are there: U, the softmax init (step 0 shares U_0 with the first update),
//   the coef update, and the partial sums of X C and C^T C for the bases update; on the last
//   pass the reconstruction, written straight to the output rows. K + 1 passes in all, against
//   2K + 2 products with X in the reference.
// * Chunks are grouped in slots that depend on N only; a slot's partial sums are accumulated in
//   chunk order and the slots are summed in slot order, so the result is bitwise identical for
//   any number of threads.
// * Values are not checked (as in the reference and mmseg's NMF2D): NaN in gives NaN out.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm.h"
#include "layout.h"
#include "poison.h"
#include "scratch.h"
#include "simd.h"

namespace segnext {
namespace {

thread_local ThreadScratch tls_chunk_scratch;  // a worker's chunk buffers
thread_local ThreadScratch tls_call_scratch;   // the calling thread's per-call state

struct NmfPlan {
  int64_t items, S, D, N, R, C;  // items = B * S
  int64_t Dp, Rp;                // padded to whole vectors
  int64_t chunk;                 // pixels per chunk
  int64_t slot;                  // pixels per slot (a multiple of chunk)
  int64_t nslots;
};

template <typename T>
NmfPlan make_plan(int64_t B, int64_t S, int64_t D, int64_t N, int64_t R) {
  constexpr int L = Lanes<T>::L;
  NmfPlan p;
  p.items = B * S, p.S = S, p.D = D, p.N = N, p.R = R, p.C = S * D;
  p.Dp = round_up(D, L), p.Rp = round_up(R, L);
  // A chunk's X rows take about a quarter of L2.
  p.chunk = std::clamp<int64_t>(l2_cache_bytes() / 4 / (p.Dp * sizeof(T)), 16, 512);
  // Up to 16 slots per item: work for the threads, and partial sums no larger than needed.
  p.slot = round_up(std::max<int64_t>(ceil_div(N, 16), 1), p.chunk);
  p.nslots = ceil_div(N, p.slot);
  return p;
}

// The per-item state of the iteration, in the accumulation type; padded rows and columns are
// zeros and stay zeros (every update multiplies by them).
template <typename T>
struct ItemState {
  T* coef;   // N x Rp
  T* bases;  // Dp x Rp
  T* part_p; // nslots x Rp x Dp: per slot, sum over its pixels of C^T X^T (= (X C)^T)
  T* part_q; // nslots x Rp x Rp: per slot, C^T C
  PackedB<T> b_for_u;   // B as the right operand of U = X^T B   (K = Dp, columns R)
  PackedB<T> bt_for_y;  // B^T as the right operand of Y^T = C B^T (K = R, columns D)
  PackedB<T> gram;      // G = B^T B                                (K = R, columns R)
};

// Packs a row-major K x Ncols matrix (row stride ld) as a gemm.h right operand.
template <typename T>
void pack_matrix(PackedB<T>& P, const T* m, int64_t ld, int64_t K, int64_t Ncols) {
  constexpr int L = Lanes<T>::L;
  const int64_t nv = ceil_div(Ncols, L);
  if (P.data == nullptr || P.K != K || P.nv != nv) {
    std::free(P.data);
    P.data = static_cast<T*>(std::aligned_alloc(64, round_up(nv * K * L * sizeof(T), 64)));
    TORCH_CHECK(P.data != nullptr, "nmf2d (cpu): cannot allocate packed operands");
  }
  P.K = K, P.N = Ncols, P.nv = nv;
  std::fill(P.data, P.data + nv * K * L, T(0));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < Ncols; ++n) P.data[((n / L) * K + k) * L + n % L] = m[k * ld + n];
}

// G = B^T B, then the packed operands of the coming pass.
template <typename T>
void prepare_pass_operands(const NmfPlan& p, ItemState<T>& st, T* scratch_rr) {
  constexpr int L = Lanes<T>::L;
  const int64_t Rp = p.Rp, Dp = p.Dp, R = p.R;
  // G[r][r'] = sum_d B[d][r] B[d][r']: rows r of B^T (column stride Rp), vectors over r'.
  std::fill(scratch_rr, scratch_rr + Rp * Rp, T(0));
  gemm_strided(st.bases, 1, Rp, R, st.bases, Rp, L, Rp / L, Dp,
               [&](int64_t m0, int64_t v0, const auto& acc) {
                 for (int i = 0; i < tile_m<decltype(acc)>; ++i)
                   for (int j = 0; j < tile_v<decltype(acc)>; ++j)
                     vstoreu(scratch_rr + (m0 + i) * Rp + (v0 + j) * L, acc[i][j]);
               });
  pack_matrix(st.gram, scratch_rr, Rp, R, Rp);
  pack_matrix(st.b_for_u, st.bases, Rp, Dp, Rp);
  // B^T as K = R rows of D columns.
  std::vector<T> bt(R * Dp);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < Dp; ++d) bt[r * Dp + d] = st.bases[d * Rp + r];
  pack_matrix(st.bt_for_y, bt.data(), Dp, R, Dp);
}

// One pass over the pixels [n0, n1) of one item (a slot): see the top of the file.
template <typename scalar_t, typename T>
void slot_pass(const NmfPlan& p, ItemState<T>& st, const scalar_t* xt, T* yt,
               int64_t slot_index, int64_t n0, int64_t n1, bool first, bool last, T eps, T inv_t) {
  constexpr int L = Lanes<T>::L;
  using V = vec_t<T>;
  const int64_t Dp = p.Dp, Rp = p.Rp, R = p.R, D = p.D, C = p.C, nc = p.chunk;
  Carver sizing(nullptr);
  sizing.take<T>(nc * Dp), sizing.take<T>(nc * Rp), sizing.take<T>(nc * Rp);
  Carver cv(static_cast<char*>(tls_chunk_scratch.get(sizing.used())));
  T* xc = cv.take<T>(nc * Dp);  // the chunk's X^T rows, zero padded
  T* u = cv.take<T>(nc * Rp);   // U = X^T B
  T* cn = cv.take<T>(nc * Rp);  // the updated coef rows

  T* pp = st.part_p + slot_index * Rp * Dp;
  T* pq = st.part_q + slot_index * Rp * Rp;
  if (!last) {
    std::fill(pp, pp + Rp * Dp, T(0));
    std::fill(pq, pq + Rp * Rp, T(0));
  }
  const V veps = vsplat(eps);
  for (int64_t c0 = n0; c0 < n1; c0 += nc) {
    const int64_t m = std::min(nc, n1 - c0);
    // X^T rows, converted and zero padded.
    for (int64_t i = 0; i < m; ++i) {
      const scalar_t* src = xt + (c0 + i) * C;
      T* dst = xc + i * Dp;
      int64_t d = 0;
      for (; d + L <= D; d += L) {
        vstore(dst + d, load_lanes<T>(src + d));
      }
      if (d < D) {
        vstore(dst + d, load_lanes<T>(src + d, static_cast<int>(D - d)));
        d += L;
      }
      for (; d < Dp; d += L) vstore(dst + d, V{});
    }
    // U = X^T B.
    gemm(xc, Dp, m, st.b_for_u, [&](int64_t m0, int64_t v0, const auto& acc) {
      for (int i = 0; i < tile_m<decltype(acc)>; ++i)
        for (int j = 0; j < tile_v<decltype(acc)>; ++j)
          vstore(u + (m0 + i) * Rp + (v0 + j) * L, acc[i][j]);
    });
    T* coef = st.coef + c0 * Rp;
    if (first) {  // C_0 = softmax(inv_t U_0) over the R columns (padded columns 0)
      for (int64_t i = 0; i < m; ++i) {
        const T* ui = u + i * Rp;
        T* ci = coef + i * Rp;
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t r = 0; r < R; ++r) mx = std::max(mx, inv_t * ui[r]);
        T sum = T(0);
        for (int64_t r = 0; r < R; ++r) {
          ci[r] = std::exp(inv_t * ui[r] - mx);
          sum += ci[r];
        }
        for (int64_t r = 0; r < R; ++r) ci[r] /= sum;
        for (int64_t r = R; r < Rp; ++r) ci[r] = T(0);
      }
    }
    // C_new = C * U / (C G + eps).
    gemm(coef, Rp, m, st.gram, [&](int64_t m0, int64_t v0, const auto& acc) {
      for (int i = 0; i < tile_m<decltype(acc)>; ++i)
        for (int j = 0; j < tile_v<decltype(acc)>; ++j) {
          const int64_t o = (m0 + i) * Rp + (v0 + j) * L;
          vstore(cn + o, vload(coef + o) * vload(u + o) / (acc[i][j] + veps));
        }
    });
    if (last) {
      // Y^T = C B^T into the output rows (the group's D channels of each pixel).
      const int64_t full = D / L, tail = D - full * L;
      gemm(cn, Rp, m, st.bt_for_y, [&](int64_t m0, int64_t v0, const auto& acc) {
        for (int i = 0; i < tile_m<decltype(acc)>; ++i) {
          T* o = yt + (c0 + m0 + i) * C;
          for (int j = 0; j < tile_v<decltype(acc)>; ++j) {
            const int64_t v = v0 + j;
            if (v < full) {
              store_lanes<T>(o + v * L, acc[i][j]);
            } else {
              store_lanes<T>(o + v * L, acc[i][j], static_cast<int>(tail));
            }
          }
        }
      });
      continue;
    }
    std::copy(cn, cn + m * Rp, coef);
    // (X C)^T += C^T X^T and C^T C over the chunk's pixels: rows r of C^T (column stride Rp).
    gemm_strided(cn, 1, Rp, R, xc, Dp, L, Dp / L, m, [&](int64_t m0, int64_t v0, const auto& acc) {
      for (int i = 0; i < tile_m<decltype(acc)>; ++i)
        for (int j = 0; j < tile_v<decltype(acc)>; ++j) {
          T* o = pp + (m0 + i) * Dp + (v0 + j) * L;
          vstore(o, vload(o) + acc[i][j]);
        }
    });
    gemm_strided(cn, 1, Rp, R, cn, Rp, L, Rp / L, m, [&](int64_t m0, int64_t v0, const auto& acc) {
      for (int i = 0; i < tile_m<decltype(acc)>; ++i)
        for (int j = 0; j < tile_v<decltype(acc)>; ++j) {
          T* o = pq + (m0 + i) * Rp + (v0 + j) * L;
          vstore(o, vload(o) + acc[i][j]);
        }
    });
  }
}

// B = B * P / (B Q + eps), P = X C and Q = C^T C summed over the slots in order.
template <typename T>
void bases_update(const NmfPlan& p, ItemState<T>& st, T eps, T* scratch) {
  constexpr int L = Lanes<T>::L;
  const int64_t Dp = p.Dp, Rp = p.Rp, R = p.R;
  T* pt = scratch;               // Rp x Dp: (X C)^T
  T* q = scratch + Rp * Dp;      // Rp x Rp
  T* bn = q + Rp * Rp;           // Dp x Rp: the new bases
  std::copy(st.part_p, st.part_p + Rp * Dp, pt);
  std::copy(st.part_q, st.part_q + Rp * Rp, q);
  for (int64_t s = 1; s < p.nslots; ++s) {
    const T* sp = st.part_p + s * Rp * Dp;
    for (int64_t i = 0; i < Rp * Dp; i += L) vstore(pt + i, vload(pt + i) + vload(sp + i));
    const T* sq = st.part_q + s * Rp * Rp;
    for (int64_t i = 0; i < Rp * Rp; i += L) vstore(q + i, vload(q + i) + vload(sq + i));
  }
  PackedB<T> qp;
  pack_matrix(qp, q, Rp, R, Rp);
  const vec_t<T> veps = vsplat(eps);
  // (B Q)[d][r] for the vectors of r; the epilogue finishes the update of those entries.
  gemm(st.bases, Rp, p.Dp, qp, [&](int64_t m0, int64_t v0, const auto& acc) {
    for (int i = 0; i < tile_m<decltype(acc)>; ++i)
      for (int j = 0; j < tile_v<decltype(acc)>; ++j) {
        const int64_t d = m0 + i, r0 = (v0 + j) * L;
        vec_t<T> pv;
        for (int l = 0; l < L; ++l) pv[l] = pt[(r0 + l) * Dp + d];
        const int64_t o = d * Rp + r0;
        vstore(bn + o, vload(st.bases + o) * pv / (acc[i][j] + veps));
      }
  });
  std::copy(bn, bn + Dp * Rp, st.bases);
}

template <typename scalar_t, typename T>
void nmf_forward(const at::Tensor& xcl, const at::Tensor& bases, at::Tensor& ycl, int64_t S,
                 int64_t steps, T eps, T inv_t) {
  const int64_t B = xcl.size(0), C = xcl.size(1), N = xcl.size(2) * xcl.size(3);
  const int64_t D = C / S, R = bases.size(2);
  const NmfPlan p = make_plan<T>(B, S, D, N, R);
  const int64_t Dp = p.Dp, Rp = p.Rp;

  // Per-call state of every item, in the calling thread's scratch.
  Carver sizing(nullptr);
  for (int64_t it = 0; it < p.items; ++it) {
    sizing.take<T>(N * Rp), sizing.take<T>(Dp * Rp);
    sizing.take<T>(p.nslots * Rp * Dp), sizing.take<T>(p.nslots * Rp * Rp);
    sizing.take<T>(Rp * Dp + Rp * Rp + Dp * Rp);
  }
  Carver cv(static_cast<char*>(tls_call_scratch.get(sizing.used())));
  std::vector<ItemState<T>> items(p.items);
  std::vector<T*> update_scratch(p.items);
  const at::Tensor b0 = bases.contiguous();
  const T* b0p = b0.data_ptr<T>();
  for (int64_t it = 0; it < p.items; ++it) {
    ItemState<T>& st = items[it];
    st.coef = cv.take<T>(N * Rp);
    st.bases = cv.take<T>(Dp * Rp);
    st.part_p = cv.take<T>(p.nslots * Rp * Dp);
    st.part_q = cv.take<T>(p.nslots * Rp * Rp);
    update_scratch[it] = cv.take<T>(Rp * Dp + Rp * Rp + Dp * Rp);
    std::fill(st.bases, st.bases + Dp * Rp, T(0));
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < R; ++r) st.bases[d * Rp + r] = b0p[(it * D + d) * R + r];
  }
  if (poison_outputs()) {  // the state too: a coef row read before it is written shows up
    for (auto& st : items) std::fill(st.coef, st.coef + N * Rp, std::numeric_limits<T>::quiet_NaN());
  }
  const scalar_t* xp = xcl.data_ptr<scalar_t>();
  T* yp = ycl.data_ptr<T>();

  at::parallel_for(0, p.items, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rr(Rp * Rp);
    for (int64_t it = begin; it < end; ++it) prepare_pass_operands(p, items[it], rr.data());
  });
  for (int64_t t = 0; t <= steps; ++t) {
    const bool first = t == 0, last = t == steps;
    at::parallel_for(0, p.items * p.nslots, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t it = task / p.nslots, s = task % p.nslots;
        const int64_t b = it / S, g = it % S;
        const int64_t n0 = s * p.slot, n1 = std::min(N, n0 + p.slot);
        slot_pass<scalar_t, T>(p, items[it], xp + b * N * C + g * D, yp + b * N * C + g * D, s,
                               n0, n1, first, last, eps, inv_t);
      }
    });
    if (last) break;
    at::parallel_for(0, p.items, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> rr(Rp * Rp);
      for (int64_t it = begin; it < end; ++it) {
        bases_update(p, items[it], eps, update_scratch[it]);
        prepare_pass_operands(p, items[it], rr.data());
      }
    });
  }
}

at::Tensor nmf2d_forward_cpu(const at::Tensor& x, const at::Tensor& bases, int64_t S,
                             int64_t steps, double eps, double inv_t) {
  constexpr const char* op = "nmf2d_forward";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(S >= 1 && x.size(1) % S == 0, op, ": S must be >= 1 and divide C = ",
                    x.size(1), ", got ", S);
  TORCH_CHECK_VALUE(steps >= 0, op, ": steps must be >= 0, got ", steps);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, op, ": eps must be finite and > 0, got ",
                    eps);
  TORCH_CHECK_VALUE(std::isfinite(inv_t), op, ": inv_t must be finite, got ", inv_t);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                       x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   op, ": x must be float32, float64, bfloat16 or float16, got ",
                   x.scalar_type());
  const int64_t B = x.size(0), D = x.size(1) / S;
  TORCH_CHECK_VALUE(bases.dim() == 3 && bases.size(0) == B * S && bases.size(1) == D &&
                        bases.size(2) >= 1,
                    op, ": bases must have shape (B*S, D, R) = (", B * S, ", ", D,
                    ", R), got ", bases.sizes());
  TORCH_CHECK_TYPE(bases.scalar_type() == acc, op, ": bases must be ", acc, " for x of ",
                   x.scalar_type(), ", got ", bases.scalar_type());
  TORCH_CHECK(bases.device().is_cpu(), op, ": bases must be a CPU tensor, got ",
              bases.device());
  TORCH_CHECK_VALUE(x.numel() > 0, op, ": x must not be empty, got ", x.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor xcl = x.detach().contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor ycl = at::empty(xcl.sizes(), xcl.options().dtype(acc),
                             at::MemoryFormat::ChannelsLast);
  if (poison_outputs()) ycl.fill_(std::numeric_limits<double>::quiet_NaN());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // Half inputs are read as they are; the reconstruction is in the accumulation type.
    nmf_forward<scalar_t, T>(xcl, bases.detach(), ycl, S, steps, static_cast<T>(eps),
                             static_cast<T>(inv_t));
  });
  return in_format_of(ycl, x, acc);
}

}  // namespace

TORCH_LIBRARY_IMPL(segnext_C, CPU, m) { m.impl("nmf2d_forward", &nmf2d_forward_cpu); }

}  // namespace segnext
