// cuda_emu.h: the CUDA built-ins that csrc/cuda/*.cu use, as host C++, for the CPU emulation
// harness (docs/cuda_emulation.md). Included through the stand-in headers of include/
// (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, mma.h), so the .cu files compile unchanged.
//
// Execution model (cuda_emu_runtime.cpp): blocks run one after the other; inside a block every
// CUDA thread is a fiber, scheduled deterministically; __syncthreads is a barrier of the whole
// block, warp collectives (shuffles, votes, WMMA) wait for every lane named by their mask.
// The kernel translation unit is compiled with GCC's -fsanitize=thread instrumentation and the
// runtime supplies its own __tsan_read/__tsan_write hooks: every load and store of shared and
// device memory is bounds-checked and fed to the race checker (no ThreadSanitizer runtime).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>

// ------------------------------------------------------------------------------------------------
// Qualifiers
// ------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __grid_constant__
// __restrict__ is already a GCC keyword; __shared__ is rewritten by the harness's translation
// step (tests/cuda_emu/harness.py), which knows static from dynamic (extern) shared memory.

// ------------------------------------------------------------------------------------------------
// Vector types. A vector load or store on a GPU needs its natural alignment (a 16-byte uint4 at a
// 16-byte boundary); the compiler splits these copies into scalar accesses on the host, so each
// copy checks the alignment of the vector it reads and writes.
// ------------------------------------------------------------------------------------------------
namespace cuda_emu {
void report_misaligned_vector(const void* p, size_t align);
inline void check_vector_alignment(const void* p, size_t align) {
  if (reinterpret_cast<uintptr_t>(p) & (align - 1)) report_misaligned_vector(p, align);
}
}  // namespace cuda_emu

#define CUDA_EMU_VECTOR2(T, E)                                                  \
  struct alignas(2 * sizeof(E)) T {                                             \
    E x, y;                                                                     \
    T() = default;                                                              \
    constexpr T(E vx, E vy) : x(vx), y(vy) {}                                   \
    T(const T& o) : x(o.x), y(o.y) { cuda_emu::check_vector_alignment(&o, sizeof(T)); } \
    T& operator=(const T& o) {                                                  \
      cuda_emu::check_vector_alignment(this, sizeof(T));                        \
      cuda_emu::check_vector_alignment(&o, sizeof(T));                          \
      x = o.x;                                                                  \
      y = o.y;                                                                  \
      return *this;                                                             \
    }                                                                           \
  };
#define CUDA_EMU_VECTOR4(T, E)                                                  \
  struct alignas(4 * sizeof(E)) T {                                             \
    E x, y, z, w;                                                               \
    T() = default;                                                              \
    constexpr T(E vx, E vy, E vz, E vw) : x(vx), y(vy), z(vz), w(vw) {}         \
    T(const T& o) : x(o.x), y(o.y), z(o.z), w(o.w) {                            \
      cuda_emu::check_vector_alignment(&o, sizeof(T));                          \
    }                                                                           \
    T& operator=(const T& o) {                                                  \
      cuda_emu::check_vector_alignment(this, sizeof(T));                        \
      cuda_emu::check_vector_alignment(&o, sizeof(T));                          \
      x = o.x;                                                                  \
      y = o.y;                                                                  \
      z = o.z;                                                                  \
      w = o.w;                                                                  \
      return *this;                                                             \
    }                                                                           \
  };
CUDA_EMU_VECTOR2(float2, float)
CUDA_EMU_VECTOR4(float4, float)
CUDA_EMU_VECTOR2(int2, int)
CUDA_EMU_VECTOR4(int4, int)
CUDA_EMU_VECTOR2(uint2, unsigned)
CUDA_EMU_VECTOR4(uint4, unsigned)
CUDA_EMU_VECTOR2(double2, double)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
inline float2 make_float2(float x, float y) { return float2(x, y); }
inline float4 make_float4(float x, float y, float z, float w) { return float4(x, y, z, w); }
inline int2 make_int2(int x, int y) { return int2(x, y); }
inline int4 make_int4(int x, int y, int z, int w) { return int4(x, y, z, w); }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2(x, y); }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4(x, y, z, w); }
inline double2 make_double2(double x, double y) { return double2(x, y); }

constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------------
// Runtime API (the part kernels' host code calls)
// ------------------------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9, cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701, cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8, cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMaxSharedMemoryPerBlock = 8, cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4,
};

