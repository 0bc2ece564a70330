// cuda_emu_runtime.cpp: the execution and checking side of the CUDA emulation harness
// (docs/cuda_emulation.md). Compiled without instrumentation.
//
// - Device memory: one arena; every allocation is followed by a guard gap at least as large as
//   itself, and a shadow byte per 2-byte granule says allocated / initialised.
// - Shared memory: one arena per block (blocks run one at a time): the dynamic region, a static
//   region, and guard space around both so that an out-of-bounds access is reported, not fatal.
// - Each CUDA thread is a fiber (a hand-written context switch on x86-64, ucontext elsewhere);
//   the scheduler runs the runnable fibers in thread order (or reverse order), always the same.
// - Race checker: a per-granule shadow records the last writer (thread, barrier phase) and the
//   last reader; an access by another thread to a granule written (or, for a write, read) in the
//   same phase -- between the same two __syncthreads -- is a race whatever the fiber order. In
//   device memory the same holds across the blocks of one launch (blocks run concurrently on a GPU).
// - The instrumented kernel translation unit calls the __tsan_read*/__tsan_write* hooks below
//   (GCC's -fsanitize=thread instrumentation without its runtime) for every load and store.
#include "cuda_emu.h"

#include <cxxabi.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu {

uint3 g_threadIdx{0, 0, 0}, g_blockIdx{0, 0, 0};
dim3 g_blockDim{1, 1, 1}, g_gridDim{1, 1, 1};

namespace {

// ------------------------------------------------------------------------------------------------
// Options (environment, read once)
// ------------------------------------------------------------------------------------------------
struct Device {
  const char* name;
  int optin_smem;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
};
constexpr Device kDevices[] = {{"sm_90", 232448}, {"sm_80", 166912}, {"sm_86", 101376},
                               {"sm_75", 65536}};
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kMaxThreads = 1024;

struct Options {
  Device device = kDevices[0];
  bool reverse = false;  // run fibers in reverse thread order
  size_t max_messages = 40;
};

Options load_options() {
  Options o;
  if (const char* d = std::getenv("CUDA_EMU_DEVICE")) {
    bool found = false;
    for (const Device& dev : kDevices)
      if (std::string(d) == dev.name) {
        o.device = dev;
        found = true;
      }
    if (!found) {
      std::fprintf(stderr, "cuda_emu: unknown CUDA_EMU_DEVICE=%s (sm_90, sm_80, sm_86, sm_75)\n", d);
      std::exit(2);
    }
  }
  if (const char* s = std::getenv("CUDA_EMU_ORDER")) o.reverse = std::string(s) == "reverse";
  if (const char* m = std::getenv("CUDA_EMU_MAX_MESSAGES")) o.max_messages = std::strtoul(m, nullptr, 10);
  return o;
}
const Options& opts() {
  static const Options o = load_options();
  return o;
}

// ------------------------------------------------------------------------------------------------
// Reports
// ------------------------------------------------------------------------------------------------
enum Kind : int {
  kSharedOOB,
  kGlobalOOB,
  kHostDeref,
  kMisaligned,
  kSharedRace,
  kGlobalRace,
  kUninitShared,
  kUninitGlobal,
  kUnwrittenOutput,
  kBarrier,
  kWarp,
  kApiMisuse,
  kLaunchError,
  kNumKinds
};
const char* const kKindNames[kNumKinds] = {
    "shared-out-of-bounds", "global-out-of-bounds", "host-deref-of-device-memory", "misaligned-access",
    "shared-race", "global-race", "uninitialized-shared-read", "uninitialized-global-read",
    "output-not-written", "barrier-deadlock", "warp-collective", "api-misuse", "launch-error"};

uint64_t g_counts[kNumKinds];
std::vector<std::string> g_messages;

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, collectives = 0, accesses = 0;
} g_stats;

// ------------------------------------------------------------------------------------------------
// Execution state
// ------------------------------------------------------------------------------------------------
bool g_in_kernel = false;
std::string g_kernel_name;
uint32_t g_phase = 0;             // barrier interval of the current block (globally unique)
uint32_t g_block_first_phase = 0;  // first phase of the current block
uint32_t g_launch_first_phase = 0;
int g_cur = -1;  // linear thread index of the running fiber
int g_nthreads = 0;
std::vector<uint16_t> g_warp_syncs;  // __syncwarp count per warp
struct BlockStart {
  uint32_t phase;
  uint3 idx;
};
std::vector<BlockStart> g_launch_blocks;  // for messages: which block owned a phase

