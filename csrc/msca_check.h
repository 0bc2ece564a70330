// The check of an MSCA op call against the weight contract (msca_weights.h), shared by the CPU
// kernel (csrc/cpu/msca_cpu.cpp) and the CUDA glue (csrc/cuda/msca_cuda_glue.cpp). Messages
// name the tensor: "msca_forward: w0_1 must have shape [4, 1, 1, 7] for u with C=4 channels".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

#include "msca_weights.h"

namespace segnext {
namespace msca {

// u: 4-D, on a `device_type` device, of one of `dtypes` (`dtype_names` says which in words);
// weights: the 16 of the contract, each on u's device, of u's dtype, in its official shape.
inline void check_inputs(const char* op, const at::Tensor& u, at::TensorList weights,
                         c10::DeviceType device_type,
                         std::initializer_list<at::ScalarType> dtypes, const char* dtype_names) {
  TORCH_CHECK(u.defined(), op, ": u is undefined");
  TORCH_CHECK(u.dim() == 4, op, ": u must be a 4-D tensor (B, C, H, W), got shape ", u.sizes());
  TORCH_CHECK(u.device().type() == device_type, op, ": u must be a ",
              c10::DeviceTypeName(device_type), " tensor, got device ", u.device());
  const auto dt = u.scalar_type();
  bool known = false;
  for (const auto t : dtypes) known = known || t == dt;
  TORCH_CHECK(known, op, ": u must be ", dtype_names, ", got ", dt);
  TORCH_CHECK(weights.size() == kNumWeights, op, ": expected ", kNumWeights,
              " weight and bias tensors (w0, b0, w0_1, ..., w3, b3), got ", weights.size());
  const int64_t C = u.size(1);
  for (int i = 0; i < kNumWeights; ++i) {
    const at::Tensor& w = weights[i];
    const char* name = weight_name(i);
    TORCH_CHECK(w.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(w.device() == u.device(), op, ": ", name, " is on ", w.device(), " but u is on ",
                u.device(), "; all tensors must be on one device");
    TORCH_CHECK(w.scalar_type() == dt, op, ": ", name, " has dtype ", w.scalar_type(),
                " but u has ", dt, "; all tensors must share one dtype");
    const WeightShape s = weight_shape(i, C);
    const at::IntArrayRef shape(s.size, s.ndim);
    TORCH_CHECK(w.sizes() == shape, op, ": ", name, " must have shape ", shape, " for u with C=",
                C, " channels, got ", w.sizes());
  }
}

// The upstream gradient of a backward: u's shape, dtype and device.
inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& u) {
  TORCH_CHECK(grad.defined(), op, ": grad is undefined");
  TORCH_CHECK(grad.device() == u.device(), op, ": grad is on ", grad.device(), " but u is on ",
              u.device(), "; all tensors must be on one device");
  TORCH_CHECK(grad.sizes() == u.sizes(), op, ": grad must have u's shape ", u.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == u.scalar_type(), op, ": grad has dtype ", grad.scalar_type(),
              " but u has ", u.scalar_type());
}

}  // namespace msca
}  // namespace segnext
