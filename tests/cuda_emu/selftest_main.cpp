// cuda_emu_selftest SCENARIO | convert IN OUT: runs one scenario of selftest_kernels.cu on the
// emulator. Exit status: 0 clean, 1 a semantic check failed, 3 the emulator reported errors,
// 4 a crash inside a kernel.
#include <cstdio>
#include <string>

#include "cuda_emu.h"

int selftest_run(const std::string& name);
int selftest_convert(const char* in_path, const char* out_path);

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "convert") return selftest_convert(argv[2], argv[3]);
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SCENARIO | convert IN OUT\n", argv[0]);
    return 2;
  }
  cuda_emu::install_crash_handler();
  const int rc = selftest_run(argv[1]);
  std::fputs(cuda_emu::summary().c_str(), stdout);
  if (rc) return rc;
  return cuda_emu::error_count() ? 3 : 0;
}