std::string fmt_idx(uint3 v) {
  char b[64];
  std::snprintf(b, sizeof b, "(%u,%u,%u)", v.x, v.y, v.z);
  return b;
}
uint3 thread_idx_of(int t) {
  const unsigned bx = g_blockDim.x, by = g_blockDim.y;
  return uint3{t % bx, (t / bx) % by, t / (bx * by)};
}
uint3 block_of_phase(uint32_t phase) {
  auto it = std::upper_bound(g_launch_blocks.begin(), g_launch_blocks.end(), phase,
                             [](uint32_t p, const BlockStart& b) { return p < b.phase; });
  return it == g_launch_blocks.begin() ? uint3{0, 0, 0} : std::prev(it)->idx;
}

std::string where() {
  if (!g_in_kernel) return "host code";
  std::string w = "kernel " + g_kernel_name + " block " + fmt_idx(g_blockIdx);
  if (g_cur >= 0) w += " thread " + fmt_idx(thread_idx_of(g_cur));
  return w;
}

// Counts every error; builds the message (msg()) only for the first few.
template <class F>
void report_lazy(Kind k, F msg) {
  ++g_counts[k];
  if (g_messages.size() < opts().max_messages)
    g_messages.push_back(std::string("[") + kKindNames[k] + "] " + where() + ": " + msg());
}
void report(Kind k, const std::string& msg) {
  report_lazy(k, [&] { return msg; });
}

// ------------------------------------------------------------------------------------------------
// Shadow memory
// ------------------------------------------------------------------------------------------------
constexpr uintptr_t kGranule = 2;
constexpr uint16_t kManyReaders = 0xffff;
struct Shadow {
  uint32_t w_phase;  // phase of the last write (0: none)
  uint32_t r_phase;  // phase of the last read
  uint32_t r_prev;   // a read phase from an earlier block than r_phase's (device memory)
  uint16_t w_tid, r_tid, w_wsync, pad;
};
enum : uint8_t { kAllocated = 1, kInitialised = 2 };

void* map_noreserve(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("cuda_emu: mmap");
    std::exit(2);
  }
  return p;
}

struct Region {
  uintptr_t lo = 0, hi = 0;
  Shadow* shadow = nullptr;
  uint8_t* flags = nullptr;
  void init(size_t bytes) {
    lo = reinterpret_cast<uintptr_t>(map_noreserve(bytes));
    hi = lo + bytes;
    shadow = static_cast<Shadow*>(map_noreserve(bytes / kGranule * sizeof(Shadow)));
    flags = static_cast<uint8_t*>(map_noreserve(bytes / kGranule));
  }
  bool contains(uintptr_t a) const { return a - lo < hi - lo; }
  size_t granule(uintptr_t a) const { return (a - lo) / kGranule; }
};

// Device memory: allocations with guard gaps.
constexpr size_t kDeviceArena = size_t(1) << 30;
struct Allocation {
  uintptr_t base;
  size_t bytes;
  std::string name;
  bool live;
};
Region g_dev;
uintptr_t g_dev_next = 0;
std::vector<Allocation> g_allocs;  // sorted by base

// Shared memory: [guard 64K][dynamic 256K][static 64K][guard 256K]
constexpr size_t kSmemGuardLo = 64 * 1024, kSmemDyn = 256 * 1024, kSmemStatic = 64 * 1024,
                 kSmemGuardHi = 256 * 1024;
Region g_smem;
uintptr_t g_dyn_base = 0, g_static_base = 0;
size_t g_dyn_bytes = 0, g_static_used = 0;
size_t g_smem_limit = 48 * 1024;  // the running kernel's dynamic + static limit
std::map<std::string, size_t> g_static_offsets;  // per launch

void init_memory() {
  if (g_dev.lo) return;
  g_dev.init(kDeviceArena);
  g_dev_next = g_dev.lo + 4096;
  g_smem.init(kSmemGuardLo + kSmemDyn + kSmemStatic + kSmemGuardHi);
  g_dyn_base = g_smem.lo + kSmemGuardLo;
  g_static_base = g_dyn_base + kSmemDyn;
}

const Allocation* find_allocation(uintptr_t a) {
  auto it = std::upper_bound(g_allocs.begin(), g_allocs.end(), a,
                             [](uintptr_t x, const Allocation& al) { return x < al.base; });
  return it == g_allocs.begin() ? nullptr : &*std::prev(it);
}

std::string describe_device(uintptr_t a, size_t n) {
  char b[256];
  const Allocation* al = find_allocation(a);
  if (al == nullptr) {
    std::snprintf(b, sizeof b, "%zu bytes at device address %#" PRIxPTR " (before every allocation)", n, a);
  } else if (a < al->base + al->bytes) {
    std::snprintf(b, sizeof b, "%zu bytes at byte %zu of '%s' (%zu bytes%s)", n,
                  static_cast<size_t>(a - al->base), al->name.c_str(), al->bytes, al->live ? "" : ", freed");
  } else {
    std::snprintf(b, sizeof b, "%zu bytes at %zu bytes past the end of '%s' (%zu bytes)", n,
                  static_cast<size_t>(a - al->base - al->bytes), al->name.c_str(), al->bytes);
  }
  return b;
}