namespace cuda_emu {

// --- thread state, set by the scheduler before a fiber runs ---
extern uint3 g_threadIdx, g_blockIdx;
extern dim3 g_blockDim, g_gridDim;

// --- synchronisation and warp collectives (cuda_emu_runtime.cpp) ---
void syncthreads();
int syncthreads_count(int pred);  // __syncthreads_count; and/or derive from it
void syncwarp(unsigned mask);
enum class ShflMode : int { kIdx, kUp, kDown, kXor };
uint64_t shfl(unsigned mask, uint64_t bits, ShflMode mode, int arg, int width, const char* what);
unsigned ballot(unsigned mask, int pred, const char* what);
void warp_converge(const char* what);  // every lane of the warp arrives (WMMA *_sync)
unsigned active_lanes_mask();           // lanes that exist in this thread's warp

// --- checks the header code asks for explicitly ---
void report_api_misuse(const char* what);         // e.g. a WMMA pointer that is not 32-byte aligned
void check_atomic(void* p, size_t bytes);         // bounds/initialisation check of an atomic
void* static_shared(size_t bytes, size_t align, const char* key);  // __shared__ T x;
void* dynamic_shared();                                            // extern __shared__ T x[];

// --- launches ---
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};
inline LaunchConfig make_launch_config(dim3 grid, dim3 block, size_t smem = 0,
                                       cudaStream_t stream = nullptr) {
  return LaunchConfig{grid, block, smem, stream};
}
// Runs `thread_body(ctx)` for every thread of every block; records a launch error (bad
// configuration, too much shared memory) for cudaGetLastError instead of running.
void run_grid(const char* name, const char* signature, const void* kernel, const LaunchConfig& cfg,
              void (*thread_body)(void*), void* ctx);

template <class... P, class... A>
void launch_kernel(const char* name, void (*kernel)(P...), const LaunchConfig& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  // Arguments are converted to the parameter types once, as cudaLaunchKernel copies them;
  // every thread then gets its own copy (kernel parameters are by value).
  using Params = std::tuple<std::decay_t<P>...>;
  struct Ctx {
    void (*kernel)(P...);
    const Params* params;
  };
  const Params params(std::forward<A>(args)...);
  Ctx ctx{kernel, &params};
  run_grid(name, typeid(kernel).name(), reinterpret_cast<const void*>(kernel), cfg,
           [](void* c) {
             const Ctx* x = static_cast<const Ctx*>(c);
             Params copy = *x->params;
             std::apply([x](auto&... p) { x->kernel(p...); }, copy);
           },
           &ctx);
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t take_last_error();
cudaError_t peek_last_error();
cudaError_t device_attribute(int* value, cudaDeviceAttr attr);
const char* error_string(cudaError_t err);

// --- the harness's device memory (guard zones, shadow state) ---
// `misalign` bytes past cudaMalloc's 256-byte alignment (to test unaligned-pointer paths).
void* device_malloc(size_t bytes, const char* name, size_t misalign = 0);
void device_free(void* p);
void copy_to_device(void* dst, const void* src, size_t bytes);    // marks dst initialised
void copy_from_device(void* dst, const void* src, size_t bytes);  // checks src is initialised
void poison_device(void* p, size_t bytes);  // NaN bytes, left uninitialised for the checker

// --- the harness driver's view of the outcome ---
uint64_t error_count();
std::string summary();  // statistics, error counts per kind, the first messages
void install_crash_handler();

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::g_threadIdx)
#define blockIdx (::cuda_emu::g_blockIdx)
#define blockDim (::cuda_emu::g_blockDim)
#define gridDim (::cuda_emu::g_gridDim)

inline cudaError_t cudaGetLastError() { return cuda_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t err) { return cuda_emu::error_string(err); }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // launches are synchronous
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  return cuda_emu::device_attribute(value, attr);
}
template <class T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return cuda_emu::func_set_attribute(reinterpret_cast<const void*>(entry), attr, value);
}
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = cuda_emu::device_malloc(bytes, "cudaMalloc");
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) {
  cuda_emu::device_free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (kind == cudaMemcpyHostToDevice) {
    cuda_emu::copy_to_device(dst, src, bytes);
  } else if (kind == cudaMemcpyDeviceToHost) {
    cuda_emu::copy_from_device(dst, src, bytes);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, bytes, kind);
}

