// Per-thread scratch memory of the CPU kernels: kept between calls, so that a call pays no
// allocation and no page faults for its row buffers.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <unistd.h>

#include "simd.h"

namespace segnext {
namespace {

class ThreadScratch {
 public:
  ~ThreadScratch() { std::free(ptr_); }
  void* get(size_t bytes) {
    if (bytes > size_) {
      std::free(ptr_);
      size_ = round_up(static_cast<int64_t>(bytes), 4096);
      ptr_ = std::aligned_alloc(64, size_);
      TORCH_CHECK(ptr_ != nullptr, "segnext (cpu): cannot allocate ", size_, " bytes of scratch");
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// Carves 64-byte aligned pieces out of one scratch block (first pass sizes, second assigns).
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  T* take(int64_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += round_up(count * static_cast<int64_t>(sizeof(T)), 64);
    return p;
  }
  int64_t used() const { return used_; }

 private:
  char* base_;
  int64_t used_ = 0;
};

// This core's L2 size (what the kernels size their row chunks by), 1 MiB when unknown.
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v >= 256 * 1024 && v <= 64L * 1024 * 1024) return static_cast<int64_t>(v);
#endif
    return static_cast<int64_t>(1024 * 1024);
  }();
  return bytes;
}

}  // namespace
}  // namespace segnext
