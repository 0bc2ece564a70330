// Hand-written CUDA kernels of MSCA (SegNeXt's multi-scale convolutional attention).
//
//   a   = dw5x5(u) + b0                      (all depthwise convs: bias, zero 'same' padding)
//   h_k = dw(1 x k)(a) + bk_1                k in {7, 11, 21}
//   v_k = dw(k x 1)(h_k) + bk_2
//   s   = a + v_7 + v_11 + v_21
//   out = (W3 s + b3) * u                    (dense 1x1 conv, then the gate)
//
// Layout: channels-last (NHWC). A "pixel vector" is 16 bytes of channels: kVec = 8 channels for
// fp16/bf16, 4 for fp32; each thread computes one channel pair (float2) of it in fp32.
//
// Forward (2 launches):
//   msca_dw_forward_kernel: one block per (image, TH x TW output tile, pixel vector of channels).
//     smem holds u on the tile + 12-pixel halo, then a on the tile + 10-pixel halo (a is zero
//     outside the image: it is the strips' padding); per strip size, h_k on the haloed rows and
//     the vertical strip into register accumulators of s. s is written once (storage dtype).
//     Every 1-D conv is register-blocked along its direction: a thread streams N + K - 1 inputs
//     from smem for N outputs (N = 13..16), so each smem load feeds ~2K FMAs.
//   gemm_bias_gate_kernel: out = (s W3^T + b3) * u, 64x64 pixel x channel tiles, tensor cores
//     (nvcuda::wmma 16x16x16, fp16/bf16 in, fp32 accumulate) for half types; an exact fp32 SIMT
//     tile for float32 (so that float32 stays within 1e-4 of float64).
// Backward (8 launches; saves nothing but u, recomputes every intermediate):
//   dw forward again -> s; gemm (grad_u = g * (W3 s + b3)); gemm (grad_s = (g * u) W3);
//   split-K gemm over pixels for grad_W3 / grad_b3 partials + fixed-order reduction;
//   msca_dw_backward_strips_kernel: per tile, recompute a and h_k, grad_h_k = vertical
//     transpose conv of grad_s, strip weight gradients, grad_a = grad_s + sum_k horizontal
//     transpose conv of grad_h_k -> workspace; msca_dw_backward_5x5_kernel: grad_u += 5x5
//     transpose conv of grad_a, grad_w0 / grad_b0; weight-gradient partials are reduced per
//     block in a fixed order (warp butterfly + smem), written per tile, and summed over tiles in
//     a fixed order by dw_weight_grad_reduce_kernel. No float atomics anywhere.
//
// Floors and design estimates: docs/kernels.md#msca-cuda. Correctness on the CPU: the emulation
// harness of tests/cuda_emu/ runs these kernels (docs/cuda_emulation.md).
#include "msca_cuda.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// Tensor cores for the 1x1 conv of half types (bf16 WMMA needs sm_80). The host pass and
// sm_80+ device passes take the WMMA path; older device passes the SIMT one.
#if defined(SEGNEXT_MSCA_NO_TENSOR_CORES) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800)
#define SEGNEXT_MSCA_TC 0
#else
#define SEGNEXT_MSCA_TC 1
#endif

namespace segnext {
namespace msca_cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// dtype helpers
// ------------------------------------------------------------------------------------------------
template <typename T>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two adjacent channels (at an even element offset) <-> float2.
__device__ __forceinline__ float2 ld2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 ld2(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}
__device__ __forceinline__ float2 ld2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ void st2(float* p, float2 v) { *reinterpret_cast<float2*>(p) = v; }
__device__ __forceinline__ void st2(__half* p, float2 v) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v.x, v.y);
}
__device__ __forceinline__ void st2(__nv_bfloat16* p, float2 v) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v.x, v.y);
}

__device__ __forceinline__ void fma2(float2& acc, float2 w, float2 x) {
  acc.x = fmaf(w.x, x.x, acc.x);
  acc.y = fmaf(w.y, x.y, acc.y);
}
__device__ __forceinline__ void add2(float2& acc, float2 x) {
  acc.x += x.x;
  acc.y += x.y;
}

// One pixel vector (channels [c0, c0 + kVec)) from global memory into shared memory, zero for
// channels >= C. `vec`: C % kVec == 0 and 16-byte aligned tensors, so one 16-byte load.
template <typename T>
__device__ __forceinline__ void load_pixel(T* dst, const T* __restrict__ src, int nvalid, bool vec) {
  if (vec) {
    *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
  } else {
#pragma unroll
    for (int i = 0; i < kVecOf<T>; ++i) dst[i] = i < nvalid ? src[i] : from_f<T>(0.f);
  }
}

template <typename T>
__device__ __forceinline__ void zero_pixel(T* dst) {
  *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
}

// A channel pair (c, c + 1) of one pixel in global memory; nvalid = C - c (>= 1).
template <typename T>
__device__ __forceinline__ float2 load_pair(const T* __restrict__ src, int nvalid, bool vec) {
  if (vec) return ld2(src);
  return make_float2(to_f(src[0]), nvalid > 1 ? to_f(src[1]) : 0.f);
}

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float2 v, int nvalid, bool vec) {
  if (vec) {
    st2(dst, v);
  } else {
    dst[0] = from_f<T>(v.x);
    if (nvalid > 1) dst[1] = from_f<T>(v.y);
  }
}

// Taps of channel pair (c, c + 1) of a depthwise weight with K taps per channel (zero for
// channels >= C); `flip` reverses them (the transpose conv of the backward pass).
template <int K, typename T>
__device__ __forceinline__ void load_taps(const T* __restrict__ w, int c, int C, bool flip,
                                          float2 (&out)[K]) {
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int jj = flip ? K - 1 - j : j;
    out[j].x = c < C ? to_f(w[static_cast<int64_t>(c) * K + jj]) : 0.f;
    out[j].y = c + 1 < C ? to_f(w[static_cast<int64_t>(c + 1) * K + jj]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void load_taps_5x5(const T* __restrict__ w, int c, int C, bool flip,
                                              float2 (&out)[5][5]) {
#pragma unroll
  for (int i = 0; i < 5; ++i) {
#pragma unroll
    for (int j = 0; j < 5; ++j) {
      const int k = flip ? (4 - i) * 5 + (4 - j) : i * 5 + j;
      out[i][j].x = c < C ? to_f(w[static_cast<int64_t>(c) * 25 + k]) : 0.f;
      out[i][j].y = c + 1 < C ? to_f(w[static_cast<int64_t>(c + 1) * 25 + k]) : 0.f;
    }
  }
}

template <typename T>
__device__ __forceinline__ float2 load_bias(const T* __restrict__ b, int c, int C) {
  return make_float2(c < C ? to_f(b[c]) : 0.f, c + 1 < C ? to_f(b[c + 1]) : 0.f);
}

// ------------------------------------------------------------------------------------------------
// Register-blocked 1-D building blocks over shared memory (stride in elements between inputs)
// ------------------------------------------------------------------------------------------------

// acc[o] += sum_j w[j] * in(o + j), o < N: streams the N + K - 1 inputs once.
template <int K, int N, typename S>
__device__ __forceinline__ void conv_run(const S* in, int stride, const float2 (&w)[K],
                                         float2 (&acc)[N]) {
#pragma unroll
  for (int t = 0; t < N + K - 1; ++t) {
    const float2 x = ld2(in + t * stride);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int o = t - j;
      if (o >= 0 && o < N) fma2(acc[o], w[j], x);
    }
  }
}

// acc[j] += sum_o g[o] * in(o + j), j < K: the weight-gradient correlation.
template <int K, int N, typename S>
__device__ __forceinline__ void corr_run(const S* in, int stride, const float2 (&g)[N],
                                         float2* acc) {
#pragma unroll
  for (int t = 0; t < N + K - 1; ++t) {
    const float2 x = ld2(in + t * stride);
#pragma unroll
    for (int o = 0; o < N; ++o) {
      const int j = t - o;
      if (j >= 0 && j < K) fma2(acc[j], g[o], x);
    }
  }
}

// The dynamic shared memory of every kernel here (declared once: one alignment).
__device__ __forceinline__ unsigned char* dyn_smem() {
  extern __shared__ __align__(128) unsigned char segnext_msca_smem[];
  return segnext_msca_smem;
}

template <int N>
__device__ __forceinline__ void zero_run(float2 (&acc)[N]) {
#pragma unroll
  for (int o = 0; o < N; ++o) acc[o] = make_float2(0.f, 0.f);
}

// ------------------------------------------------------------------------------------------------
// Depthwise tiles
// ------------------------------------------------------------------------------------------------
constexpr int kHalo = 10;  // r of the 21-tap strips
constexpr int kSlots = 110;  // weight-gradient values per channel (see kSlotStart)
constexpr int kStripSlot0 = 26;  // slots [0, 26): w0, b0; [26, 110): the strips
constexpr int kRedMax = 26;  // largest number of values one block reduction handles

__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }

// Per-channel weight-gradient slots, in the op's parameter order: start and length of each of the
// 14 depthwise parameters (w0, b0, w0_1, b0_1, w0_2, b0_2, ..., w2_2, b2_2).
__host__ __device__ constexpr int slot_start(int i) {
  return i == 0 ? 0 : i == 1 ? 25 : i == 2 ? 26 : i == 3 ? 33 : i == 4 ? 34 : i == 5 ? 41
       : i == 6 ? 42 : i == 7 ? 53 : i == 8 ? 54 : i == 9 ? 65 : i == 10 ? 66 : i == 11 ? 87
       : i == 12 ? 88 : 109;
}
__host__ __device__ constexpr int slot_len(int i) {
  return i == 0 ? 25 : i == 2 || i == 4 ? 7 : i == 6 || i == 8 ? 11 : i == 10 || i == 12 ? 21 : 1;
}
static_assert(slot_start(13) + slot_len(13) == kSlots, "slot table");

// The slot table, the SEGNEXT_STRIP_* expansions and the launchers encode the weight contract
// (csrc/msca_weights.h): checked against it here.
constexpr bool slots_follow_contract() {
  for (int i = 0; i < msca::kNumDepthwiseWeights; ++i) {
    if (slot_len(i) != msca::weight_numel(i, 1)) return false;
    if (i > 0 && slot_start(i) != slot_start(i - 1) + slot_len(i - 1)) return false;
  }
  return slot_start(0) == 0;
}
static_assert(slots_follow_contract(), "the slot table does not follow csrc/msca_weights.h");
// SEGNEXT_STRIP_FWD/BWD(K, IW): branch (IW - 2) / 4 of size K, its 1xK weight at IW.
constexpr bool strip_expansion(int K, int IW) {
  return msca::weight_index(msca::strip_conv((IW - 2) / 4, false)) == IW &&
         msca::strip_size((IW - 2) / 4) == K;
}
static_assert(strip_expansion(7, 2) && strip_expansion(11, 6) && strip_expansion(21, 10),
              "strip branches");

template <typename T, int TH_, int TW_, int NT_>
struct DwTile {
  static constexpr int kVec = kVecOf<T>;
  static constexpr int NP = kVec / 2;  // channel pairs per pixel vector
  static constexpr int TH = TH_, TW = TW_, NT = NT_;
  static constexpr int R = kHalo;
  static constexpr int AH = TH + 2 * R, AW = TW + 2 * R, AP = AW | 1;  // a (and grad_s) region
  static constexpr int UH = AH + 4, UW = AW + 4, UP = UW | 1;          // u region
  static constexpr int HH = TH + 2 * R, HP = TW | 1;                   // h_k: rows x TW
  static constexpr int NA = AW / 4;  // run length of a along x
  static constexpr int NH = TW / 2;  // run length of h_k along x
  static constexpr int NRUN = TH * TW * NP / NT;  // run of the one-item-per-thread phases
  static_assert(AW % 4 == 0 && TW % 2 == 0, "tile width");
  static_assert(NT % 32 == 0 && 32 % NP == 0, "threads");
  static_assert((TH * TW * NP) % NT == 0 && TH % NRUN == 0 && TW % NRUN == 0, "runs");
  static constexpr int kPixelBytes = 16;
  // Odd pitches (in 16-byte pixels): lanes that walk consecutive rows hit distinct banks.
  static constexpr size_t fwd_smem_pixels() {
    return static_cast<size_t>(AH) * AP +
           std::max(static_cast<size_t>(UH) * UP, static_cast<size_t>(HH) * HP);
  }
  static constexpr size_t fwd_smem_bytes() { return fwd_smem_pixels() * kPixelBytes; }
};

// The backward kernels' extra geometry.
template <class Tile>
struct DwBwdTile : Tile {
  using Tile::TH;
  using Tile::TW;
  using Tile::NT;
  using Tile::R;
  using Tile::kVec;
  using Tile::kPixelBytes;
  using Tile::AH;
  using Tile::AP;
  using Tile::UH;
  using Tile::UP;
  using Tile::HH;
  using Tile::HP;
  static constexpr int NWARPS = NT / 32;
  static constexpr int GW = TW + 2 * R, GP = GW | 1;           // grad_h_k: TH x (TW + 2r)
  static constexpr int QH = TH + 4, QW = TW + 4, QP = QW | 1;  // 5x5 backward regions
  static constexpr size_t red_floats() {
    return static_cast<size_t>(NWARPS) * kRedMax * kVec + static_cast<size_t>(kSlots) * kVec;
  }
  static constexpr size_t strips_smem_bytes() {
    return (2 * static_cast<size_t>(AH) * AP +
            std::max(static_cast<size_t>(UH) * UP,
                     static_cast<size_t>(HH) * HP + static_cast<size_t>(TH) * GP)) *
               kPixelBytes +
           red_floats() * sizeof(float);
  }
  static constexpr size_t dw5_smem_bytes() {
    return 2 * static_cast<size_t>(QH) * QP * kPixelBytes + red_floats() * sizeof(float);
  }
};

template <typename T>
struct DwArgs {
  const T* u;      // input (NHWC)
  const T* g;      // grad_s (strips backward) / grad_a (5x5 backward)
  T* out;          // s (forward) / grad_a (strips backward) / grad_u (5x5 backward, accumulated)
  float* part;     // weight-gradient partials [tiles][C][kSlots]
  const T* w[msca::kNumDepthwiseWeights];  // the 14 depthwise parameters, contract order
  int N, H, W, C, tiles_x, tiles_y, ncv;
  bool vec;
};

struct TileIdx {
  int n, y0, x0, c0, tile;  // tile: global tile index n * tiles + t (partials row)
};

template <class Cfg>
__device__ __forceinline__ TileIdx decode_tile(int ncv, int tiles_x, int tiles_y) {
  // Channel vectors vary fastest, so the blocks sharing a tile's 32-byte sectors run together.
  int b = static_cast<int>(blockIdx.x);
  const int cv = b % ncv;
  b /= ncv;
  const int tiles = tiles_x * tiles_y;
  const int t = b % tiles;
  const int n = b / tiles;
  TileIdx r;
  r.n = n;
  r.y0 = (t / tiles_x) * Cfg::TH;
  r.x0 = (t % tiles_x) * Cfg::TW;
  r.c0 = cv * Cfg::kVec;
  r.tile = n * tiles + t;
  return r;
}

__device__ __forceinline__ int64_t pixel_offset(int n, int y, int x, int H, int W, int C) {
  return ((static_cast<int64_t>(n) * H + y) * W + x) * C;
}

