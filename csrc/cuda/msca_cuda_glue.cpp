// Tensor glue of the MSCA CUDA kernels: checks, layout, allocation, stream, dtype dispatch, and the
// CUDA implementations of segnext::msca_fwd / segnext::msca_bwd (schemas in csrc/segnext_ops.cpp).
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

#include "msca_cuda.cuh"

namespace {

namespace mc = segnext::msca_cuda;

constexpr const char* kWeightNames[mc::kNumWeights] = {
    "w0", "b0", "w0_1", "b0_1", "w0_2", "b0_2", "w1_1", "b1_1",
    "w1_2", "b1_2", "w2_1", "b2_1", "w2_2", "b2_2", "w3", "b3"};

using WeightList = std::array<at::Tensor, mc::kNumWeights>;

std::vector<int64_t> weight_shape(int i, int64_t C) {
  static constexpr int kKh[7] = {5, 1, 7, 1, 11, 1, 21};
  static constexpr int kKw[7] = {5, 7, 1, 11, 1, 21, 1};
  if (i % 2 == 1) return {C};  // biases
  if (i == 14) return {C, C, 1, 1};
  return {C, 1, kKh[i / 2], kKw[i / 2]};
}

mc::DType kernel_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return mc::DType::kFloat32;
    case at::kHalf:
      return mc::DType::kFloat16;
    case at::kBFloat16:
      return mc::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, " (cuda): u must be float32, float16 or bfloat16, got ", t);
  }
  return mc::DType::kFloat32;
}

// Validates u and the weights; returns the weights made contiguous.
WeightList check_inputs(const char* op, const at::Tensor& u, const WeightList& w) {
  TORCH_CHECK(u.is_cuda(), op, " (cuda): u must be a CUDA tensor, got device ", u.device());
  TORCH_CHECK(u.dim() == 4, op, " (cuda): u must be 4-D (B, C, H, W), got shape ", u.sizes());
  TORCH_CHECK(u.numel() > 0, op, " (cuda): u must not be empty, got shape ", u.sizes());
  kernel_dtype(op, u.scalar_type());
  const int64_t C = u.size(1);
  for (int64_t d = 0; d < 4; ++d)
    TORCH_CHECK(u.size(d) <= INT_MAX, op, " (cuda): u dimension ", d, " is too large: ", u.size(d));
  WeightList out;
  for (int i = 0; i < mc::kNumWeights; ++i) {
    const at::Tensor& t = w[i];
    TORCH_CHECK(t.defined(), op, " (cuda): ", kWeightNames[i], " is undefined");
    TORCH_CHECK(t.device() == u.device(), op, " (cuda): ", kWeightNames[i], " is on ", t.device(),
                " but u is on ", u.device());
    TORCH_CHECK_TYPE(t.scalar_type() == u.scalar_type(), op, " (cuda): ", kWeightNames[i],
                     " has dtype ", t.scalar_type(), " but u has ", u.scalar_type());
    const auto shape = weight_shape(i, C);
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, " (cuda): ", kWeightNames[i],
                " must have shape ", at::IntArrayRef(shape), " for u with ", C, " channels, got ",
                t.sizes());
    out[i] = t.contiguous();
  }
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
  TORCH_CHECK(static_cast<size_t>(optin) >= need, op, " (cuda): the kernels need ", need,
              " bytes of shared memory per block, this GPU offers ", optin,
              "; use backend='triton' on it");
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err));
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

at::Tensor msca_fwd_cuda_impl(const at::Tensor& u_in, const WeightList& w_in) {
  constexpr const char* op = "segnext::msca_fwd";
  const WeightList w = check_inputs(op, u_in, w_in);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const mc::DType dt = kernel_dtype(op, u_in.scalar_type());
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

std::vector<at::Tensor> msca_bwd_cuda_impl(const at::Tensor& grad_in, const at::Tensor& u_in,
                                           const WeightList& w_in) {
  constexpr const char* op = "segnext::msca_bwd";
  const WeightList w = check_inputs(op, u_in, w_in);
  TORCH_CHECK(grad_in.sizes() == u_in.sizes(), op, " (cuda): grad must have u's shape ",
              u_in.sizes(), ", got ", grad_in.sizes());
  TORCH_CHECK(grad_in.device() == u_in.device(), op, " (cuda): grad is on ", grad_in.device(),
              " but u is on ", u_in.device());
  TORCH_CHECK_TYPE(grad_in.scalar_type() == u_in.scalar_type(), op, " (cuda): grad has dtype ",
                   grad_in.scalar_type(), " but u has ", u_in.scalar_type());
  const c10::cuda::CUDAGuard guard(u_in.device());
  const mc::DType dt = kernel_dtype(op, u_in.scalar_type());
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

at::Tensor msca_fwd_cuda(const at::Tensor& u, const at::Tensor& w0, const at::Tensor& b0,
                         const at::Tensor& w0_1, const at::Tensor& b0_1, const at::Tensor& w0_2,
                         const at::Tensor& b0_2, const at::Tensor& w1_1, const at::Tensor& b1_1,
                         const at::Tensor& w1_2, const at::Tensor& b1_2, const at::Tensor& w2_1,
                         const at::Tensor& b2_1, const at::Tensor& w2_2, const at::Tensor& b2_2,
                         const at::Tensor& w3, const at::Tensor& b3) {
  return msca_fwd_cuda_impl(
      u, {w0, b0, w0_1, b0_1, w0_2, b0_2, w1_1, b1_1, w1_2, b1_2, w2_1, b2_1, w2_2, b2_2, w3, b3});
}

std::vector<at::Tensor> msca_bwd_cuda(const at::Tensor& grad, const at::Tensor& u,
                                      const at::Tensor& w0, const at::Tensor& b0,
                                      const at::Tensor& w0_1, const at::Tensor& b0_1,
                                      const at::Tensor& w0_2, const at::Tensor& b0_2,
                                      const at::Tensor& w1_1, const at::Tensor& b1_1,
                                      const at::Tensor& w1_2, const at::Tensor& b1_2,
                                      const at::Tensor& w2_1, const at::Tensor& b2_1,
                                      const at::Tensor& w2_2, const at::Tensor& b2_2,
                                      const at::Tensor& w3, const at::Tensor& b3) {
  return msca_bwd_cuda_impl(
      grad, u, {w0, b0, w0_1, b0_1, w0_2, b0_2, w1_1, b1_1, w1_2, b1_2, w2_1, b2_1, w2_2, b2_2, w3, b3});
}

}  // namespace

TORCH_LIBRARY_IMPL(segnext, CUDA, m) {
  m.impl("msca_fwd", &msca_fwd_cuda);
  m.impl("msca_bwd", &msca_bwd_cuda);
}
