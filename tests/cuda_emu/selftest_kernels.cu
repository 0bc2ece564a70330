// Test kernels of the CUDA emulation harness itself (tests/test_cuda_emu.py): each scenario
// either checks a built-in's semantics (and prints PASS/FAIL) or plants one kind of bug that
// the checker must report. Written as ordinary CUDA; the harness translates it like any .cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++g_failures;
  }
}

template <class T>
T* dev_alloc(size_t n, const char* name) {
  void* p = nullptr;
  cudaMalloc(&p, n * sizeof(T));
  (void)name;
  return static_cast<T*>(p);
}

template <class T>
std::vector<T> fetch(const T* d, size_t n) {
  std::vector<T> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}

// ------------------------------------------------------------------------------------------------
// Block reduction in static shared memory (with and without the barrier in the tree)
// ------------------------------------------------------------------------------------------------
template <bool kSync>
__global__ void block_sum_kernel(float* out) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  buf[t] = static_cast<float>(t + 1 + 1000 * blockIdx.x);
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    if (kSync) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

template <bool kSync>
void block_sum() {
  float* out = dev_alloc<float>(3, "out");
  block_sum_kernel<kSync><<<3, 256>>>(out);
  const auto h = fetch(out, 3);
  for (int b = 0; b < 3; ++b) {
    const float want = 256.f * 257.f / 2.f + 1000.f * b * 256.f;
    std::printf("block %d sum %.1f (expected %.1f)\n", b, h[b], want);
    if (kSync) expect(h[b] == want, "block sum");
  }
}

// ------------------------------------------------------------------------------------------------
// Warp shuffles and votes: two full warps, then a block with a partial last warp
// ------------------------------------------------------------------------------------------------
__global__ void shuffle_kernel(int* out) {
  const int t = threadIdx.x;
  int sum = t;
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  int* o = out + t * 7;
  o[0] = sum;
  o[1] = __shfl_sync(0xffffffffu, t * 10, 3);
  o[2] = __shfl_up_sync(0xffffffffu, t, 1);
  o[3] = __shfl_down_sync(0xffffffffu, t, 2);
  o[4] = __shfl_xor_sync(0xffffffffu, t, 1, 8);  // width 8
  o[5] = static_cast<int>(__ballot_sync(0xffffffffu, t & 1));
  o[6] = static_cast<int>(2 * __shfl_sync(0xffffffffu, 0.5 * t, 0));  // 64-bit payload
}

__global__ void partial_warp_kernel(int* out) {
  // 40 threads: warp 1 has lanes 0-7 only; its collectives name exactly those lanes
  const unsigned mask = __activemask();
  const int t = threadIdx.x;
  out[3 * t] = static_cast<int>(mask);
  out[3 * t + 1] = __shfl_sync(mask, t, 0);
  out[3 * t + 2] = static_cast<int>(__ballot_sync(mask, t % 3 == 0));
}

void shuffles() {
  int* out = dev_alloc<int>(64 * 7, "out");
  shuffle_kernel<<<1, 64>>>(out);
  const auto h = fetch(out, 64 * 7);
  for (int t = 0; t < 64; ++t) {
    const int first = t / 32 * 32, lane = t % 32;
    const int* o = &h[t * 7];
    const std::string who = " of thread " + std::to_string(t);
    expect(o[0] == 32 * first + 31 * 32 / 2, "xor-butterfly sum" + who);
    expect(o[1] == (first + 3) * 10, "__shfl_sync broadcast" + who);
    expect(o[2] == (lane >= 1 ? t - 1 : t), "__shfl_up_sync" + who);
    expect(o[3] == (lane + 2 < 32 ? t + 2 : t), "__shfl_down_sync" + who);
    expect(o[4] == (t ^ 1), "width-8 xor" + who);
    expect(static_cast<unsigned>(o[5]) == 0xaaaaaaaau, "__ballot_sync" + who);
    expect(o[6] == first, "64-bit __shfl_sync" + who);
  }
  int* p = dev_alloc<int>(40 * 3, "partial");
  partial_warp_kernel<<<1, 40>>>(p);
  const auto q = fetch(p, 40 * 3);
  for (int t = 0; t < 40; ++t) {
    const bool last = t >= 32;
    unsigned votes = 0;
    for (int l = 0; l < (last ? 8 : 32); ++l)
      if ((t / 32 * 32 + l) % 3 == 0) votes |= 1u << l;
    const std::string who = " of thread " + std::to_string(t);
    expect(static_cast<unsigned>(q[3 * t]) == (last ? 0xffu : 0xffffffffu), "__activemask" + who);
    expect(q[3 * t + 1] == t / 32 * 32, "partial-warp __shfl_sync" + who);
    expect(static_cast<unsigned>(q[3 * t + 2]) == votes, "partial-warp __ballot_sync" + who);
  }
  std::printf("shuffles checked\n");
}