std::string describe_shared(uintptr_t a, size_t n) {
  char b[256];
  if (a >= g_static_base && a < g_static_base + kSmemStatic) {
    std::snprintf(b, sizeof b, "%zu bytes at static shared byte %zu (%zu bytes declared)", n,
                  static_cast<size_t>(a - g_static_base), g_static_used);
  } else {
    std::snprintf(b, sizeof b, "%zu bytes at dynamic shared byte %td (launched with %zu bytes)", n,
                  static_cast<ptrdiff_t>(a - g_dyn_base), g_dyn_bytes);
  }
  return b;
}

bool warp_synced(const Shadow& s, int tid) {
  return s.w_tid / 32 == tid / 32 && s.w_wsync != g_warp_syncs[tid / 32];
}

// One granule of a shared or device access: race checks and shadow update. Returns false when
// the granule was never written (uninitialised read), for the caller to report once.
bool check_granule(Shadow& s, bool write, bool device, std::string (*describe)(uintptr_t, size_t),
                   uintptr_t addr, size_t n) {
  const int t = g_cur;
  const bool same_phase_other_writer = s.w_phase == g_phase && s.w_tid != t && !warp_synced(s, t);
  const bool other_block_writer =
      device && s.w_phase >= g_launch_first_phase && s.w_phase < g_block_first_phase;
  const Kind race = device ? kGlobalRace : kSharedRace;
  // The last write was by another thread in this barrier interval, or by another block of this
  // launch: `access` ("read of", "write of") names this access, `written` the earlier one.
  const auto report_writer = [&](const char* access, const char* written, const char* note) {
    if (same_phase_other_writer) {
      report_lazy(race, [&] {
        return access + (" " + describe(addr, n)) + " " + written + " by thread " +
               fmt_idx(thread_idx_of(s.w_tid)) + " in the same barrier interval" + note;
      });
    } else if (other_block_writer) {
      report_lazy(race, [&] {
        return access + (" " + describe(addr, n)) + " " + written + " by block " +
               fmt_idx(block_of_phase(s.w_phase)) + " of the same launch";
      });
    }
  };
  if (!write) {
    report_writer("read of", "written", " (no __syncthreads between them)");
    if (s.r_phase == g_phase) {
      if (s.r_tid != t) s.r_tid = kManyReaders;
    } else {
      if (s.r_phase < g_block_first_phase) s.r_prev = s.r_phase;
      s.r_phase = g_phase;
      s.r_tid = static_cast<uint16_t>(t);
    }
    return s.w_phase != 0 && (device || s.w_phase >= g_block_first_phase);
  }
  report_writer("write of", "also written", "");
  if (s.r_phase == g_phase && s.r_tid != t) {
    report_lazy(race, [&] {
      return "write of " + describe(addr, n) + " read by " +
             (s.r_tid == kManyReaders ? std::string("other threads") : "thread " + fmt_idx(thread_idx_of(s.r_tid))) +
             " in the same barrier interval (no __syncthreads between them)";
    });
  } else if (device && ((s.r_phase >= g_launch_first_phase && s.r_phase < g_block_first_phase) ||
                        (s.r_prev >= g_launch_first_phase && s.r_prev < g_block_first_phase))) {
    report_lazy(race, [&] { return "write of " + describe(addr, n) + " read by another block of the same launch"; });
  }
  s.w_phase = g_phase;
  s.w_tid = static_cast<uint16_t>(t);
  s.w_wsync = g_warp_syncs[t / 32];
  return true;
}

void shared_access(uintptr_t a, size_t n, bool write) {
  const bool in_dyn = a >= g_dyn_base && a + n <= g_dyn_base + g_dyn_bytes;
  const bool in_static = a >= g_static_base && a + n <= g_static_base + g_static_used;
  if (!in_dyn && !in_static) {
    report_lazy(kSharedOOB, [&] { return std::string(write ? "write of " : "read of ") + describe_shared(a, n); });
    return;
  }
  bool init = true;
  for (size_t g = g_smem.granule(a), e = g_smem.granule(a + n - 1); g <= e; ++g)
    init &= check_granule(g_smem.shadow[g], write, false, describe_shared, a, n);
  if (!init) report_lazy(kUninitShared, [&] { return "read of " + describe_shared(a, n) + " never written by this block"; });
}