// Stages rows [gy0, gy0 + RH) x cols [gx0, gx0 + RW) of an NHWC tensor, channels
// [c0, c0 + kVec), into shared memory (pitch RP pixels); zero outside the image.
template <typename T, int RH, int RW, int RP, int NT>
__device__ __forceinline__ void stage_region(T* dst, const T* __restrict__ src, int n, int gy0,
                                             int gx0, int c0, const DwArgs<T>& a) {
  constexpr int kVec = kVecOf<T>;
  const int nvalid = a.C - c0;
  for (int i = threadIdx.x; i < RH * RW; i += NT) {
    const int ry = i / RW, rx = i - ry * RW;
    const int gy = gy0 + ry, gx = gx0 + rx;
    T* d = dst + (ry * RP + rx) * kVec;
    if (gy >= 0 && gy < a.H && gx >= 0 && gx < a.W) {
      load_pixel(d, src + pixel_offset(n, gy, gx, a.H, a.W, a.C) + c0, nvalid, a.vec);
    } else {
      zero_pixel(d);
    }
  }
}

// a on the tile + 10-pixel halo (zero outside the image), from u on the tile + 12-pixel halo.
template <typename T, class Cfg>
__device__ __forceinline__ void compute_a(T* sa, const T* su, const TileIdx& t, const DwArgs<T>& a) {
  constexpr int kVec = Cfg::kVec, NP = Cfg::NP, NA = Cfg::NA, AH = Cfg::AH;
  constexpr int kItems = NP * AH * (Cfg::AW / NA);
  const int p = threadIdx.x % NP;  // constant over this thread's items (NT % NP == 0)
  const int c = t.c0 + 2 * p;
  float2 w[5][5];
  load_taps_5x5(a.w[0], c, a.C, false, w);
  const float2 b = load_bias(a.w[1], c, a.C);
  for (int item = threadIdx.x; item < kItems; item += Cfg::NT) {
    const int rest = item / NP;
    const int ar = rest % AH, ac0 = (rest / AH) * NA;
    const int gy = t.y0 - Cfg::R + ar, gx0 = t.x0 - Cfg::R + ac0;
    T* dst = sa + (ar * Cfg::AP + ac0) * kVec + 2 * p;
    if (gy < 0 || gy >= a.H || gx0 + NA <= 0 || gx0 >= a.W) {
#pragma unroll
      for (int o = 0; o < NA; ++o) st2(dst + o * kVec, make_float2(0.f, 0.f));
      continue;
    }
    float2 acc[NA];
    zero_run(acc);
#pragma unroll
    for (int i = 0; i < 5; ++i)
      conv_run<5, NA>(su + ((ar + i) * Cfg::UP + ac0) * kVec + 2 * p, kVec, w[i], acc);
#pragma unroll
    for (int o = 0; o < NA; ++o) {
      const int gx = gx0 + o;
      const bool inside = gx >= 0 && gx < a.W;
      st2(dst + o * kVec, inside ? make_float2(acc[o].x + b.x, acc[o].y + b.y) : make_float2(0.f, 0.f));
    }
  }
}

// h_k = dw(1 x K)(a) + b on rows [y0 - r, y0 + TH + r) x the tile's columns; zero on rows
// outside the image (the vertical strip's padding).
template <int K, typename T, class Cfg>
__device__ __forceinline__ void compute_h(T* sh, const T* sa, const TileIdx& t, const DwArgs<T>& a,
                                          const T* __restrict__ w1, const T* __restrict__ b1) {
  constexpr int kVec = Cfg::kVec, NP = Cfg::NP, NH = Cfg::NH, r = K / 2;
  constexpr int HHk = Cfg::TH + 2 * r;
  constexpr int kItems = NP * HHk * (Cfg::TW / NH);
  const int p = threadIdx.x % NP;
  const int c = t.c0 + 2 * p;
  float2 w[K];
  load_taps<K>(w1, c, a.C, false, w);
  const float2 b = load_bias(b1, c, a.C);
  for (int item = threadIdx.x; item < kItems; item += Cfg::NT) {
    const int rest = item / NP;
    const int hr = rest % HHk, hc0 = (rest / HHk) * NH;
    const int gy = t.y0 - r + hr;
    T* dst = sh + (hr * Cfg::HP + hc0) * kVec + 2 * p;
    if (gy < 0 || gy >= a.H || t.x0 + hc0 >= a.W) {
#pragma unroll
      for (int o = 0; o < NH; ++o) st2(dst + o * kVec, make_float2(0.f, 0.f));
      continue;
    }
    float2 acc[NH];
    zero_run(acc);
    conv_run<K, NH>(sa + ((hr + Cfg::R - r) * Cfg::AP + hc0 + Cfg::R - r) * kVec + 2 * p, kVec, w,
                    acc);
#pragma unroll
    for (int o = 0; o < NH; ++o) st2(dst + o * kVec, make_float2(acc[o].x + b.x, acc[o].y + b.y));
  }
}

// ------------------------------------------------------------------------------------------------
// Forward depthwise kernel: s = a + sum_k v_k
// ------------------------------------------------------------------------------------------------
template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT) msca_dw_forward_kernel(const DwArgs<T> a) {
  constexpr int kVec = Cfg::kVec, NP = Cfg::NP, NRUN = Cfg::NRUN, R = Cfg::R;
  T* sa = reinterpret_cast<T*>(dyn_smem());
  T* su = sa + Cfg::AH * Cfg::AP * kVec;
  T* sh = su;  // u is dead once a is computed

  const TileIdx t = decode_tile<Cfg>(a.ncv, a.tiles_x, a.tiles_y);
  stage_region<T, Cfg::UH, Cfg::UW, Cfg::UP, Cfg::NT>(su, a.u, t.n, t.y0 - R - 2, t.x0 - R - 2,
                                                      t.c0, a);
  __syncthreads();
  compute_a<T, Cfg>(sa, su, t, a);
  __syncthreads();

  // Vertical strips: thread = (channel pair p, column vc, rows [vr0, vr0 + NRUN)).
  const int p = threadIdx.x % NP, rest = threadIdx.x / NP;
  const int vc = rest % Cfg::TW, vr0 = (rest / Cfg::TW) * NRUN;
  const int c = t.c0 + 2 * p;
  float2 s[NRUN];
  zero_run(s);
  const T* vin = sh + (vr0 * Cfg::HP + vc) * kVec + 2 * p;
#define SEGNEXT_STRIP_FWD(K, IW)                                                   \
  {                                                                                \
    compute_h<K, T, Cfg>(sh, sa, t, a, a.w[IW], a.w[IW + 1]);                      \
    __syncthreads();                                                               \
    float2 w[K];                                                                   \
    load_taps<K>(a.w[IW + 2], c, a.C, false, w);                                   \
    const float2 b = load_bias(a.w[IW + 3], c, a.C);                               \
    _Pragma("unroll") for (int o = 0; o < NRUN; ++o) add2(s[o], b);                \
    conv_run<K, NRUN>(vin, Cfg::HP * kVec, w, s);                                  \
    __syncthreads();                                                               \
  }
  SEGNEXT_STRIP_FWD(7, 2)
  SEGNEXT_STRIP_FWD(11, 6)
  SEGNEXT_STRIP_FWD(21, 10)
#undef SEGNEXT_STRIP_FWD

  const int gx = t.x0 + vc;
  if (gx >= a.W || c >= a.C) return;
#pragma unroll
  for (int o = 0; o < NRUN; ++o) {
    const int gy = t.y0 + vr0 + o;
    if (gy >= a.H) break;
    add2(s[o], ld2(sa + ((vr0 + o + R) * Cfg::AP + vc + R) * kVec + 2 * p));
    store_pair(a.out + pixel_offset(t.n, gy, gx, a.H, a.W, a.C) + c, s[o], a.C - c, a.vec);
  }
}

