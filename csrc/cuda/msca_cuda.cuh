// Host API of the hand-written MSCA CUDA kernels (csrc/cuda/msca_cuda.cu).
//
// Depends on the CUDA toolkit only (no torch headers): raw device pointers, sizes and a stream.
// The tensor glue (checks, allocation, dtype dispatch, op registration) is msca_cuda_glue.cpp.
//
// Activations (u, out, grad, grad_u) are dense channels-last tensors: element (n, y, x, c) at
// ((n * H + y) * W + x) * C + c. Weights are contiguous in their official shapes, in the order
// of the weight contract (csrc/msca_weights.h), all of the activation dtype.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../msca_weights.h"

namespace segnext {
namespace msca_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kNumWeights = msca::kNumWeights;

struct Shape {
  int64_t N, H, W, C;
};

struct Weights {
  const void* p[kNumWeights];
};

struct WeightGrads {
  void* p[kNumWeights];
};

// Device workspace each call needs (the caller allocates it; 256-byte aligned).
size_t forward_workspace_bytes(const Shape& shape, DType dtype);
size_t backward_workspace_bytes(const Shape& shape, DType dtype);

// Largest dynamic shared memory (bytes) one block of these kernels asks for; the caller checks
// that the device offers it (cudaDevAttrMaxSharedMemoryPerBlockOptin).
size_t max_shared_memory_bytes(DType dtype);

// out = conv3(a + B7(a) + B11(a) + B21(a)) * u. Returns the first launch error, if any.
cudaError_t forward(const void* u, void* out, const Weights& weights, void* workspace,
                    size_t workspace_bytes, const Shape& shape, DType dtype, cudaStream_t stream);

// grad_u and the 16 weight/bias gradients (weight-shaped, activation dtype) for the upstream
// gradient `grad`. Recomputes every intermediate from u; weight gradients are reduced in a
// fixed order (bitwise deterministic for a given shape).
cudaError_t backward(const void* grad, const void* u, const Weights& weights, void* grad_u,
                     const WeightGrads& weight_grads, void* workspace, size_t workspace_bytes,
                     const Shape& shape, DType dtype, cudaStream_t stream);

}  // namespace msca_cuda
}  // namespace segnext
