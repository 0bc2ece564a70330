// Op schemas of the C++ kernels and the Python module `segnext_kernels._C`.
//
// The kernels live in their own library, `segnext_C` (torch.ops.segnext_C.<op>_forward /
// <op>_backward), apart from the public custom ops of segnext_kernels/ops.py
// (torch.ops.segnext.<op> / <op>_backward), which pick a backend and call them. Every schema is
// declared here, once; each kernel file registers its CPU (or CUDA) implementation with
// TORCH_LIBRARY_IMPL(segnext_C, ...). Fakes and autograd live in Python (ops.py), as in
// extension-cpp.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "build_config.h"
#include "cpu/poison.h"
#include "msca_weights.h"

#if SEGNEXT_WITH_CUDA
#include <algorithm>

#include "cuda/msca_cuda.cuh"
#endif

TORCH_LIBRARY(segnext_C, m) {
  // Fused MSCA (csrc/cpu/msca_cpu.cpp, csrc/cuda/msca_cuda*.{cu,cpp}); `weights`: the 16
  // tensors of csrc/msca_weights.h. msca_backward returns [grad_u, then the 16 weight grads].
  m.def("msca_forward(Tensor u, Tensor[] weights) -> Tensor");
  m.def("msca_backward(Tensor grad, Tensor u, Tensor[] weights) -> Tensor[]");
  // Fused depthwise 3x3 conv + bias + GELU of the MLPs (csrc/cpu/dwconv_gelu_cpu.cpp);
  // dwconv_gelu_backward returns [grad_x, grad_weight, grad_bias].
  m.def("dwconv_gelu_forward(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("dwconv_gelu_backward(Tensor grad, Tensor x, Tensor weight, Tensor bias) -> Tensor[]");
  // The whole MSCAN MLP, fc2(gelu(dw3x3(fc1(x)))), for inference (csrc/cpu/mlp_cpu.cpp);
  // `weights`: w1, b1, wd, bd, w2, b2.
  m.def("mlp_forward(Tensor x, Tensor[] weights) -> Tensor");
  // NMF2D of the Hamburger head, inference (csrc/cpu/nmf2d_cpu.cpp): x (B, C, H, W) >= 0, bases
  // (B*S, C/S, R); returns the reconstruction in float32 (float64 for float64 x), x's layout.
  m.def("nmf2d_forward(Tensor x, Tensor bases, int S, int steps, float eps, float inv_t) "
        "-> Tensor");
  // 1x1 conv with its epilogue, inference (csrc/cpu/conv1x1_cpu.cpp):
  // act(conv(x, weight) + bias) [+ scale * residual], act "none", "gelu" or "relu".
  m.def("conv1x1_forward(Tensor x, Tensor weight, Tensor? bias, str act, Tensor? residual, "
        "Tensor? scale) -> Tensor");
  // Depthwise 1xk / kx1 convolution with bias, 'same' zero padding (csrc/cpu/strip_conv_cpu.cpp).
  m.def("strip_conv_forward(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "segnext-kernels compiled extension: registers the torch.ops.segnext_C CPU/CUDA kernels";
  // Output poisoning of the CPU kernels (csrc/cpu/poison.h). The flag, SEGNEXT_POISON, is read
  // by segnext_kernels/_env.py and handed over by segnext_kernels/_extension.py.
  m.def("set_poison", &segnext::set_poison_outputs, py::arg("on"));
  m.def("poison", &segnext::poison_outputs);
  // The MSCA weight contract of csrc/msca_weights.h for C channels, [(name, shape)]: tests
  // compare it with Python's (segnext_kernels/msca/reference.py).
  m.def("msca_weights", [](int64_t C) {
    py::list out;
    for (int i = 0; i < segnext::msca::kNumWeights; ++i) {
      const auto s = segnext::msca::weight_shape(i, C);
      py::tuple shape(s.ndim);
      for (int d = 0; d < s.ndim; ++d) shape[d] = s.size[d];
      out.append(py::make_tuple(segnext::msca::weight_name(i), shape));
    }
    return out;
  });
  m.def("build_info", []() {
    py::dict info;
    info["with_cuda"] = SEGNEXT_WITH_CUDA != 0;
    info["cuda_archs"] = std::string(SEGNEXT_CUDA_ARCHS);
    info["torch_version"] = std::string(SEGNEXT_TORCH_VERSION);
    info["compiler"] = std::string(SEGNEXT_COMPILER);
    info["cxx_flags"] = std::string(SEGNEXT_CXX_FLAGS);
    info["build_type"] = std::string(SEGNEXT_BUILD_TYPE);
#if SEGNEXT_WITH_CUDA
    // The most shared memory per block the CUDA MSCA kernels ask for, over the dtypes.
    namespace mc = segnext::msca_cuda;
    info["cuda_smem_bytes"] = std::max({mc::max_shared_memory_bytes(mc::DType::kFloat32),
                                        mc::max_shared_memory_bytes(mc::DType::kFloat16),
                                        mc::max_shared_memory_bytes(mc::DType::kBFloat16)});
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