// ------------------------------------------------------------------------------------------------
// Synchronisation, warp collectives
// ------------------------------------------------------------------------------------------------
inline void __syncthreads() { cuda_emu::syncthreads(); }
inline int __syncthreads_count(int pred) { return cuda_emu::syncthreads_count(pred); }
inline int __syncthreads_and(int pred) {
  return cuda_emu::syncthreads_count(pred) ==
         static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int pred) { return cuda_emu::syncthreads_count(pred) > 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_emu::syncwarp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace cuda_emu {
template <class T>
inline T shfl_t(unsigned mask, T var, ShflMode mode, int arg, int width, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffle of this type");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl(mask, bits, mode, arg, width, what);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace cuda_emu

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return cuda_emu::shfl_t(mask, var, cuda_emu::ShflMode::kIdx, src_lane, width, "__shfl_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuda_emu::shfl_t(mask, var, cuda_emu::ShflMode::kUp, static_cast<int>(delta), width,
                          "__shfl_up_sync");
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuda_emu::shfl_t(mask, var, cuda_emu::ShflMode::kDown, static_cast<int>(delta), width,
                          "__shfl_down_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return cuda_emu::shfl_t(mask, var, cuda_emu::ShflMode::kXor, lane_mask, width, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return cuda_emu::ballot(mask, pred, "__ballot_sync");
}
inline int __any_sync(unsigned mask, int pred) {
  return cuda_emu::ballot(mask, pred, "__any_sync") != 0;
}
inline int __all_sync(unsigned mask, int pred) {
  return (cuda_emu::ballot(mask, pred, "__all_sync") & mask) == (mask & cuda_emu::active_lanes_mask());
}
inline unsigned __activemask() { return cuda_emu::active_lanes_mask(); }

// ------------------------------------------------------------------------------------------------
// Atomics: fibers switch only at barriers and collectives, so a read-modify-write is atomic; the
// access is bounds-checked and left out of the race checker (atomics do not race each other).
// ------------------------------------------------------------------------------------------------
#define CUDA_EMU_NO_INSTRUMENT __attribute__((no_sanitize_thread))
template <class T, class F>
CUDA_EMU_NO_INSTRUMENT inline T cuda_emu_atomic_rmw(T* p, F f) {
  cuda_emu::check_atomic(p, sizeof(T));
  const T old = *p;
  *p = f(old);
  return old;
}
template <class T>
inline T atomicAdd(T* p, T v) {
  return cuda_emu_atomic_rmw(p, [v](T o) { return static_cast<T>(o + v); });
}
template <class T>
inline T atomicSub(T* p, T v) {
  return cuda_emu_atomic_rmw(p, [v](T o) { return static_cast<T>(o - v); });
}
template <class T>
inline T atomicMax(T* p, T v) {
  return cuda_emu_atomic_rmw(p, [v](T o) { return o < v ? v : o; });
}
template <class T>
inline T atomicMin(T* p, T v) {
  return cuda_emu_atomic_rmw(p, [v](T o) { return v < o ? v : o; });
}
template <class T>
inline T atomicExch(T* p, T v) {
  return cuda_emu_atomic_rmw(p, [v](T) { return v; });
}
template <class T>
inline T atomicCAS(T* p, T compare, T v) {
  return cuda_emu_atomic_rmw(p, [compare, v](T o) { return o == compare ? v : o; });
}

// ------------------------------------------------------------------------------------------------
// Loads through the read-only cache, math
// ------------------------------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcs(const T* p) {
  return *p;
}
template <class T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stcg(T* p, T v) {
  *p = v;
}

inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
using std::fmaf;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// ------------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: storage types with round-to-nearest-even conversions (bit-exact
// with the hardware's cvt.rn), arithmetic rounded once from double (exact for + - * of halves)
// ------------------------------------------------------------------------------------------------
namespace cuda_emu {
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  if (absu >= 0x7f800000u) return static_cast<uint16_t>(sign | (absu > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (absu < 0x38800000u) {  // below 2^-14: subnormal half (or zero)
    // value = absu's float; half subnormal unit 2^-24: round(value * 2^24) with RNE
    const float scaled = f32_from_bits(absu) * 16777216.f;  // exact (power of two)
    const float r = std::nearbyint(scaled);                  // default rounding mode: RNE
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(r));
  }
  // normal: rebias exponent 127 -> 15, round 23 -> 10 mantissa bits (RNE)
  uint32_t v = absu - 0x38000000u;  // exponent - 112
  const uint32_t lsb = (v >> 13) & 1u;
  v += 0xfffu + lsb;
  return static_cast<uint16_t>(sign | (v >> 13));
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24, exact
    return f32_from_bits(f32_bits(v) | sign);
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (man << 13));
  return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }
}  // namespace cuda_emu

// A 16-bit float kept as its bits (__x, as cuda_fp16.h / cuda_bf16.h keep it), converted through
// float by cuda_emu::TO_BITS and cuda_emu::FROM_BITS.
#define CUDA_EMU_FLOAT16(T, TO_BITS, FROM_BITS)                                \
  struct alignas(2) T {                                                        \
    uint16_t __x;                                                              \
    T() = default;                                                             \
    T(float f) : __x(cuda_emu::TO_BITS(f)) {}                                  \
    T(double f) : __x(cuda_emu::TO_BITS(static_cast<float>(f))) {}            \
    T(int i) : __x(cuda_emu::TO_BITS(static_cast<float>(i))) {}               \
    operator float() const { return cuda_emu::FROM_BITS(__x); }                \
  };
CUDA_EMU_FLOAT16(__half, float_to_half_bits, half_bits_to_float)
CUDA_EMU_VECTOR2(__half2, __half)
CUDA_EMU_FLOAT16(__nv_bfloat16, float_to_bf16_bits, bf16_bits_to_float)
CUDA_EMU_VECTOR2(__nv_bfloat162, __nv_bfloat16)
typedef __half half;
typedef __half2 half2;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline float2 __half22float2(__half2 h) { return float2(__half2float(h.x), __half2float(h.y)); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short bits) {
  __half h;
  h.__x = bits;
  return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
  __nv_bfloat16 b;
  b.__x = bits;
  return b;
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b));
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 b) {
  return float2(__bfloat162float(b.x), __bfloat162float(b.y));
}
inline float __low2float(__nv_bfloat162 b) { return __bfloat162float(b.x); }
inline float __high2float(__nv_bfloat162 b) { return __bfloat162float(b.y); }