// ------------------------------------------------------------------------------------------------
// Deterministic block reduction of per-thread channel-pair sums
// ------------------------------------------------------------------------------------------------
// acc[K] of every thread (thread's pair = threadIdx.x % NP) -> out[j * kVec + channel] = block
// sum. Fixed order: warp butterfly, then warps in index order. All threads must call it.
template <int K, class Cfg>
__device__ __forceinline__ void block_reduce_pairs(float2* acc, float* scratch, float* out) {
  constexpr int NP = Cfg::NP, kVec = Cfg::kVec;
  static_assert(K <= kRedMax, "scratch size");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < K; ++j) {
#pragma unroll
    for (int off = NP; off < 32; off <<= 1) {
      acc[j].x += __shfl_xor_sync(0xffffffffu, acc[j].x, off);
      acc[j].y += __shfl_xor_sync(0xffffffffu, acc[j].y, off);
    }
  }
  if (lane < NP) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      scratch[(warp * K + j) * kVec + 2 * lane] = acc[j].x;
      scratch[(warp * K + j) * kVec + 2 * lane + 1] = acc[j].y;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < K * kVec; i += Cfg::NT) {
    float v = 0.f;
    for (int w = 0; w < Cfg::NWARPS; ++w) v += scratch[w * K * kVec + i];
    out[i] = v;
  }
  __syncthreads();
}

// sred[slot * kVec + channel] (slots [slot0, slot0 + nslots)) -> part[tile][c][slot].
template <class Cfg>
__device__ __forceinline__ void write_partials(float* __restrict__ part, const float* sred,
                                               const TileIdx& t, int C, int slot0, int nslots) {
  constexpr int kVec = Cfg::kVec;
  for (int i = threadIdx.x; i < kVec * nslots; i += Cfg::NT) {
    const int cl = i / nslots, sl = i - cl * nslots;
    const int c = t.c0 + cl;
    if (c < C)
      part[(static_cast<int64_t>(t.tile) * C + c) * kSlots + slot0 + sl] = sred[(slot0 + sl) * kVec + cl];
  }
}

// ------------------------------------------------------------------------------------------------
// Backward, strips: grad_a (own pixels) and the strip weight gradients
// ------------------------------------------------------------------------------------------------
// grad_h_k on the tile's rows x columns [x0 - r, x0 + TW + r): the vertical transpose conv of
// grad_s (flipped taps); zero outside the image.
template <int K, typename T, class Cfg>
__device__ __forceinline__ void compute_grad_h(T* sgh, const T* sg, const TileIdx& t,
                                               const DwArgs<T>& a, const T* __restrict__ w2) {
  constexpr int kVec = Cfg::kVec, NP = Cfg::NP, NRUN = Cfg::NRUN, r = K / 2;
  constexpr int GWk = Cfg::TW + 2 * r;
  constexpr int kItems = NP * GWk * (Cfg::TH / NRUN);
  const int p = threadIdx.x % NP;
  const int c = t.c0 + 2 * p;
  float2 wf[K];
  load_taps<K>(w2, c, a.C, true, wf);
  for (int item = threadIdx.x; item < kItems; item += Cfg::NT) {
    const int rest = item / NP;
    const int gc = rest % GWk, r0 = (rest / GWk) * NRUN;
    const int gx = t.x0 - r + gc;
    T* dst = sgh + (r0 * Cfg::GP + gc) * kVec + 2 * p;
    if (gx < 0 || gx >= a.W || t.y0 + r0 >= a.H) {
#pragma unroll
      for (int o = 0; o < NRUN; ++o) st2(dst + o * Cfg::GP * kVec, make_float2(0.f, 0.f));
      continue;
    }
    float2 acc[NRUN];
    zero_run(acc);
    conv_run<K, NRUN>(sg + ((r0 + Cfg::R - r) * Cfg::AP + gc + Cfg::R - r) * kVec + 2 * p,
                      Cfg::AP * kVec, wf, acc);
#pragma unroll
    for (int o = 0; o < NRUN; ++o) {
      const bool inside = t.y0 + r0 + o < a.H;
      st2(dst + o * Cfg::GP * kVec, inside ? acc[o] : make_float2(0.f, 0.f));
    }
  }
}

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT) msca_dw_backward_strips_kernel(const DwArgs<T> a) {
  constexpr int kVec = Cfg::kVec, NP = Cfg::NP, NRUN = Cfg::NRUN, R = Cfg::R;
  T* sa = reinterpret_cast<T*>(dyn_smem());
  T* sg = sa + Cfg::AH * Cfg::AP * kVec;
  T* su = sg + Cfg::AH * Cfg::AP * kVec;
  T* sh = su;                               // after a is computed
  T* sgh = sh + Cfg::HH * Cfg::HP * kVec;
  float* scratch = reinterpret_cast<float*>(
      su + imax(Cfg::UH * Cfg::UP, Cfg::HH * Cfg::HP + Cfg::TH * Cfg::GP) * kVec);
  float* sred = scratch + Cfg::NWARPS * kRedMax * kVec;  // [kSlots][kVec]

  const TileIdx t = decode_tile<Cfg>(a.ncv, a.tiles_x, a.tiles_y);
  stage_region<T, Cfg::UH, Cfg::UW, Cfg::UP, Cfg::NT>(su, a.u, t.n, t.y0 - R - 2, t.x0 - R - 2,
                                                      t.c0, a);
  stage_region<T, Cfg::AH, Cfg::AW, Cfg::AP, Cfg::NT>(sg, a.g, t.n, t.y0 - R, t.x0 - R, t.c0, a);
  __syncthreads();
  compute_a<T, Cfg>(sa, su, t, a);
  __syncthreads();

  const int p = threadIdx.x % NP, rest = threadIdx.x / NP;
  const int c = t.c0 + 2 * p;
  // vertical mapping: column vc, rows [vr0, vr0 + NRUN); horizontal: row hr, cols [hc0, +NRUN)
  const int vc = rest % Cfg::TW, vr0 = (rest / Cfg::TW) * NRUN;
  const int hr = rest % Cfg::TH, hc0 = (rest / Cfg::TH) * NRUN;
  float2 ga[NRUN];  // grad_a of own pixels (row hr)
  zero_run(ga);

#define SEGNEXT_STRIP_BWD(K, IW)                                                               \
  {                                                                                            \
    constexpr int r = K / 2, base = slot_start(IW);                                            \
    compute_h<K, T, Cfg>(sh, sa, t, a, a.w[IW], a.w[IW + 1]);                                  \
    compute_grad_h<K, T, Cfg>(sgh, sg, t, a, a.w[IW + 2]);                                     \
    __syncthreads();                                                                           \
    {                                                                                          \
      /* grad w_k2[i] = sum_own grad_s(y, x) h_k(y + i - r, x) */                              \
      float2 g[NRUN];                                                                          \
      _Pragma("unroll") for (int o = 0; o < NRUN; ++o)                                         \
        g[o] = ld2(sg + ((vr0 + o + R) * Cfg::AP + vc + R) * kVec + 2 * p);                    \
      float2 acc[K];                                                                           \
      zero_run(acc);                                                                           \
      corr_run<K, NRUN>(sh + (vr0 * Cfg::HP + vc) * kVec + 2 * p, Cfg::HP * kVec, g, acc);     \
      block_reduce_pairs<K, Cfg>(acc, scratch, sred + (base + K + 1) * kVec);                  \
    }                                                                                          \
    {                                                                                          \
      /* grad w_k1[j] = sum_own grad_h(y, x) a(y, x + j - r); grad b_k1 = sum_own grad_h;   */ \
      /* grad_a(y, x) += sum_j w_k1[j] grad_h(y, x - j + r)                                 */ \
      float2 gh[NRUN];                                                                         \
      _Pragma("unroll") for (int o = 0; o < NRUN; ++o)                                         \
        gh[o] = ld2(sgh + (hr * Cfg::GP + hc0 + o + r) * kVec + 2 * p);                        \
      float2 acc[K + 1];                                                                       \
      zero_run(acc);                                                                           \
      corr_run<K, NRUN>(sa + ((hr + R) * Cfg::AP + hc0 + R - r) * kVec + 2 * p, kVec, gh, acc); \
      _Pragma("unroll") for (int o = 0; o < NRUN; ++o) add2(acc[K], gh[o]);                    \
      block_reduce_pairs<K + 1, Cfg>(acc, scratch, sred + base * kVec);                        \
    }                                                                                          \
    {                                                                                          \
      float2 wf[K];                                                                            \
      load_taps<K>(a.w[IW], c, a.C, true, wf);                                                 \
      conv_run<K, NRUN>(sgh + (hr * Cfg::GP + hc0) * kVec + 2 * p, kVec, wf, ga);              \
    }                                                                                          \
    __syncthreads(); /* sh, sgh are rewritten by the next strip */                             \
  }
  SEGNEXT_STRIP_BWD(7, 2)
  SEGNEXT_STRIP_BWD(11, 6)
  SEGNEXT_STRIP_BWD(21, 10)
#undef SEGNEXT_STRIP_BWD

  // grad_a += grad_s; grad b_k2 = sum_own grad_s (the same for the three strips).
  {
    float2 gsum[1];
    zero_run(gsum);
#pragma unroll
    for (int o = 0; o < NRUN; ++o) {
      const float2 g = ld2(sg + ((hr + R) * Cfg::AP + hc0 + o + R) * kVec + 2 * p);
      add2(ga[o], g);
      add2(gsum[0], g);
    }
    block_reduce_pairs<1, Cfg>(gsum, scratch, sred + slot_start(5) * kVec);
  }
  for (int i = threadIdx.x; i < kVec; i += Cfg::NT) {
    sred[slot_start(9) * kVec + i] = sred[slot_start(5) * kVec + i];
    sred[slot_start(13) * kVec + i] = sred[slot_start(5) * kVec + i];
  }
  const int gy = t.y0 + hr;
  if (gy < a.H && c < a.C) {
#pragma unroll
    for (int o = 0; o < NRUN; ++o) {
      const int gx = t.x0 + hc0 + o;
      if (gx >= a.W) break;
      store_pair(a.out + pixel_offset(t.n, gy, gx, a.H, a.W, a.C) + c, ga[o], a.C - c, a.vec);
    }
  }
  __syncthreads();
  write_partials<Cfg>(a.part, sred, t, a.C, kStripSlot0, kSlots - kStripSlot0);
}

