// Output poisoning (tests): when on, the CPU ops fill their outputs (and some scratch) with NaN
// before computing, so a kernel that leaves an element unwritten fails the comparison with the
// reference.
//
// The switch is SEGNEXT_POISON, one name for Python, Triton and C++. The environment is read in
// segnext_kernels/_env.py only: segnext_kernels/_extension.py hands the flag to the library when
// it loads it (_C.set_poison), and tests flip it with segnext_kernels._extension.set_poison.
#pragma once

#include <atomic>

namespace segnext {

// One flag for the whole library (an inline function's static is shared by every file).
inline std::atomic<bool>& poison_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline bool poison_outputs() { return poison_flag().load(std::memory_order_relaxed); }

inline void set_poison_outputs(bool on) { poison_flag().store(on, std::memory_order_relaxed); }

}  // namespace segnext
