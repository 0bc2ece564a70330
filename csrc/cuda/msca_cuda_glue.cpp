// Tensor glue of the MSCA CUDA kernels: checks, layout, allocation, stream, dtype dispatch, and the
// CUDA implementations of segnext_C::msca_forward / msca_backward (schemas in csrc/segnext_ops.cpp).
// Compiled only in CUDA builds; the kernels themselves (csrc/cuda/msca_cuda.cu) know no torch.
// Only c10's CUDA headers are used (they need the CUDA runtime headers alone): ATen/cuda's pull in
// cuBLAS/cuSPARSE headers that a minimal CUDA toolkit may lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <climits>
#include <cstdint>
#include <vector>

#include "msca_check.h"
#include "msca_cuda.cuh"

namespace {

namespace mc = segnext::msca_cuda;
namespace msca = segnext::msca;

using WeightList = std::array<at::Tensor, mc::kNumWeights>;

mc::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return mc::DType::kFloat16;
    case at::kBFloat16:
      return mc::DType::kBFloat16;
    default:
      return mc::DType::kFloat32;
  }
}

// Validates u and the weights (msca_check.h); returns the weights made contiguous.
WeightList check_inputs(const char* op, const at::Tensor& u, at::TensorList w) {
  msca::check_inputs(op, u, w, at::kCUDA, {at::kFloat, at::kHalf, at::kBFloat16},
                     "float32, float16 or bfloat16");
  TORCH_CHECK(u.numel() > 0, op, ": u must not be empty, got shape ", u.sizes());
  for (int64_t d = 0; d < 4; ++d)
    TORCH_CHECK(u.size(d) <= INT_MAX, op, ": u dimension ", d, " is too large: ", u.size(d));
  WeightList out;
  for (int i = 0; i < mc::kNumWeights; ++i) out[i] = w[i].contiguous();
  return out;
}

// The kernels read and write dense channels-last (NHWC) memory.
at::Tensor as_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) ? t
                                                          : t.contiguous(at::MemoryFormat::ChannelsLast);
}

void check_shared_memory(const char* op, const at::Tensor& u, mc::DType dt) {
  int dev = u.get_device(), optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const size_t need = mc::max_shared_memory_bytes(dt);
  TORCH_CHECK(static_cast<size_t>(optin) >= need, op, ": the kernels need ", need,
              " bytes of shared memory per block, this GPU offers ", optin,
              "; use backend='triton' on it");
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

mc::Shape shape_of(const at::Tensor& u) {
  return mc::Shape{u.size(0), u.size(2), u.size(3), u.size(1)};
}

mc::Weights weight_ptrs(const WeightList& w) {
  mc::Weights p{};
  for (int i = 0; i < mc::kNumWeights; ++i) p.p[i] = w[i].data_ptr();
  return p;
}

// A tensor like `like` (its memory format), plus the channels-last buffer the kernels write:
// the tensor itself when it is channels-last, else a temporary copied back by finish().
struct Output {
  at::Tensor result, buffer;
  explicit Output(const at::Tensor& like) : result(at::empty_like(like)) {
    buffer = result.is_contiguous(at::MemoryFormat::ChannelsLast)
                 ? result
                 : at::empty_like(like, like.options(), at::MemoryFormat::ChannelsLast);
  }
  at::Tensor finish() {
    if (!buffer.is_same(result)) result.copy_(buffer);
    return result;
  }
};

at::Tensor msca_forward_cuda(const at::Tensor& u_in, at::TensorList w_in) {
  constexpr const char* op = "msca_forward (cuda)";
  const WeightList w = check_inputs(op, u_in, w_in);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const mc::DType dt = kernel_dtype(u_in.scalar_type());
  check_shared_memory(op, u_in, dt);
  const at::Tensor u = as_channels_last(u_in);
  Output out(u_in);
  const mc::Shape shape = shape_of(u);
  const size_t ws_bytes = mc::forward_workspace_bytes(shape, dt);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, u.options().dtype(at::kByte));
  check_launch(op, mc::forward(u.data_ptr(), out.buffer.data_ptr(), weight_ptrs(w), ws.data_ptr(),
                               ws_bytes, shape, dt, c10::cuda::getCurrentCUDAStream().stream()));
  return out.finish();
}

std::vector<at::Tensor> msca_backward_cuda(const at::Tensor& grad_in, const at::Tensor& u_in,
                                           at::TensorList w_in) {
  constexpr const char* op = "msca_backward (cuda)";
  const WeightList w = check_inputs(op, u_in, w_in);
  msca::check_grad(op, grad_in, u_in);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const mc::DType dt = kernel_dtype(u_in.scalar_type());
  check_shared_memory(op, u_in, dt);
  const at::Tensor u = as_channels_last(u_in);
  const at::Tensor grad = as_channels_last(grad_in);
  Output grad_u(u_in);
  std::vector<at::Tensor> result;
  result.reserve(1 + mc::kNumWeights);
  mc::WeightGrads gw{};
  std::vector<at::Tensor> weight_grads;
  for (int i = 0; i < mc::kNumWeights; ++i) {
    weight_grads.push_back(at::empty_like(w[i]));
    gw.p[i] = weight_grads.back().data_ptr();
  }
  const mc::Shape shape = shape_of(u);
  const size_t ws_bytes = mc::backward_workspace_bytes(shape, dt);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, u.options().dtype(at::kByte));
  check_launch(op, mc::backward(grad.data_ptr(), u.data_ptr(), weight_ptrs(w), grad_u.buffer.data_ptr(),
                                gw, ws.data_ptr(), ws_bytes, shape, dt,
                                c10::cuda::getCurrentCUDAStream().stream()));
  result.push_back(grad_u.finish());
  for (auto& t : weight_grads) result.push_back(std::move(t));
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(segnext_C, CUDA, m) {
  m.impl("msca_forward", &msca_forward_cuda);
  m.impl("msca_backward", &msca_backward_cuda);
}