void device_access(uintptr_t a, size_t n, bool write) {
  const size_t g0 = g_dev.granule(a), g1 = g_dev.granule(a + n - 1);
  for (size_t g = g0; g <= g1; ++g) {
    if (!(g_dev.flags[g] & kAllocated)) {
      report_lazy(kGlobalOOB, [&] { return std::string(write ? "write of " : "read of ") + describe_device(a, n); });
      return;
    }
  }
  bool init = true;
  for (size_t g = g0; g <= g1; ++g) {
    check_granule(g_dev.shadow[g], write, true, describe_device, a, n);
    if (write) {
      g_dev.flags[g] |= kInitialised;
    } else {
      init &= (g_dev.flags[g] & kInitialised) != 0;
    }
  }
  if (!init) report_lazy(kUninitGlobal, [&] { return "read of " + describe_device(a, n) + " never written (poisoned)"; });
}

inline void on_access(const void* p, size_t n, bool write, bool natural_alignment) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const bool smem = g_smem.contains(a), dev = g_dev.contains(a);
  if (!smem && !dev) return;  // host memory: the kernel's own stack, arguments, runtime state
  if (!g_in_kernel) {
    if (dev) report_lazy(kHostDeref, [&] { return std::string(write ? "write of " : "read of ") + describe_device(a, n); });
    return;
  }
  ++g_stats.accesses;
  if (natural_alignment && a % n != 0) {
    report_lazy(kMisaligned, [&] {
      return std::to_string(n) + "-byte access at an address that is not " + std::to_string(n) +
             "-byte aligned: " + (smem ? describe_shared(a, n) : describe_device(a, n));
    });
  }
  if (smem) {
    shared_access(a, n, write);
  } else {
    device_access(a, n, write);
  }
}

// ------------------------------------------------------------------------------------------------
// Fibers
// ------------------------------------------------------------------------------------------------
constexpr size_t kStackBytes = 512 * 1024, kGuardBytes = 4096;

enum FiberState : uint8_t { kRunnable, kWaitBarrier, kWaitWarp, kExited };
struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;  // lowest usable byte
  FiberState state = kExited;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};
std::vector<Fiber> g_fibers;
char* g_stacks = nullptr;
void* g_sched_sp = nullptr;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;

#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
#else
ucontext_t g_sched_uc;
#endif

[[noreturn]] void fiber_main();

void fiber_init(Fiber& f) {
#if defined(__x86_64__)
  auto* sp = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);  // 16-byte aligned
  *--sp = 0;                                                    // fiber_main's return address
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);              // where `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = 0;                        // rbp rbx r12-r15
  *--sp = (uint64_t{0x037f} << 32) | 0x1f80;                    // x87 control word, mxcsr
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
  f.state = kRunnable;
}

void switch_to_fiber(int t) {
  g_cur = t;
  g_threadIdx = thread_idx_of(t);
#if defined(__x86_64__)
  cuda_emu_switch(&g_sched_sp, g_fibers[t].sp);
#else
  swapcontext(&g_sched_uc, &g_fibers[t].uc);
#endif
}

void yield_to_scheduler() {
#if defined(__x86_64__)
  cuda_emu_switch(&g_fibers[g_cur].sp, g_sched_sp);
#else
  swapcontext(&g_fibers[g_cur].uc, &g_sched_uc);
#endif
}

[[noreturn]] void fiber_main() {
  g_body(g_body_ctx);
  g_fibers[g_cur].state = kExited;
  yield_to_scheduler();
  std::abort();  // an exited fiber is never resumed
}

void ensure_fibers(int n) {
  if (static_cast<int>(g_fibers.size()) >= n) return;
  if (g_stacks == nullptr) {
    const size_t per = kStackBytes + kGuardBytes;
    g_stacks = static_cast<char*>(map_noreserve(per * kMaxThreads));
    for (int i = 0; i < kMaxThreads; ++i) mprotect(g_stacks + i * per, kGuardBytes, PROT_NONE);
  }
  g_fibers.resize(kMaxThreads);
  for (int i = 0; i < kMaxThreads; ++i)
    g_fibers[i].stack = g_stacks + i * (kStackBytes + kGuardBytes) + kGuardBytes;
}

// ------------------------------------------------------------------------------------------------
// Barriers and warp collectives
// ------------------------------------------------------------------------------------------------
int g_bar_arrived = 0, g_bar_count = 0, g_bar_result = 0;

unsigned lanes_of_warp(int w) {
  const int first = w * 32, n = std::min(32, g_nthreads - first);
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

enum class Coll : int { kShfl, kBallot, kConverge, kSyncwarp };
struct WarpColl {
  unsigned arrived = 0, mask = 0;
  Coll kind = Coll::kConverge;
  ShflMode mode = ShflMode::kIdx;
  int width = 32;
  const char* what = "";
  uint64_t val[32], res[32];
  int arg[32];
};
std::vector<WarpColl> g_warps;

std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "%#010x", m);
  return b;
}