// Native half arithmetic: exact in double for + - * (and fma) of half operands, rounded once.
#define CUDA_EMU_HALF_OPS(H, H2)                                                                  \
  inline H cuda_emu_round(double v, H) { return H(static_cast<float>(v)); }                        \
  inline H __hadd(H a, H b) { return H(static_cast<float>(double(float(a)) + double(float(b)))); } \
  inline H __hsub(H a, H b) { return H(static_cast<float>(double(float(a)) - double(float(b)))); } \
  inline H __hmul(H a, H b) { return H(static_cast<float>(double(float(a)) * double(float(b)))); } \
  inline H __hdiv(H a, H b) { return H(static_cast<float>(double(float(a)) / double(float(b)))); } \
  inline H __hfma(H a, H b, H c) {                                                                \
    return H(static_cast<float>(std::fma(double(float(a)), double(float(b)), double(float(c))))); \
  }                                                                                               \
  inline H __hneg(H a) {                                                                          \
    H r = a;                                                                                      \
    r.__x ^= 0x8000u;                                                                             \
    return r;                                                                                     \
  }                                                                                               \
  inline H operator+(H a, H b) { return __hadd(a, b); }                                           \
  inline H operator-(H a, H b) { return __hsub(a, b); }                                           \
  inline H operator*(H a, H b) { return __hmul(a, b); }                                           \
  inline H operator/(H a, H b) { return __hdiv(a, b); }                                           \
  inline H operator-(H a) { return __hneg(a); }                                                   \
  inline H& operator+=(H& a, H b) { return a = __hadd(a, b); }                                    \
  inline H& operator-=(H& a, H b) { return a = __hsub(a, b); }                                    \
  inline H& operator*=(H& a, H b) { return a = __hmul(a, b); }                                    \
  inline bool operator==(H a, H b) { return float(a) == float(b); }                               \
  inline bool operator!=(H a, H b) { return float(a) != float(b); }                               \
  inline bool operator<(H a, H b) { return float(a) < float(b); }                                 \
  inline bool operator>(H a, H b) { return float(a) > float(b); }                                 \
  inline bool operator<=(H a, H b) { return float(a) <= float(b); }                               \
  inline bool operator>=(H a, H b) { return float(a) >= float(b); }                               \
  inline H2 __hadd2(H2 a, H2 b) { return H2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }                \
  inline H2 __hsub2(H2 a, H2 b) { return H2(__hsub(a.x, b.x), __hsub(a.y, b.y)); }                \
  inline H2 __hmul2(H2 a, H2 b) { return H2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }                \
  inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); } \
  inline H2 operator+(H2 a, H2 b) { return __hadd2(a, b); }                                       \
  inline H2 operator-(H2 a, H2 b) { return __hsub2(a, b); }                                       \
  inline H2 operator*(H2 a, H2 b) { return __hmul2(a, b); }
