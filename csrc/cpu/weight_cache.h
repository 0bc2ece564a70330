// Packed GEMM weights kept between calls, so that a layer's weight is packed (transposed into
// gemm.h's panels) once rather than on every call: for the large 1x1 convs of the MLPs the
// packing would cost more than the GEMMs at small spatial sizes.
//
// An entry is found by the weight's TensorImpl, held weakly (the entry of a freed tensor is
// dropped, never matched by a new tensor at the same address), its data pointer, version
// counter (bumped by every in-place write through the tensor or its views), sizes, strides and
// dtype, and the packing (accumulation type, K). Writes that bypass the version counter
// (through `.data` or a NumPy view) are not seen: after such a write, pass a new tensor or bump
// the version (an in-place op). Inference tensors have no version counter: packed per call.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "gemm.h"

namespace segnext {
namespace {

template <typename P>
class PackedWeightCache {
 public:
  std::shared_ptr<const P> get(const at::Tensor& w, int64_t K) {
    if (w.is_inference() || !w.defined()) return pack(w, K);
    const uint32_t version = w.unsafeGetTensorImpl()->version_counter().current_version();
    std::lock_guard<std::mutex> lock(mu_);
    drop_expired();
    for (const Entry& e : entries_) {
      if (e.impl.lock().get() == w.unsafeGetTensorImpl() && e.data == w.data_ptr() &&
          e.version == version && e.K == K && e.dtype == w.scalar_type() &&
          e.sizes == w.sizes().vec() && e.strides == w.strides().vec()) {
        return e.packed;
      }
    }
    auto packed = pack(w, K);
    bytes_ += packed_bytes(*packed);
    entries_.push_back(Entry{Weak(w.getIntrusivePtr()), w.data_ptr(), version, K,
                             w.scalar_type(), w.sizes().vec(), w.strides().vec(), packed});
    while (bytes_ > kMaxBytes && entries_.size() > 1) {  // oldest first
      bytes_ -= packed_bytes(*entries_.front().packed);
      entries_.erase(entries_.begin());
    }
    return packed;
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak impl;
    const void* data;
    uint32_t version;
    int64_t K;
    at::ScalarType dtype;
    std::vector<int64_t> sizes, strides;
    std::shared_ptr<const P> packed;
  };
  static constexpr int64_t kMaxBytes = int64_t(512) << 20;

  static std::shared_ptr<const P> pack(const at::Tensor& w, int64_t K) {
    auto p = std::make_shared<P>();
    pack_weight(*p, w, K);
    return p;
  }
  static int64_t packed_bytes(const P& p) { return p.bytes(); }
  void drop_expired() {
    for (size_t i = 0; i < entries_.size();) {
      if (entries_[i].impl.expired()) {
        bytes_ -= packed_bytes(*entries_[i].packed);
        entries_.erase(entries_.begin() + i);
      } else {
        ++i;
      }
    }
  }

  std::mutex mu_;
  std::vector<Entry> entries_;
  int64_t bytes_ = 0;
};

// The packed B of y = A weight^T (see pack_weight), from this translation unit's cache; P is
// PackedB<T> or PackedBf16.
template <typename P>
std::shared_ptr<const P> packed(const at::Tensor& w, int64_t K) {
  static PackedWeightCache<P> cache;
  return cache.get(w, K);
}
template <typename T>
std::shared_ptr<const PackedB<T>> packed_weight(const at::Tensor& w, int64_t K) {
  return packed<PackedB<T>>(w, K);
}

}  // namespace
}  // namespace segnext