uint64_t collective(Coll kind, unsigned mask, uint64_t val, ShflMode mode, int arg, int width,
                    const char* what) {
  ++g_stats.collectives;
  const int t = g_cur, lane = t % 32, w = t / 32;
  const unsigned exist = lanes_of_warp(w);
  if (!((mask >> lane) & 1u)) {
    report(kWarp, std::string(what) + " called by lane " + std::to_string(lane) +
                      " with a mask that does not contain it (" + hex(mask) + ")");
    mask |= 1u << lane;
  }
  if (mask & ~exist) {
    report(kWarp, std::string(what) + ": mask " + hex(mask) + " names lanes that do not exist in a " +
                      std::to_string(g_nthreads) + "-thread block");
    mask &= exist;
  }
  if (width <= 0 || width > 32 || (width & (width - 1))) {
    report(kWarp, std::string(what) + ": width " + std::to_string(width) + " is not a power of 2 <= 32");
    width = 32;
  }
  WarpColl& c = g_warps[w];
  if (c.arrived == 0) {
    c.mask = mask;
    c.kind = kind;
    c.mode = mode;
    c.width = width;
    c.what = what;
  } else if (c.mask != mask || c.kind != kind || c.mode != mode || c.width != width ||
             std::string(c.what) != what) {
    report(kWarp, std::string("lane ") + std::to_string(lane) + " calls " + what + " (mask " + hex(mask) +
                      ") while other lanes of warp " + std::to_string(w) + " wait in " + c.what +
                      " (mask " + hex(c.mask) + ")");
  }
  c.val[lane] = val;
  c.arg[lane] = arg;
  c.arrived |= 1u << lane;
  if ((c.arrived & c.mask) == c.mask) {
    if (c.kind == Coll::kShfl) {
      for (int l = 0; l < 32; ++l) {
        if (!((c.mask >> l) & 1u)) continue;
        const int seg = l & ~(c.width - 1), a = c.arg[l];
        int src = l;
        switch (c.mode) {
          case ShflMode::kIdx: src = seg + (a & (c.width - 1)); break;
          case ShflMode::kUp: src = l - a >= seg ? l - a : l; break;
          case ShflMode::kDown: src = l + a < seg + c.width ? l + a : l; break;
          case ShflMode::kXor: src = (l ^ a) >= seg && (l ^ a) < seg + c.width ? l ^ a : l; break;
        }
        if (!((c.mask >> src) & 1u)) {
          report(kWarp, std::string(c.what) + ": lane " + std::to_string(l) + " reads lane " +
                            std::to_string(src) + ", which is not in the mask " + hex(c.mask));
          src = l;
        }
        c.res[l] = c.val[src];
      }
    } else if (c.kind == Coll::kBallot) {
      uint64_t bits = 0;
      for (int l = 0; l < 32; ++l)
        if (((c.mask >> l) & 1u) && c.val[l]) bits |= uint64_t{1} << l;
      for (int l = 0; l < 32; ++l) c.res[l] = bits;
    } else if (c.kind == Coll::kSyncwarp) {
      ++g_warp_syncs[w];
    }
    const unsigned done = c.mask;
    c.arrived = 0;
    for (int l = 0; l < 32; ++l)
      if (((done >> l) & 1u) && l != lane && g_fibers[w * 32 + l].state == kWaitWarp)
        g_fibers[w * 32 + l].state = kRunnable;
    return c.res[lane];
  }
  g_fibers[t].state = kWaitWarp;
  yield_to_scheduler();
  return g_warps[w].res[lane];
}

std::string deadlock_summary() {
  int bar = 0, warp = 0, exited = 0;
  std::string warps;
  for (int t = 0; t < g_nthreads; ++t) {
    switch (g_fibers[t].state) {
      case kWaitBarrier: ++bar; break;
      case kExited: ++exited; break;
      case kWaitWarp: ++warp; break;
      default: break;
    }
  }
  for (size_t w = 0; w < g_warps.size(); ++w)
    if (g_warps[w].arrived)
      warps += " warp " + std::to_string(w) + ": lanes " + hex(g_warps[w].arrived) + " wait in " +
               g_warps[w].what + " (mask " + hex(g_warps[w].mask) + ");";
  return std::to_string(bar) + " of " + std::to_string(g_nthreads) + " threads wait in __syncthreads, " +
         std::to_string(warp) + " in warp collectives, " + std::to_string(exited) + " have exited;" + warps;
}

// ------------------------------------------------------------------------------------------------
// Launches
// ------------------------------------------------------------------------------------------------
cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize

std::string demangle(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : name;
  std::free(d);
  return s;
}

void launch_error(cudaError_t err, const std::string& msg) {
  if (g_last_error == cudaSuccess) g_last_error = err;
  report(kLaunchError, msg);
}

void run_block() {
  ++g_stats.blocks;
  g_stats.threads += static_cast<uint64_t>(g_nthreads);
  g_block_first_phase = g_phase = g_phase + 1;
  g_launch_blocks.push_back(BlockStart{g_phase, g_blockIdx});
  std::memset(reinterpret_cast<void*>(g_dyn_base), 0xff, g_dyn_bytes);  // NaN in every float type
  std::memset(reinterpret_cast<void*>(g_static_base), 0xff, kSmemStatic);
  for (int t = 0; t < g_nthreads; ++t) fiber_init(g_fibers[t]);
  for (auto& c : g_warps) c.arrived = 0;
  g_bar_arrived = 0;
  int exited = 0;
  while (exited < g_nthreads) {
    bool progress = false;
    for (int i = 0; i < g_nthreads; ++i) {
      const int t = opts().reverse ? g_nthreads - 1 - i : i;
      if (g_fibers[t].state != kRunnable) continue;
      switch_to_fiber(t);
      progress = true;
      if (g_fibers[t].state == kExited) ++exited;
    }
    if (!progress && exited < g_nthreads) {
      g_cur = -1;
      report(kBarrier, "deadlock: " + deadlock_summary());
      break;  // the remaining fibers are abandoned (their stacks are reinitialised next block)
    }
  }
  g_cur = -1;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Public API (cuda_emu.h)
// ------------------------------------------------------------------------------------------------
void syncthreads() {
  ++g_stats.barriers;
  Fiber& f = g_fibers[g_cur];
  if (++g_bar_arrived == g_nthreads) {  // last one in: open the barrier
    g_bar_arrived = 0;
    g_bar_result = g_bar_count;
    g_bar_count = 0;
    ++g_phase;
    for (int t = 0; t < g_nthreads; ++t)
      if (g_fibers[t].state == kWaitBarrier) g_fibers[t].state = kRunnable;
    return;
  }
  f.state = kWaitBarrier;
  yield_to_scheduler();
}

int syncthreads_count(int pred) {
  g_bar_count += pred != 0;
  syncthreads();
  return g_bar_result;
}

void syncwarp(unsigned mask) { collective(Coll::kSyncwarp, mask, 0, ShflMode::kIdx, 0, 32, "__syncwarp"); }

uint64_t shfl(unsigned mask, uint64_t bits, ShflMode mode, int arg, int width, const char* what) {
  return collective(Coll::kShfl, mask, bits, mode, arg, width, what);
}

unsigned ballot(unsigned mask, int pred, const char* what) {
  return static_cast<unsigned>(collective(Coll::kBallot, mask, pred != 0, ShflMode::kIdx, 0, 32, what));
}

void warp_converge(const char* what) {
  collective(Coll::kConverge, lanes_of_warp(g_cur / 32), 0, ShflMode::kIdx, 0, 32, what);
}

unsigned active_lanes_mask() { return lanes_of_warp(g_cur / 32); }

void report_api_misuse(const char* what) { report(kApiMisuse, what); }

void report_misaligned_vector(const void* p, size_t align) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!g_smem.contains(a) && !g_dev.contains(a)) return;  // a host-side copy
  report_lazy(kMisaligned, [&] {
    return std::to_string(align) + "-byte vector access at an address that is not " + std::to_string(align) +
           "-byte aligned: " + (g_smem.contains(a) ? describe_shared(a, align) : describe_device(a, align));
  });
}

void check_atomic(void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % bytes) report(kMisaligned, "atomic on an address that is not naturally aligned");
  if (g_smem.contains(a)) {
    const bool ok = (a >= g_dyn_base && a + bytes <= g_dyn_base + g_dyn_bytes) ||
                    (a >= g_static_base && a + bytes <= g_static_base + g_static_used);
    if (!ok) report(kSharedOOB, "atomic on " + describe_shared(a, bytes));
  } else if (g_dev.contains(a)) {
    for (size_t g = g_dev.granule(a), e = g_dev.granule(a + bytes - 1); g <= e; ++g) {
      if (!(g_dev.flags[g] & kAllocated)) {
        report(kGlobalOOB, "atomic on " + describe_device(a, bytes));
        return;
      }
      if (!(g_dev.flags[g] & kInitialised)) {
        report(kUninitGlobal, "atomic on " + describe_device(a, bytes) + " never written");
        return;
      }
    }
  }
}

void* dynamic_shared() {
  init_memory();
  return reinterpret_cast<void*>(g_dyn_base);
}

