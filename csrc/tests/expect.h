// Minimal check macro shared by the C++ kernel tests (no test framework is
// available offline): EXPECT(cond, printf-args) counts the check, prints
// file:line and the message on failure, and keeps going; report() prints the
// summary and gives main's exit code.
#pragma once

#include <cstdio>

namespace nbl_test {

inline int failures = 0;
inline int checks = 0;

inline int report(const char* name) {
  if (failures) {
    std::printf("%s: %d of %d check(s) failed\n", name, failures, checks);
    return 1;
  }
  std::printf("%s: all %d checks passed\n", name, checks);
  return 0;
}

}  // namespace nbl_test

#define EXPECT(cond, ...)                              \
  do {                                                 \
    ++nbl_test::checks;                                \
    if (!(cond)) {                                     \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
      ++nbl_test::failures;                            \
    }                                                  \
  } while (0)