// ------------------------------------------------------------------------------------------------
// WMMA: one warp, C = A B + C0 for 16x16x16 half tiles, A row- or column-major
// ------------------------------------------------------------------------------------------------
template <class ALayout>
__global__ void wmma_kernel(const __half* a, const __half* b, const float* c0, float* c) {
  using namespace nvcuda;
  __shared__ __align__(32) __half sa[16 * 24];
  __shared__ __align__(32) __half sb[16 * 24];
  __shared__ __align__(32) float sc[16 * 20];
  for (int i = threadIdx.x; i < 256; i += 32) {
    sa[(i / 16) * 24 + i % 16] = a[i];
    sb[(i / 16) * 24 + i % 16] = b[i];
    sc[(i / 16) * 20 + i % 16] = c0[i];
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, ALayout> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, sa, 24);
  wmma::load_matrix_sync(fb, sb, 24);
  wmma::load_matrix_sync(fc, sc, 20, wmma::mem_row_major);
  wmma::mma_sync(fc, fa, fb, fc);
  __syncthreads();
  wmma::store_matrix_sync(sc, fc, 20, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += 32) c[i] = sc[(i / 16) * 20 + i % 16];
}

template <class ALayout>
void wmma_case(bool col) {
  std::vector<__half> a(256), b(256);
  std::vector<float> c0(256), want(256);
  for (int i = 0; i < 256; ++i) {
    a[i] = __float2half_rn(std::sin(0.37f * i) * 3.f);
    b[i] = __float2half_rn(std::cos(0.11f * i + 1.f));
    c0[i] = 0.25f * (i % 7) - 0.5f;
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double s = c0[i * 16 + j];
      for (int k = 0; k < 16; ++k) {
        const double av = __half2float(col ? a[k * 16 + i] : a[i * 16 + k]);  // A(i, k)
        s += av * static_cast<double>(__half2float(b[k * 16 + j]));
      }
      want[i * 16 + j] = static_cast<float>(s);
    }
  __half* da = dev_alloc<__half>(256, "a");
  __half* db = dev_alloc<__half>(256, "b");
  float* dc0 = dev_alloc<float>(256, "c0");
  float* dc = dev_alloc<float>(256, "c");
  cudaMemcpy(da, a.data(), 512, cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), 512, cudaMemcpyHostToDevice);
  cudaMemcpy(dc0, c0.data(), 1024, cudaMemcpyHostToDevice);
  wmma_kernel<ALayout><<<1, 32>>>(da, db, dc0, dc);
  const auto h = fetch(dc, 256);
  double worst = 0;
  for (int i = 0; i < 256; ++i) worst = std::max(worst, std::fabs(double(h[i]) - want[i]) / (1 + std::fabs(want[i])));
  std::printf("wmma %s-major A: max relative error %.3g\n", col ? "col" : "row", worst);
  expect(worst < 1e-5, "wmma result");
}

void wmma() {
  wmma_case<nvcuda::wmma::row_major>(false);
  wmma_case<nvcuda::wmma::col_major>(true);
}

// ------------------------------------------------------------------------------------------------
// Planted bugs
// ------------------------------------------------------------------------------------------------
__global__ void copy_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = in[i];  // off by one: i == n is past both buffers
}

void global_oob() {
  const int n = 100;
  float* in = dev_alloc<float>(n, "in");
  float* out = dev_alloc<float>(n, "out");
  std::vector<float> h(n, 1.f);
  cudaMemcpy(in, h.data(), n * 4, cudaMemcpyHostToDevice);
  copy_kernel<<<4, 32>>>(in, out, n);
}