void* static_shared(size_t bytes, size_t align, const char* key) {
  init_memory();
  auto it = g_static_offsets.find(key);
  if (it == g_static_offsets.end()) {
    size_t off = (g_static_used + align - 1) / align * align;
    if (off + bytes > kSmemStatic) {
      report(kSharedOOB, "static __shared__ declarations exceed the emulator's 64 KB static region");
      off = 0;
    }
    it = g_static_offsets.emplace(key, off).first;
    g_static_used = std::max(g_static_used, off + bytes);
    if (g_static_used + g_dyn_bytes > g_smem_limit)
      report(kLaunchError, "static (" + std::to_string(g_static_used) + ") + dynamic (" +
                               std::to_string(g_dyn_bytes) + ") shared memory exceed the kernel's limit of " +
                               std::to_string(g_smem_limit) + " bytes");
  }
  return reinterpret_cast<void*>(g_static_base + it->second);
}

void run_grid(const char* name, const char* signature, const void* kernel, const LaunchConfig& cfg,
              void (*thread_body)(void*), void* ctx) {
  init_memory();
  const dim3 g = cfg.grid, b = cfg.block;
  const std::string kname = std::string(name) + " [" + demangle(signature) + "]";
  const uint64_t nthreads = uint64_t{b.x} * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535 ||
      nthreads == 0 || nthreads > kMaxThreads || b.z > 64) {
    launch_error(cudaErrorInvalidConfiguration,
                 "launch of " + kname + " with grid (" + std::to_string(g.x) + "," + std::to_string(g.y) +
                     "," + std::to_string(g.z) + ") and block (" + std::to_string(b.x) + "," +
                     std::to_string(b.y) + "," + std::to_string(b.z) + ")");
    return;
  }
  const auto it = g_max_dyn_smem.find(kernel);
  const size_t limit = it != g_max_dyn_smem.end() ? static_cast<size_t>(it->second)
                                                  : static_cast<size_t>(kDefaultSmem);
  if (cfg.smem > limit) {
    launch_error(cudaErrorInvalidValue,
                 "launch of " + kname + " with " + std::to_string(cfg.smem) +
                     " bytes of dynamic shared memory; its cudaFuncAttributeMaxDynamicSharedMemorySize is " +
                     std::to_string(limit));
    return;
  }
  ++g_stats.launches;
  g_kernel_name = kname;
  g_nthreads = static_cast<int>(nthreads);
  g_blockDim = b;
  g_gridDim = g;
  g_dyn_bytes = cfg.smem;
  g_smem_limit = limit;
  g_static_used = 0;
  g_static_offsets.clear();
  ensure_fibers(g_nthreads);
  g_warps.assign((g_nthreads + 31) / 32, WarpColl{});
  g_warp_syncs.assign(g_warps.size(), 0);
  g_body = thread_body;
  g_body_ctx = ctx;
  g_launch_first_phase = g_phase + 1;
  g_launch_blocks.clear();
  g_in_kernel = true;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        g_blockIdx = uint3{x, y, z};
        run_block();
      }
  g_in_kernel = false;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > opts().device.optin_smem) {
      launch_error(cudaErrorInvalidValue,
                   "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(value) +
                       "): the emulated " + opts().device.name + " allows at most " +
                       std::to_string(opts().device.optin_smem));
      return cudaErrorInvalidValue;
    }
    g_max_dyn_smem[kernel] = value;
  }
  return cudaSuccess;
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t peek_last_error() { return g_last_error; }

cudaError_t device_attribute(int* value, cudaDeviceAttr attr) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreads; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kDefaultSmem; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = opts().device.name[3] - '0'; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = opts().device.name[4] - '0'; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = opts().device.optin_smem; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

void* device_malloc(size_t bytes, const char* name, size_t misalign) {
  init_memory();
  const size_t gap = std::max<size_t>(64 * 1024, (bytes + 4095) / 4096 * 4096);
  const uintptr_t base = (g_dev_next + 255) / 256 * 256 + misalign;  // cudaMalloc's alignment
  if (base + bytes + gap > g_dev.hi) return nullptr;
  g_dev_next = base + bytes + gap;
  g_allocs.push_back(Allocation{base, bytes, name, true});
  std::memset(g_dev.flags + g_dev.granule(base), kAllocated, (bytes + kGranule - 1) / kGranule);
  std::memset(reinterpret_cast<void*>(base), 0xff, bytes);
  return reinterpret_cast<void*>(base);
}

void device_free(void* p) {
  for (Allocation& a : g_allocs)
    if (a.base == reinterpret_cast<uintptr_t>(p) && a.live) {
      a.live = false;
      std::memset(g_dev.flags + g_dev.granule(a.base), 0, (a.bytes + kGranule - 1) / kGranule);
    }
}

