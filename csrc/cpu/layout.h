// Memory layouts of the CPU kernels' results: they compute in one layout and return a tensor
// laid out as empty_like(input) would be (x's own layout for contiguous or channels-last x).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace segnext {
namespace {

// The layout the kernels run in: channels-last when x is laid out so, else NCHW (x strided
// otherwise is copied once).
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// `computed`, or a copy of it with empty_like(like)'s strides (and `dtype`, default like's)
// when they differ.
inline at::Tensor in_format_of(const at::Tensor& computed, const at::Tensor& like,
                               std::optional<at::ScalarType> dtype = std::nullopt) {
  at::Tensor out = at::empty_like(like, like.options().dtype(dtype.value_or(like.scalar_type())));
  if (out.strides() == computed.strides()) return computed;
  out.copy_(computed);
  return out;
}

}  // namespace
}  // namespace segnext