// ------------------------------------------------------------------------------------------------
// Backward, 5x5: grad_u += dw5x5^T(grad_a); grad w0, grad b0
// ------------------------------------------------------------------------------------------------
template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT) msca_dw_backward_5x5_kernel(const DwArgs<T> a) {
  constexpr int kVec = Cfg::kVec, NP = Cfg::NP, NRUN = Cfg::NRUN, QP = Cfg::QP;
  T* sga = reinterpret_cast<T*>(dyn_smem());
  T* su = sga + Cfg::QH * QP * kVec;
  float* scratch = reinterpret_cast<float*>(su + Cfg::QH * QP * kVec);
  float* sred = scratch + Cfg::NWARPS * kRedMax * kVec;

  const TileIdx t = decode_tile<Cfg>(a.ncv, a.tiles_x, a.tiles_y);
  stage_region<T, Cfg::QH, Cfg::QW, QP, Cfg::NT>(sga, a.g, t.n, t.y0 - 2, t.x0 - 2, t.c0, a);
  stage_region<T, Cfg::QH, Cfg::QW, QP, Cfg::NT>(su, a.u, t.n, t.y0 - 2, t.x0 - 2, t.c0, a);
  __syncthreads();

  const int p = threadIdx.x % NP, rest = threadIdx.x / NP;
  const int c = t.c0 + 2 * p;
  const int hr = rest % Cfg::TH, hc0 = (rest / Cfg::TH) * NRUN;
  {
    // grad_u(y, x) += sum_ij w0[4 - i][4 - j] grad_a(y - 2 + i, x - 2 + j)
    float2 wf[5][5];
    load_taps_5x5(a.w[0], c, a.C, true, wf);
    float2 acc[NRUN];
    zero_run(acc);
#pragma unroll
    for (int i = 0; i < 5; ++i)
      conv_run<5, NRUN>(sga + ((hr + i) * QP + hc0) * kVec + 2 * p, kVec, wf[i], acc);
    const int gy = t.y0 + hr;
    if (gy < a.H && c < a.C) {
#pragma unroll
      for (int o = 0; o < NRUN; ++o) {
        const int gx = t.x0 + hc0 + o;
        if (gx >= a.W) break;
        T* dst = a.out + pixel_offset(t.n, gy, gx, a.H, a.W, a.C) + c;
        float2 v = load_pair(dst, a.C - c, a.vec);
        add2(v, acc[o]);
        store_pair(dst, v, a.C - c, a.vec);
      }
    }
  }
  {
    // grad w0[i][j] = sum_own grad_a(y, x) u(y + i - 2, x + j - 2); grad b0 = sum_own grad_a
    float2 g[NRUN];
#pragma unroll
    for (int o = 0; o < NRUN; ++o) g[o] = ld2(sga + ((hr + 2) * QP + hc0 + o + 2) * kVec + 2 * p);
    float2 acc[26];
    zero_run(acc);
#pragma unroll
    for (int i = 0; i < 5; ++i)
      corr_run<5, NRUN>(su + ((hr + i) * QP + hc0) * kVec + 2 * p, kVec, g, acc + 5 * i);
#pragma unroll
    for (int o = 0; o < NRUN; ++o) add2(acc[25], g[o]);
    block_reduce_pairs<26, Cfg>(acc, scratch, sred);
  }
  write_partials<Cfg>(a.part, sred, t, a.C, 0, kStripSlot0);
}

// part[tile][c][slot] summed over tiles in order -> the 14 depthwise weight/bias gradients.
template <typename T>
struct DwGradOut {
  T* p[msca::kNumDepthwiseWeights];
};

template <typename T>
__global__ void dw_weight_grad_reduce_kernel(const float* __restrict__ part, int ntiles, int C,
                                             const DwGradOut<T> out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= C * kSlots) return;
  const int c = i / kSlots, slot = i - c * kSlots;
  float v = 0.f;
  for (int t = 0; t < ntiles; ++t) v += part[static_cast<int64_t>(t) * C * kSlots + i];
#pragma unroll
  for (int k = 0; k < msca::kNumDepthwiseWeights; ++k) {
    if (slot >= slot_start(k) && slot < slot_start(k) + slot_len(k)) {
      out.p[k][static_cast<int64_t>(c) * slot_len(k) + slot - slot_start(k)] = from_f<T>(v);
    }
  }
}

// out[i] = sum_s part[s * count + i] (fixed order), i < count.
template <typename T>
__global__ void split_sum_kernel(const float* __restrict__ part, int nsplit, int64_t count,
                                 T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float v = 0.f;
  for (int s = 0; s < nsplit; ++s) v += part[s * count + i];
  out[i] = from_f<T>(v);
}

// ------------------------------------------------------------------------------------------------
// 1x1 conv as a GEMM: 64 x 64 output tiles, K slabs of 32, 4 warps
// ------------------------------------------------------------------------------------------------
constexpr int kGBM = 64, kGBN = 64, kGBK = 32, kGNT = 128;
constexpr int kALdRow = kGBK + 8;  // A row-major [m][k]
constexpr int kALdCol = kGBM + 8;  // A col-major [k][m]
constexpr int kBLd = kGBN + 8;     // B row-major [k][n]
constexpr int kCLd = kGBN + 4;     // fp32 accumulator tile [m][n]

template <typename T>
constexpr bool kUseTc = SEGNEXT_MSCA_TC && !std::is_same<T, float>::value;

template <typename T>
constexpr size_t gemm_smem_bytes() {
  return (static_cast<size_t>(kGBM) * kALdCol + static_cast<size_t>(kGBK) * kBLd) * sizeof(T) +
         static_cast<size_t>(kGBM) * kCLd * sizeof(float);
}

// Accumulates a 64 x 64 fp32 tile += A (64 x 32 slab) * B (32 x 64 slab) from shared memory.
template <typename T, bool kAColMajor, bool kTc = kUseTc<T>>
struct BlockMma;

