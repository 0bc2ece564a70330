// msca_emu: runs the MSCA CUDA kernels (csrc/cuda/msca_cuda.cu, through its host API
// msca_cuda.cuh) on the CPU emulator, the way msca_cuda_glue.cpp runs them on a GPU: device
// buffers for the inputs, NaN-poisoned outputs and workspace, the shared-memory check of the
// glue, then forward() or backward().
//
//   msca_emu fwd|bwd f32|f16|bf16 N H W C INDIR OUTDIR [misalign]
//
// INDIR holds u.bin (and grad.bin for bwd), channels-last, and w0.bin ... b3.bin, raw in the
// dtype. OUTDIR receives out.bin (fwd) or grad_u.bin and g_<weight>.bin (bwd), and report.txt.
// `misalign` offsets the activation buffers by one element (not 16-byte aligned: the kernels'
// scalar path). Exit status: 0 clean, 3 the emulator reported errors, 2 an API call failed,
// 4 a crash inside a kernel, 5 the glue would refuse this device, 1 usage.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "msca_cuda.cuh"

namespace mc = segnext::msca_cuda;

namespace {

// The weights' names (their files) and sizes: the contract of csrc/msca_weights.h.
using segnext::msca::weight_name;
size_t weight_elems(int i, int64_t C) {
  return static_cast<size_t>(segnext::msca::weight_numel(i, C));
}

std::vector<char> read_file(const std::string& path, size_t bytes) {
  std::vector<char> data(bytes);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(data.data(), 1, bytes, f) != bytes) {
    std::fprintf(stderr, "msca_emu: cannot read %zu bytes from %s\n", bytes, path.c_str());
    std::exit(1);
  }
  std::fclose(f);
  return data;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(data, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "msca_emu: cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
}

// A device buffer holding the file's bytes (an input).
void* upload(const std::string& path, size_t bytes, const char* name, size_t misalign = 0) {
  void* d = cuda_emu::device_malloc(bytes, name, misalign);
  const std::vector<char> h = read_file(path, bytes);
  cuda_emu::copy_to_device(d, h.data(), bytes);
  return d;
}

void download(const std::string& path, const void* d, size_t bytes) {
  std::vector<char> h(bytes);
  cuda_emu::copy_from_device(h.data(), d, bytes);
  write_file(path, h.data(), bytes);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 9 || argc > 10) {
    std::fprintf(stderr, "usage: %s fwd|bwd f32|f16|bf16 N H W C INDIR OUTDIR [misalign]\n", argv[0]);
    return 1;
  }
  cuda_emu::install_crash_handler();
  const std::string op = argv[1], dts = argv[2], in = argv[7], out = argv[8];
  const bool misalign = argc == 10 && std::string(argv[9]) == "misalign";
  const mc::DType dt = dts == "f32" ? mc::DType::kFloat32 : dts == "f16" ? mc::DType::kFloat16 : mc::DType::kBFloat16;
  const size_t es = dt == mc::DType::kFloat32 ? 4 : 2;
  const mc::Shape shape{std::atoll(argv[3]), std::atoll(argv[4]), std::atoll(argv[5]), std::atoll(argv[6])};
  const size_t act = static_cast<size_t>(shape.N * shape.H * shape.W * shape.C) * es;
  const size_t off = misalign ? es : 0;

  // The glue's check: the kernels' largest dynamic shared memory must fit this device.
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  if (mc::max_shared_memory_bytes(dt) > static_cast<size_t>(optin)) {
    std::printf("the kernels need %zu bytes of shared memory per block, this device offers %d\n",
                mc::max_shared_memory_bytes(dt), optin);
    return 5;
  }

  mc::Weights w{};
  for (int i = 0; i < mc::kNumWeights; ++i)
    w.p[i] = upload(in + "/" + weight_name(i) + ".bin", weight_elems(i, shape.C) * es, weight_name(i));
  const void* u = upload(in + "/u.bin", act, "u", off);

  cudaError_t err;
  if (op == "fwd") {
    void* o = cuda_emu::device_malloc(act, "out", off);
    const size_t ws_bytes = mc::forward_workspace_bytes(shape, dt);
    void* ws = cuda_emu::device_malloc(ws_bytes, "workspace");
    err = mc::forward(u, o, w, ws, ws_bytes, shape, dt, nullptr);
    if (err == cudaSuccess) download(out + "/out.bin", o, act);
  } else {
    const void* g = upload(in + "/grad.bin", act, "grad", off);
    void* gu = cuda_emu::device_malloc(act, "grad_u", off);
    mc::WeightGrads gw{};
    std::vector<std::string> names;
    for (int i = 0; i < mc::kNumWeights; ++i) names.push_back(std::string("grad_") + weight_name(i));
    for (int i = 0; i < mc::kNumWeights; ++i)
      gw.p[i] = cuda_emu::device_malloc(weight_elems(i, shape.C) * es, names[i].c_str());
    const size_t ws_bytes = mc::backward_workspace_bytes(shape, dt);
    void* ws = cuda_emu::device_malloc(ws_bytes, "workspace");
    err = mc::backward(g, u, w, gu, gw, ws, ws_bytes, shape, dt, nullptr);
    if (err == cudaSuccess) {
      download(out + "/grad_u.bin", gu, act);
      for (int i = 0; i < mc::kNumWeights; ++i)
        download(out + "/g_" + weight_name(i) + ".bin", gw.p[i], weight_elems(i, shape.C) * es);
    }
  }
  const std::string summary = cuda_emu::summary();
  std::fputs(summary.c_str(), stdout);
  write_file(out + "/report.txt", summary.data(), summary.size());
  if (err != cudaSuccess) {
    std::printf("msca_cuda::%s returned %s\n", op == "fwd" ? "forward" : "backward", cudaGetErrorString(err));
    return 2;
  }
  return cuda_emu::error_count() ? 3 : 0;
}