__global__ void shared_oob_kernel(float* out) {
  extern __shared__ float s[];
  s[threadIdx.x] = 1.f;  // launched with one float fewer than threads
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

void shared_oob() {
  float* out = dev_alloc<float>(64, "out");
  shared_oob_kernel<<<1, 64, 63 * sizeof(float)>>>(out);
}

__global__ void uninit_shared_kernel(float* out) {
  __shared__ float s[64];
  if (threadIdx.x < 32) s[threadIdx.x] = 1.f;  // the upper half is never written
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

void uninit_shared() {
  float* out = dev_alloc<float>(64, "out");
  uninit_shared_kernel<<<1, 64>>>(out);
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();  // only half the block reaches the barrier
  out[threadIdx.x] = 1.f;
}

void divergent_barrier() {
  float* out = dev_alloc<float>(64, "out");
  divergent_barrier_kernel<<<1, 64>>>(out);
}

__global__ void inter_block_kernel(float* data) {
  // block 1 reads what block 0 writes in the same launch: no ordering between blocks
  if (blockIdx.x == 0) data[threadIdx.x] = 2.f;
  if (blockIdx.x == 1) data[32 + threadIdx.x] = data[threadIdx.x];
}

void inter_block_race() {
  float* data = dev_alloc<float>(64, "data");
  inter_block_kernel<<<2, 32>>>(data);
}

__global__ void misaligned_kernel(const float* in, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(in + 2);  // 8 bytes past a 16-byte boundary
  out[threadIdx.x] = static_cast<float>(v.x);
}

void misaligned_vector() {
  float* in = dev_alloc<float>(64, "in");
  float* out = dev_alloc<float>(1, "out");
  std::vector<float> h(64, 0.f);
  cudaMemcpy(in, h.data(), 256, cudaMemcpyHostToDevice);
  misaligned_kernel<<<1, 1>>>(in, out);
}

// ------------------------------------------------------------------------------------------------
// Atomics, launch configuration errors
// ------------------------------------------------------------------------------------------------
__global__ void atomic_kernel(int* count, float* total) {
  atomicAdd(count, 1);
  atomicAdd(total, 0.5f);
}

void atomics() {
  int* count = dev_alloc<int>(1, "count");
  float* total = dev_alloc<float>(1, "total");
  const int zero = 0;
  const float fzero = 0.f;
  cudaMemcpy(count, &zero, 4, cudaMemcpyHostToDevice);
  cudaMemcpy(total, &fzero, 4, cudaMemcpyHostToDevice);
  atomic_kernel<<<3, 100>>>(count, total);
  const int c = fetch(count, 1)[0];
  const float t = fetch(total, 1)[0];
  std::printf("atomics: count %d total %.1f\n", c, t);
  expect(c == 300 && t == 150.f, "atomicAdd");
}

__global__ void big_smem_kernel(float* out) {
  extern __shared__ float s[];
  s[threadIdx.x] = 3.f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

void launch_config() {
  float* out = dev_alloc<float>(32, "out");
  const size_t big = 64 * 1024;
  big_smem_kernel<<<1, 32, big>>>(out);  // > 48 KB without the opt-in attribute
  expect(cudaGetLastError() == cudaErrorInvalidValue, "launch with 64 KB of shared memory and no opt-in fails");
  expect(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 1 << 20) ==
             cudaErrorInvalidValue,
         "an opt-in above the device's limit is refused");
  cudaGetLastError();
  expect(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(big)) ==
             cudaSuccess,
         "opt-in to 64 KB");
  big_smem_kernel<<<1, 32, big>>>(out);
  expect(cudaGetLastError() == cudaSuccess, "launch after the opt-in");
  expect(fetch(out, 32)[31] == 3.f, "kernel ran");
  big_smem_kernel<<<1, 2048>>>(out);
  expect(cudaGetLastError() == cudaErrorInvalidConfiguration, "2048 threads per block are refused");
  std::printf("launch configuration checked\n");
}

}  // namespace

// Conversions: float32 bits in (a file), half and bfloat16 bits out, for comparison with torch.
int selftest_convert(const char* in_path, const char* out_path) {
  FILE* f = std::fopen(in_path, "rb");
  if (!f) return 1;
  std::vector<float> x;
  float v;
  while (std::fread(&v, 4, 1, f) == 1) x.push_back(v);
  std::fclose(f);
  std::vector<uint16_t> out;
  for (float xv : x) {
    out.push_back(__half_as_ushort(__float2half_rn(xv)));
    out.push_back(__bfloat16_as_ushort(__float2bfloat16_rn(xv)));
  }
  // every half pattern back to float and to half again
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float fv = __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    uint32_t fb;
    std::memcpy(&fb, &fv, 4);
    out.push_back(static_cast<uint16_t>(fb & 0xffffu));
    out.push_back(static_cast<uint16_t>(fb >> 16));
  }
  FILE* o = std::fopen(out_path, "wb");
  if (!o) return 1;
  std::fwrite(out.data(), 2, out.size(), o);
  std::fclose(o);
  return 0;
}

int selftest_run(const std::string& name) {
  if (name == "block_sum") block_sum<true>();
  else if (name == "block_sum_no_sync") block_sum<false>();
  else if (name == "shuffles") shuffles();
  else if (name == "wmma") wmma();
  else if (name == "global_oob") global_oob();
  else if (name == "shared_oob") shared_oob();
  else if (name == "uninit_shared") uninit_shared();
  else if (name == "divergent_barrier") divergent_barrier();
  else if (name == "inter_block_race") inter_block_race();
  else if (name == "misaligned_vector") misaligned_vector();
  else if (name == "atomics") atomics();
  else if (name == "launch_config") launch_config();
  else {
    std::printf("unknown scenario %s\n", name.c_str());
    return 1;
  }
  if (g_failures == 0) std::printf("PASS %s\n", name.c_str());
  return g_failures ? 1 : 0;
}
