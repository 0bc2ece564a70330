// Op schemas of the `segnext` namespace and the Python module `segnext_kernels._C`.
//
// Every C++ op is declared here, once; each kernel file registers its CPU (or CUDA)
// implementation with TORCH_LIBRARY_IMPL. Fakes and autograd live in Python
// (segnext_kernels/ops.py), as in extension-cpp.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "build_config.h"

#if SEGNEXT_WITH_CUDA
#include <algorithm>

#include "cuda/msca_cuda.cuh"
#endif

TORCH_LIBRARY(segnext, m) {
  // Depthwise 1xk / kx1 convolution with bias, 'same' zero padding.
  m.def("strip_conv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Fused MSCA (csrc/cpu/msca_cpu.cpp, csrc/cuda/msca_cuda*.{cu,cpp}); weights in the order of
  // segnext_kernels.msca.reference.MSCAWeights. msca_bwd returns [grad_u, 16 weight grads].
  m.def("msca_fwd(Tensor u, Tensor w0, Tensor b0, Tensor w0_1, Tensor b0_1, Tensor w0_2, "
        "Tensor b0_2, Tensor w1_1, Tensor b1_1, Tensor w1_2, Tensor b1_2, Tensor w2_1, "
        "Tensor b2_1, Tensor w2_2, Tensor b2_2, Tensor w3, Tensor b3) -> Tensor");
  m.def("msca_bwd(Tensor grad, Tensor u, Tensor w0, Tensor b0, Tensor w0_1, Tensor b0_1, "
        "Tensor w0_2, Tensor b0_2, Tensor w1_1, Tensor b1_1, Tensor w1_2, Tensor b1_2, "
        "Tensor w2_1, Tensor b2_1, Tensor w2_2, Tensor b2_2, Tensor w3, Tensor b3) -> Tensor[]");
  // Fused depthwise 3x3 conv + bias + GELU of the MLPs (csrc/cpu/dwconv_gelu_cpu.cpp);
  // dwconv3x3_gelu_bwd returns [grad_x, grad_weight, grad_bias].
  m.def("dwconv3x3_gelu_fwd(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("dwconv3x3_gelu_bwd(Tensor grad, Tensor x, Tensor weight, Tensor bias) -> Tensor[]");
  // The whole MSCAN MLP, fc2(gelu(dw3x3(fc1(x)))), for inference (csrc/cpu/mlp_cpu.cpp).
  m.def("mlp_fwd(Tensor x, Tensor w1, Tensor b1, Tensor wd, Tensor bd, Tensor w2, Tensor b2) "
        "-> Tensor");
  // NMF2D of the Hamburger head, inference (csrc/cpu/nmf_cpu.cpp): x (B, C, H, W) >= 0, bases
  // (B*S, C/S, R); returns the reconstruction in float32 (float64 for float64 x), x's layout.
  m.def("nmf2d_fwd(Tensor x, Tensor bases, int S, int steps, float eps, float inv_t) -> Tensor");
  // 1x1 conv with its epilogue, inference (csrc/cpu/conv1x1_cpu.cpp):
  // act(conv(x, weight) + bias) [+ scale * residual], act "none", "gelu" or "relu".
  m.def("conv1x1_fwd(Tensor x, Tensor weight, Tensor? bias, str act, Tensor? residual, "
        "Tensor? scale) -> Tensor");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "segnext-kernels compiled extension: registers the torch.ops.segnext CPU/CUDA kernels";
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