CUDA_EMU_HALF_OPS(__half, __half2)
CUDA_EMU_HALF_OPS(__nv_bfloat16, __nv_bfloat162)
#undef CUDA_EMU_HALF_OPS

// ------------------------------------------------------------------------------------------------
// WMMA (nvcuda::wmma): each lane holds the whole tile (the hardware's element-to-lane mapping is
// unspecified, and code that only loads, fills, multiplies and stores cannot observe it). Loads
// and stores are warp-collective: every lane must arrive; a store writes each element from one
// lane (element e from lane e % 32), so the race checker sees what the hardware does. Products
// of the 16-bit inputs are exact in fp32 and accumulate in fp32, in k order.
// ------------------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct tile_dims;
template <int M, int N, int K>
struct tile_dims<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_dims<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_dims<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = tile_dims<Use, M, N, K>::rows, cols = tile_dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // row-major tile
};

namespace detail {
template <class T>
inline void check_ptr_ldm(const T* p, unsigned ldm, const char* what) {
  // PTX wmma.load/store: 256-bit aligned address, ldm a multiple of 16 bytes.
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) cuda_emu::report_api_misuse(what);
  if ((ldm * sizeof(T)) % 16 != 0) cuda_emu::report_api_misuse(what);
}
inline bool is_row_major(row_major) { return true; }
inline bool is_row_major(col_major) { return false; }
}  // namespace detail

// Fragments are registers on a GPU: arithmetic on them is not instrumented (fast), only the
// loads and stores of shared/global memory are.
template <class Use, int M, int N, int K, class T, class Layout>
CUDA_EMU_NO_INSTRUMENT inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& v) {
  cuda_emu::warp_converge("wmma::fill_fragment");
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}
template <class Use, int M, int N, int K, class T, class Layout, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  fill_fragment(f, static_cast<T>(v));
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  cuda_emu::warp_converge("wmma::load_matrix_sync");
  detail::check_ptr_ldm(p, ldm, "wmma::load_matrix_sync: pointer not 32-byte aligned or ldm not a multiple of 16 bytes");
  const bool row = detail::is_row_major(Layout{});
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = row ? p[r * ldm + c] : p[c * ldm + r];
}
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                             layout_t layout) {
  cuda_emu::warp_converge("wmma::load_matrix_sync");
  detail::check_ptr_ldm(p, ldm, "wmma::load_matrix_sync: pointer not 32-byte aligned or ldm not a multiple of 16 bytes");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                              layout_t layout) {
  cuda_emu::warp_converge("wmma::store_matrix_sync");
  detail::check_ptr_ldm(p, ldm, "wmma::store_matrix_sync: pointer not 32-byte aligned or ldm not a multiple of 16 bytes");
  const int lane = static_cast<int>((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32);
  for (int e = lane; e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[e];
  }
}
template <int M, int N, int K, class TA, class LA, class LB, class TC>
CUDA_EMU_NO_INSTRUMENT inline void mma_sync(fragment<accumulator, M, N, K, TC>& d,
                                            const fragment<matrix_a, M, N, K, TA, LA>& a,
                                            const fragment<matrix_b, M, N, K, TA, LB>& b,
                                            const fragment<accumulator, M, N, K, TC>& c) {
  cuda_emu::warp_converge("wmma::mma_sync");
  float af[M * K], bf[K * N], out[M * N];
  for (int e = 0; e < M * K; ++e) af[e] = static_cast<float>(a.x[e]);
  for (int e = 0; e < K * N; ++e) bf[e] = static_cast<float>(b.x[e]);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = static_cast<float>(c.x[i * N + j]);
      for (int k = 0; k < K; ++k) acc = std::fma(af[i * K + k], bf[k * N + j], acc);
      out[i * N + j] = acc;
    }
  for (int e = 0; e < M * N; ++e) d.x[e] = static_cast<TC>(out[e]);
}
}  // namespace wmma
}  // namespace nvcuda