#if SEGNEXT_MSCA_TC
template <typename T, bool kAColMajor>
struct BlockMma<T, kAColMajor, true> {
  using ALayout = typename std::conditional<kAColMajor, nvcuda::wmma::col_major,
                                            nvcuda::wmma::row_major>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ __forceinline__ void step(const T* As, const T* Bs) {
    const int warp = threadIdx.x >> 5, wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
#pragma unroll
    for (int kk = 0; kk < kGBK; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout> fa[2];
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const T* pa = kAColMajor ? As + kk * kALdCol + wm + i * 16 : As + (wm + i * 16) * kALdRow + kk;
        nvcuda::wmma::load_matrix_sync(fa[i], pa, kAColMajor ? kALdCol : kALdRow);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(fb[j], Bs + kk * kBLd + wn + j * 16, kBLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs) {
    const int warp = threadIdx.x >> 5, wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (wm + i * 16) * kCLd + wn + j * 16, acc[i][j], kCLd,
                                        nvcuda::wmma::mem_row_major);
  }
};
#endif

// Exact fp32 SIMT tile: thread = 8 rows x 4 columns.
template <typename T, bool kAColMajor>
struct BlockMma<T, kAColMajor, false> {
  float acc[8][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  __device__ __forceinline__ void step(const T* As, const T* Bs) {
    const int tm = (threadIdx.x >> 4) * 8, tn = (threadIdx.x & 15) * 4;
#pragma unroll 4
    for (int k = 0; k < kGBK; ++k) {
      float av[8], bv[4];
#pragma unroll
      for (int i = 0; i < 8; ++i)
        av[i] = to_f(kAColMajor ? As[k * kALdCol + tm + i] : As[(tm + i) * kALdRow + k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = to_f(Bs[k * kBLd + tn + j]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs) {
    const int tm = (threadIdx.x >> 4) * 8, tn = (threadIdx.x & 15) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(tm + i) * kCLd + tn + j] = acc[i][j];
  }
};

// Stages a ROWS x COLS slab of a row-major [nrows][ld] activation matrix (rows [r0, r0 + ROWS),
// columns [c0, c0 + COLS), zero outside [nrows) x [ncols)) into smem [ROWS][LDS]. With `mul`,
// stages the elementwise product src * mul (the gated gradient g * u).
template <typename T, int ROWS, int COLS, int LDS>
__device__ __forceinline__ void stage_slab(T* dst, const T* __restrict__ src, const T* __restrict__ mul,
                                           int64_t r0, int64_t nrows, int c0, int ncols, bool vec) {
  constexpr int kVec = kVecOf<T>;
  if (vec) {  // ncols % kVec == 0 and 16-byte aligned rows
    constexpr int kChunks = COLS / kVec;
    for (int i = threadIdx.x; i < ROWS * kChunks; i += kGNT) {
      const int rr = i / kChunks, cc = (i - rr * kChunks) * kVec;
      const int64_t row = r0 + rr;
      const int col = c0 + cc;
      T* d = dst + rr * LDS + cc;
      if (row < nrows && col < ncols) {
        const int64_t off = row * ncols + col;
        uint4 v = __ldg(reinterpret_cast<const uint4*>(src + off));
        if (mul != nullptr) {
          const uint4 m = __ldg(reinterpret_cast<const uint4*>(mul + off));
          const T* pv = reinterpret_cast<const T*>(&v);
          const T* pm = reinterpret_cast<const T*>(&m);
          uint4 prod;
          T* pp = reinterpret_cast<T*>(&prod);
#pragma unroll
          for (int e = 0; e < kVec; ++e) pp[e] = from_f<T>(to_f(pv[e]) * to_f(pm[e]));
          v = prod;
        }
        *reinterpret_cast<uint4*>(d) = v;
      } else {
        *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * COLS; i += kGNT) {
      const int rr = i / COLS, cc = i - rr * COLS;
      const int64_t row = r0 + rr;
      const int col = c0 + cc;
      float v = 0.f;
      if (row < nrows && col < ncols) {
        const int64_t off = row * ncols + col;
        v = to_f(src[off]);
        if (mul != nullptr) v *= to_f(mul[off]);
      }
      dst[rr * LDS + cc] = from_f<T>(v);
    }
  }
}

enum class GemmMode : int {
  kForward = 0,  // out    = (s W3^T + b3) * u
  kGradU = 1,    // grad_u = (s W3^T + b3) * g       (the direct term; the 5x5 pass adds the rest)
  kGradS = 2,    // grad_s = (g * u) W3
};

template <typename T>
struct GemmArgs {
  const T* a;     // s (kForward, kGradU) or g (kGradS)
  const T* amul;  // u (kGradS), else nullptr
  const T* w3;    // (C_out, C_in)
  const T* b3;
  const T* gate;  // u (kForward) or g (kGradU)
  T* out;
  int64_t P;  // pixels
  int C;
  bool vec;
};

template <typename T, GemmMode kMode>
__global__ void __launch_bounds__(kGNT) gemm_bias_gate_kernel(const GemmArgs<T> g) {
  T* As = reinterpret_cast<T*>(dyn_smem());  // [kGBM][kALdRow]
  T* Bs = As + kGBM * kALdCol;                       // [kGBK][kBLd]
  float* Cs = reinterpret_cast<float*>(Bs + kGBK * kBLd);
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kGBM;
  const int n0 = blockIdx.y * kGBN;
  const int C = g.C;

  BlockMma<T, false> mma;
  mma.zero();
  for (int k0 = 0; k0 < C; k0 += kGBK) {
    stage_slab<T, kGBM, kGBK, kALdRow>(As, g.a, kMode == GemmMode::kGradS ? g.amul : nullptr, p0,
                                       g.P, k0, C, g.vec);
    // B[k][n]: W3[n][k] (s W3^T) or W3[k][n] ((g u) W3); W3 is small and L2-resident.
    for (int i = threadIdx.x; i < kGBK * kGBN; i += kGNT) {
      int kk, nn;
      if (kMode == GemmMode::kGradS) {
        kk = i / kGBN;
        nn = i - kk * kGBN;
      } else {
        nn = i / kGBK;
        kk = i - nn * kGBK;
      }
      const int k = k0 + kk, n = n0 + nn;
      T v = from_f<T>(0.f);
      if (k < C && n < C)
        v = kMode == GemmMode::kGradS ? g.w3[static_cast<int64_t>(k) * C + n] : g.w3[static_cast<int64_t>(n) * C + k];
      Bs[kk * kBLd + nn] = v;
    }
    __syncthreads();
    mma.step(As, Bs);
    __syncthreads();
  }
  mma.store(Cs);
  __syncthreads();
  for (int i = threadIdx.x; i < kGBM * kGBN; i += kGNT) {
    const int mm = i / kGBN, nn = i - mm * kGBN;
    const int64_t p = p0 + mm;
    const int n = n0 + nn;
    if (p >= g.P || n >= C) continue;
    const int64_t off = p * C + n;
    float v = Cs[mm * kCLd + nn];
    if (kMode != GemmMode::kGradS) v = (v + to_f(g.b3[n])) * to_f(g.gate[off]);
    g.out[off] = from_f<T>(v);
  }
}

// grad W3[co][ci] = sum_p (g u)[p][co] s[p][ci]; grad b3[co] = sum_p (g u)[p][co].
// Split-K over pixels: block (output tile, split) writes fp32 partials [split][C][C] and
// [split][C]; split_sum_kernel adds them in a fixed order.
template <typename T>
struct WgradArgs {
  const T* g;
  const T* u;
  const T* s;
  float* part_w;  // [nsplit][C][C]
  float* part_b;  // [nsplit][C]
  int64_t P, chunk;  // pixels per split (a multiple of kGBK)
  int C, tiles_n;
  bool vec;
};

template <typename T>
__global__ void __launch_bounds__(kGNT) gemm_wgrad_kernel(const WgradArgs<T> g) {
  T* As = reinterpret_cast<T*>(dyn_smem());  // [kGBK][kALdCol]: (g u)[p][co]
  T* Bs = As + kGBM * kALdCol;                       // [kGBK][kBLd]: s[p][ci]
  float* Cs = reinterpret_cast<float*>(Bs + kGBK * kBLd);
  const int tile = blockIdx.x, split = blockIdx.y;
  const int m0 = (tile / g.tiles_n) * kGBM, n0 = (tile % g.tiles_n) * kGBN;
  const int C = g.C;
  const int64_t pbeg = static_cast<int64_t>(split) * g.chunk;
  const int64_t pend = pbeg + g.chunk < g.P ? pbeg + g.chunk : g.P;
  const bool with_bias = n0 == 0;
  float bacc = 0.f;  // thread tid < kGBM: grad b3 of channel m0 + tid

  BlockMma<T, true> mma;
  mma.zero();
  for (int64_t k0 = pbeg; k0 < pend; k0 += kGBK) {
    stage_slab<T, kGBK, kGBM, kALdCol>(As, g.g, g.u, k0, pend, m0, C, g.vec);
    stage_slab<T, kGBK, kGBN, kBLd>(Bs, g.s, nullptr, k0, pend, n0, C, g.vec);
    __syncthreads();
    if (with_bias && threadIdx.x < kGBM) {
#pragma unroll 8
      for (int k = 0; k < kGBK; ++k) bacc += to_f(As[k * kALdCol + threadIdx.x]);
    }
    mma.step(As, Bs);
    __syncthreads();
  }
  mma.store(Cs);
  __syncthreads();
  for (int i = threadIdx.x; i < kGBM * kGBN; i += kGNT) {
    const int mm = i / kGBN, nn = i - mm * kGBN;
    const int m = m0 + mm, n = n0 + nn;
    if (m < C && n < C) g.part_w[(static_cast<int64_t>(split) * C + m) * C + n] = Cs[mm * kCLd + nn];
  }
  if (with_bias && threadIdx.x < kGBM && m0 + static_cast<int>(threadIdx.x) < C)
    g.part_b[static_cast<int64_t>(split) * C + m0 + threadIdx.x] = bacc;
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
template <typename T>
using SmallTile = DwTile<T, 32, 32, 256>;  // forward for small images
template <typename T>
using BwdTile = DwBwdTile<DwTile<T, 32, 32, 256>>;  // both backward kernels
template <typename T>
using LargeTile = DwTile<T, 64, 32, 512>;  // forward when H >= 64

constexpr size_t kAlign = 256;
inline size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, class Cfg>
DwArgs<T> make_dw_args(const Shape& s, const Weights& w) {
  DwArgs<T> a{};
  for (int i = 0; i < msca::kNumDepthwiseWeights; ++i) a.w[i] = static_cast<const T*>(w.p[i]);
  a.N = static_cast<int>(s.N);
  a.H = static_cast<int>(s.H);
  a.W = static_cast<int>(s.W);
  a.C = static_cast<int>(s.C);
  a.tiles_x = static_cast<int>(ceil_div(s.W, Cfg::TW));
  a.tiles_y = static_cast<int>(ceil_div(s.H, Cfg::TH));
  a.ncv = static_cast<int>(ceil_div(s.C, Cfg::kVec));
  return a;
}

template <class Cfg>
int64_t dw_blocks(const Shape& s) {
  return ceil_div(s.W, Cfg::TW) * ceil_div(s.H, Cfg::TH) * s.N * ceil_div(s.C, Cfg::kVec);
}

template <typename Kernel>
cudaError_t launch_prepare(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024)
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  return cudaSuccess;
}

#define SEGNEXT_TRY(...)                    \
  do {                                      \
    const cudaError_t err_ = (__VA_ARGS__); \
    if (err_ != cudaSuccess) return err_;   \
  } while (0)

template <typename T, class Cfg>
cudaError_t launch_dw_forward(const T* u, T* s_out, const Weights& w, const Shape& shape, bool vec,
                              cudaStream_t stream) {
  DwArgs<T> a = make_dw_args<T, Cfg>(shape, w);
  a.u = u;
  a.out = s_out;
  a.vec = vec;
  const size_t smem = Cfg::fwd_smem_bytes();
  SEGNEXT_TRY(launch_prepare(msca_dw_forward_kernel<T, Cfg>, smem));
  msca_dw_forward_kernel<T, Cfg><<<static_cast<unsigned>(dw_blocks<Cfg>(shape)), Cfg::NT, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dw_forward_auto(const T* u, T* s_out, const Weights& w, const Shape& shape, bool vec,
                                   cudaStream_t stream) {
  if (shape.H >= 64) return launch_dw_forward<T, LargeTile<T>>(u, s_out, w, shape, vec, stream);
  return launch_dw_forward<T, SmallTile<T>>(u, s_out, w, shape, vec, stream);
}

template <typename T, GemmMode kMode>
cudaError_t launch_gemm(const GemmArgs<T>& g, cudaStream_t stream) {
  const size_t smem = gemm_smem_bytes<T>();
  SEGNEXT_TRY(launch_prepare(gemm_bias_gate_kernel<T, kMode>, smem));
  const dim3 grid(static_cast<unsigned>(ceil_div(g.P, kGBM)), static_cast<unsigned>(ceil_div(g.C, kGBN)));
  gemm_bias_gate_kernel<T, kMode><<<grid, kGNT, smem, stream>>>(g);
  return cudaGetLastError();
}

// Split count of the W3 gradient: enough blocks to fill a large GPU, partials bounded by
// ~kSplitTarget * 64 * 64 floats; a shape-only function so results do not depend on the device.
constexpr int64_t kSplitTarget = 512;
void wgrad_split(const Shape& s, int64_t* nsplit, int64_t* chunk) {
  const int64_t P = s.N * s.H * s.W;
  const int64_t tiles = ceil_div(s.C, kGBN) * ceil_div(s.C, kGBM);
  int64_t want = std::max<int64_t>(1, ceil_div(kSplitTarget, tiles));
  want = std::min(want, ceil_div(P, kGBK));
  *chunk = ceil_div(ceil_div(P, want), kGBK) * kGBK;
  *nsplit = ceil_div(P, *chunk);
}

struct BwdLayout {
  size_t s, grad_s, part_dw, part_w3, part_b3, total;
  int64_t ntiles, nsplit, chunk;
};

BwdLayout backward_layout(const Shape& s, DType dt) {
  BwdLayout l{};
  const size_t act = align_up(static_cast<size_t>(s.N * s.H * s.W * s.C) * dtype_size(dt));
  l.ntiles = s.N * ceil_div(s.H, 32) * ceil_div(s.W, 32);  // SmallTile (both backward kernels)
  wgrad_split(s, &l.nsplit, &l.chunk);
  size_t off = 0;
  l.s = off;
  off += act;
  l.grad_s = off;
  off += act;
  l.part_dw = off;
  off += align_up(static_cast<size_t>(l.ntiles * s.C * kSlots) * sizeof(float));
  l.part_w3 = off;
  off += align_up(static_cast<size_t>(l.nsplit * s.C * s.C) * sizeof(float));
  l.part_b3 = off;
  off += align_up(static_cast<size_t>(l.nsplit * s.C) * sizeof(float));
  l.total = off;
  return l;
}

template <typename T>
cudaError_t forward_t(const void* u_, void* out_, const Weights& w, void* ws, size_t ws_bytes,
                      const Shape& shape, cudaStream_t stream) {
  const T* u = static_cast<const T*>(u_);
  T* out = static_cast<T*>(out_);
  T* s = static_cast<T*>(ws);
  (void)ws_bytes;  // checked by forward()
  const bool vec = shape.C % kVecOf<T> == 0 && aligned16(u) && aligned16(out) && aligned16(s);
  SEGNEXT_TRY(launch_dw_forward_auto<T>(u, s, w, shape, vec, stream));
  GemmArgs<T> g{};
  g.a = s;
  g.amul = nullptr;
  g.w3 = static_cast<const T*>(w.p[msca::kW3]);
  g.b3 = static_cast<const T*>(w.p[msca::kB3]);
  g.gate = u;
  g.out = out;
  g.P = shape.N * shape.H * shape.W;
  g.C = static_cast<int>(shape.C);
  g.vec = vec;
  return launch_gemm<T, GemmMode::kForward>(g, stream);
}

template <typename T>
cudaError_t backward_t(const void* grad_, const void* u_, const Weights& w, void* grad_u_,
                       const WeightGrads& gw, void* ws_, size_t ws_bytes, const Shape& shape,
                       DType dt, cudaStream_t stream) {
  using Cfg = BwdTile<T>;
  const BwdLayout l = backward_layout(shape, dt);
  if (ws_bytes < l.total) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(ws_);
  const T* grad = static_cast<const T*>(grad_);
  const T* u = static_cast<const T*>(u_);
  T* grad_u = static_cast<T*>(grad_u_);
  T* s = reinterpret_cast<T*>(ws + l.s);
  T* grad_a = s;  // s is dead once the two GEMMs that read it are done
  T* grad_s = reinterpret_cast<T*>(ws + l.grad_s);
  float* part_dw = reinterpret_cast<float*>(ws + l.part_dw);
  float* part_w3 = reinterpret_cast<float*>(ws + l.part_w3);
  float* part_b3 = reinterpret_cast<float*>(ws + l.part_b3);
  const bool vec = shape.C % kVecOf<T> == 0 && aligned16(grad) && aligned16(u) && aligned16(grad_u) &&
                   aligned16(s) && aligned16(grad_s);
  const int64_t P = shape.N * shape.H * shape.W;
  const int C = static_cast<int>(shape.C);

  // 1. s (recomputed)
  SEGNEXT_TRY(launch_dw_forward_auto<T>(u, s, w, shape, vec, stream));
  // 2. grad_u = g * (W3 s + b3); grad_s = (g * u) W3
  GemmArgs<T> g{};
  g.w3 = static_cast<const T*>(w.p[msca::kW3]);
  g.b3 = static_cast<const T*>(w.p[msca::kB3]);
  g.P = P;
  g.C = C;
  g.vec = vec;
  g.a = s;
  g.amul = nullptr;
  g.gate = grad;
  g.out = grad_u;
  SEGNEXT_TRY(launch_gemm<T, GemmMode::kGradU>(g, stream));
  g.a = grad;
  g.amul = u;
  g.gate = nullptr;
  g.out = grad_s;
  SEGNEXT_TRY(launch_gemm<T, GemmMode::kGradS>(g, stream));
  // 3. grad W3, grad b3
  {
    WgradArgs<T> wa{};
    wa.g = grad;
    wa.u = u;
    wa.s = s;
    wa.part_w = part_w3;
    wa.part_b = part_b3;
    wa.P = P;
    wa.chunk = l.chunk;
    wa.C = C;
    wa.tiles_n = static_cast<int>(ceil_div(C, kGBN));
    wa.vec = vec;
    const size_t smem = gemm_smem_bytes<T>();
    SEGNEXT_TRY(launch_prepare(gemm_wgrad_kernel<T>, smem));
    const dim3 grid(static_cast<unsigned>(ceil_div(C, kGBM) * wa.tiles_n), static_cast<unsigned>(l.nsplit));
    gemm_wgrad_kernel<T><<<grid, kGNT, smem, stream>>>(wa);
    SEGNEXT_TRY(cudaGetLastError());
    const int64_t cw = static_cast<int64_t>(C) * C;
    split_sum_kernel<T><<<static_cast<unsigned>(ceil_div(cw, 256)), 256, 0, stream>>>(
        part_w3, static_cast<int>(l.nsplit), cw, static_cast<T*>(gw.p[msca::kW3]));
    SEGNEXT_TRY(cudaGetLastError());
    split_sum_kernel<T><<<static_cast<unsigned>(ceil_div(C, 256)), 256, 0, stream>>>(
        part_b3, static_cast<int>(l.nsplit), C, static_cast<T*>(gw.p[msca::kB3]));
    SEGNEXT_TRY(cudaGetLastError());
  }
  // 4. strips backward: grad_a (into s's buffer) and the strip weight-gradient partials
  DwArgs<T> a = make_dw_args<T, Cfg>(shape, w);
  a.vec = vec;
  a.part = part_dw;
  a.u = u;
  a.g = grad_s;
  a.out = grad_a;
  const unsigned blocks = static_cast<unsigned>(dw_blocks<Cfg>(shape));
  {
    const size_t smem = Cfg::strips_smem_bytes();
    SEGNEXT_TRY(launch_prepare(msca_dw_backward_strips_kernel<T, Cfg>, smem));
    msca_dw_backward_strips_kernel<T, Cfg><<<blocks, Cfg::NT, smem, stream>>>(a);
    SEGNEXT_TRY(cudaGetLastError());
  }
  // 5. 5x5 backward: grad_u += dw5x5^T(grad_a); w0/b0 partials
  a.g = grad_a;
  a.out = grad_u;
  {
    const size_t smem = Cfg::dw5_smem_bytes();
    SEGNEXT_TRY(launch_prepare(msca_dw_backward_5x5_kernel<T, Cfg>, smem));
    msca_dw_backward_5x5_kernel<T, Cfg><<<blocks, Cfg::NT, smem, stream>>>(a);
    SEGNEXT_TRY(cudaGetLastError());
  }
  // 6. depthwise weight gradients: partials summed over tiles
  {
    DwGradOut<T> o{};
    for (int i = 0; i < msca::kNumDepthwiseWeights; ++i) o.p[i] = static_cast<T*>(gw.p[i]);
    const int64_t n = static_cast<int64_t>(C) * kSlots;
    dw_weight_grad_reduce_kernel<T><<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream>>>(
        part_dw, static_cast<int>(l.ntiles), C, o);
    SEGNEXT_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace

size_t forward_workspace_bytes(const Shape& s, DType dt) {
  return align_up(static_cast<size_t>(s.N * s.H * s.W * s.C) * dtype_size(dt));
}

size_t backward_workspace_bytes(const Shape& s, DType dt) { return backward_layout(s, dt).total; }

size_t max_shared_memory_bytes(DType dt) {
  switch (dt) {
    case DType::kFloat32:
      return std::max({LargeTile<float>::fwd_smem_bytes(), BwdTile<float>::strips_smem_bytes(),
                       BwdTile<float>::dw5_smem_bytes()});
    default:
      return std::max({LargeTile<__half>::fwd_smem_bytes(), BwdTile<__half>::strips_smem_bytes(),
                       BwdTile<__half>::dw5_smem_bytes()});
  }
}

cudaError_t forward(const void* u, void* out, const Weights& weights, void* workspace,
                    size_t workspace_bytes, const Shape& shape, DType dtype, cudaStream_t stream) {
  if (shape.N <= 0 || shape.H <= 0 || shape.W <= 0 || shape.C <= 0) return cudaErrorInvalidValue;
  if (workspace_bytes < forward_workspace_bytes(shape, dtype)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return forward_t<float>(u, out, weights, workspace, workspace_bytes, shape, stream);
    case DType::kFloat16:
      return forward_t<__half>(u, out, weights, workspace, workspace_bytes, shape, stream);
    case DType::kBFloat16:
      return forward_t<__nv_bfloat16>(u, out, weights, workspace, workspace_bytes, shape, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(const void* grad, const void* u, const Weights& weights, void* grad_u,
                     const WeightGrads& weight_grads, void* workspace, size_t workspace_bytes,
                     const Shape& shape, DType dtype, cudaStream_t stream) {
  if (shape.N <= 0 || shape.H <= 0 || shape.W <= 0 || shape.C <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return backward_t<float>(grad, u, weights, grad_u, weight_grads, workspace, workspace_bytes,
                               shape, dtype, stream);
    case DType::kFloat16:
      return backward_t<__half>(grad, u, weights, grad_u, weight_grads, workspace, workspace_bytes,
                                shape, dtype, stream);
    case DType::kBFloat16:
      return backward_t<__nv_bfloat16>(grad, u, weights, grad_u, weight_grads, workspace,
                                       workspace_bytes, shape, dtype, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace msca_cuda
}  // namespace segnext