void copy_to_device(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  const uintptr_t a = reinterpret_cast<uintptr_t>(dst);
  for (size_t g = g_dev.granule(a), e = g_dev.granule(a + bytes - 1); bytes && g <= e; ++g) {
    g_dev.flags[g] |= kInitialised;
    g_dev.shadow[g] = Shadow{};
  }
}

void copy_from_device(void* dst, const void* src, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  size_t unwritten = 0;
  for (size_t g = g_dev.granule(a), e = g_dev.granule(a + bytes - 1); bytes && g <= e; ++g)
    unwritten += !(g_dev.flags[g] & kInitialised);
  if (unwritten)
    report(kUnwrittenOutput, describe_device(a, bytes) + ": " + std::to_string(unwritten * kGranule) +
                                 " bytes were never written by any kernel");
  std::memcpy(dst, src, bytes);
}

void poison_device(void* p, size_t bytes) {
  std::memset(p, 0xff, bytes);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (size_t g = g_dev.granule(a), e = g_dev.granule(a + bytes - 1); bytes && g <= e; ++g) {
    g_dev.flags[g] &= static_cast<uint8_t>(~kInitialised);
    g_dev.shadow[g] = Shadow{};
  }
}

// The harness driver's view of the outcome.
uint64_t error_count() {
  uint64_t n = 0;
  for (uint64_t c : g_counts) n += c;
  return n;
}

std::string summary() {
  std::string s;
  char b[256];
  std::snprintf(b, sizeof b,
                "device %s (%d bytes opt-in shared memory), fiber order %s\n"
                "launches %" PRIu64 ", blocks %" PRIu64 ", threads %" PRIu64 ", barriers %" PRIu64
                ", warp collectives %" PRIu64 ", checked accesses %" PRIu64 "\n",
                opts().device.name, opts().device.optin_smem, opts().reverse ? "reverse" : "forward",
                g_stats.launches, g_stats.blocks, g_stats.threads, g_stats.barriers,
                g_stats.collectives, g_stats.accesses);
  s += b;
  for (int k = 0; k < kNumKinds; ++k)
    if (g_counts[k]) s += std::string("errors ") + kKindNames[k] + ": " + std::to_string(g_counts[k]) + "\n";
  for (const std::string& m : g_messages) s += m + "\n";
  if (error_count() > g_messages.size())
    s += "(" + std::to_string(error_count() - g_messages.size()) + " more not shown)\n";
  return s;
}

// A crash inside a kernel (an access outside every mapped region) still names the kernel.
void install_crash_handler() {
  static char altstack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_flags = SA_ONSTACK | SA_RESETHAND;
  sa.sa_handler = [](int sig) {
    const std::string w = where();
    const std::string msg = "cuda_emu: signal " + std::to_string(sig) + " in " + w +
                            " (an access outside every mapped region, or a fiber stack overflow)\n";
    ssize_t r = write(2, msg.data(), msg.size());
    (void)r;
    _exit(4);
  };
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace cuda_emu

// ------------------------------------------------------------------------------------------------
// GCC -fsanitize=thread hooks, without the ThreadSanitizer runtime
// ------------------------------------------------------------------------------------------------
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define CUDA_EMU_HOOKS(N)                                                                      \
  void __tsan_read##N(void* p) { cuda_emu::on_access(p, N, false, true); }                     \
  void __tsan_write##N(void* p) { cuda_emu::on_access(p, N, true, true); }                     \
  void __tsan_unaligned_read##N(void* p) { cuda_emu::on_access(p, N, false, false); }          \
  void __tsan_unaligned_write##N(void* p) { cuda_emu::on_access(p, N, true, false); }          \
  void __tsan_volatile_read##N(void* p) { cuda_emu::on_access(p, N, false, true); }            \
  void __tsan_volatile_write##N(void* p) { cuda_emu::on_access(p, N, true, true); }            \
  void __tsan_unaligned_volatile_read##N(void* p) { cuda_emu::on_access(p, N, false, false); } \
  void __tsan_unaligned_volatile_write##N(void* p) { cuda_emu::on_access(p, N, true, false); }
CUDA_EMU_HOOKS(1)
CUDA_EMU_HOOKS(2)
CUDA_EMU_HOOKS(4)
CUDA_EMU_HOOKS(8)
CUDA_EMU_HOOKS(16)
#undef CUDA_EMU_HOOKS
void __tsan_read_range(void* p, unsigned long n) {
  if (n) cuda_emu::on_access(p, n, false, false);
}
void __tsan_write_range(void* p, unsigned long n) {
  if (n) cuda_emu::on_access(p, n, true, false);
}
}
