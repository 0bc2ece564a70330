// The MSCA weight contract of the C++ side: the 16 tensors every MSCA kernel takes after u, in
// order, with their names and shapes. The 8 convs of the official module (conv0, conv0_1, ...,
// conv3), each a weight then its bias:
//
//   w0, b0, w0_1, b0_1, w0_2, b0_2, w1_1, b1_1, w1_2, b1_2, w2_1, b2_1, w2_2, b2_2, w3, b3
//
// Python states the same contract in segnext_kernels/msca/reference.py (MSCAWeights, DW_CONVS,
// weight_shapes); tests/test_msca_cpu.py checks that the two agree.
//
// Torch-free, so that the CUDA kernels (plain nvcc) and the CUDA emulator include it too; the
// check of a call's tensors against it, which needs ATen, is msca_check.h.
#pragma once

#include <cstdint>

// Usable in device code too (the CUDA kernels' compile-time checks).
#ifdef __CUDACC__
#define SEGNEXT_MSCA_HD __host__ __device__
#else
#define SEGNEXT_MSCA_HD
#endif

namespace segnext {
namespace msca {

struct Conv {
  const char* weight;  // the weight's name, then the bias's
  const char* bias;
  int kh, kw;  // the kernel of a depthwise conv; conv3 (dense C -> C) is 1 x 1
};

// conv0 (5x5), then branch k = 7, 11, 21 as a 1xk and a kx1 conv, then the dense 1x1 conv3.
constexpr int kNumConvs = 8;
constexpr Conv kConvs[kNumConvs] = {
    {"w0", "b0", 5, 5},     {"w0_1", "b0_1", 1, 7},   {"w0_2", "b0_2", 7, 1},
    {"w1_1", "b1_1", 1, 11}, {"w1_2", "b1_2", 11, 1}, {"w2_1", "b2_1", 1, 21},
    {"w2_2", "b2_2", 21, 1}, {"w3", "b3", 1, 1}};
constexpr int kConv3 = kNumConvs - 1;
constexpr int kNumBranches = 3;

constexpr int kNumWeights = 2 * kNumConvs;
SEGNEXT_MSCA_HD constexpr int weight_index(int conv) { return 2 * conv; }
SEGNEXT_MSCA_HD constexpr int bias_index(int conv) { return 2 * conv + 1; }
// The conv of branch `br` (0, 1, 2: k = 7, 11, 21): its 1xk conv, or its kx1 conv.
SEGNEXT_MSCA_HD constexpr int strip_conv(int br, bool vertical) {
  return 1 + 2 * br + (vertical ? 1 : 0);
}
SEGNEXT_MSCA_HD constexpr int strip_size(int br) { return kConvs[strip_conv(br, false)].kw; }

constexpr int kW0 = weight_index(0), kB0 = bias_index(0);
constexpr int kW3 = weight_index(kConv3), kB3 = bias_index(kConv3);
// The weights of the depthwise convs come first: [0, kNumDepthwiseWeights).
constexpr int kNumDepthwiseWeights = weight_index(kConv3);

SEGNEXT_MSCA_HD constexpr const char* weight_name(int i) {
  return i % 2 == 0 ? kConvs[i / 2].weight : kConvs[i / 2].bias;
}

// The official shape of weight i for C channels: (C) for a bias, (C, C, 1, 1) for w3, else
// (C, 1, kh, kw).
struct WeightShape {
  int ndim;
  int64_t size[4];
};

SEGNEXT_MSCA_HD constexpr WeightShape weight_shape(int i, int64_t C) {
  if (i % 2 == 1) return {1, {C, 0, 0, 0}};
  if (i == kW3) return {4, {C, C, 1, 1}};
  return {4, {C, 1, kConvs[i / 2].kh, kConvs[i / 2].kw}};
}

SEGNEXT_MSCA_HD constexpr int64_t weight_numel(int i, int64_t C) {
  const WeightShape s = weight_shape(i, C);
  int64_t n = 1;
  for (int d = 0; d < s.ndim; ++d) n *= s.size[d];
  return n;
}

}  // namespace msca
}  // namespace segnext
