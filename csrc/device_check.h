// One device for every tensor of an op call.
//
// A kernel dereferences each tensor's data pointer on the device it runs on: a tensor on another
// device (or on meta, which has no data) would be read as garbage or fault, so every op checks
// its tensors first and names the one that is elsewhere.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <utility>

namespace segnext {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

inline void check_device(const char* op, const c10::Device& device,
                         std::initializer_list<NamedTensor> tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(),
                " but this kernel runs on ", device, "; all tensors must be on one device");
  }
}

}  // namespace segnext
