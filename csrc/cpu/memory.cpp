// Transparent huge pages for large fresh outputs (see memory.h).
#include "cpu/memory.h"

#include <sys/mman.h>

#include "common.h"

namespace ringfuse::cpu {

int64_t advise_hugepages(std::uintptr_t ptr, int64_t nbytes) {
  RINGFUSE_CHECK(nbytes >= 0, "advise_hugepages: nbytes must be >= 0");
#ifdef MADV_HUGEPAGE
  constexpr std::uintptr_t kHuge = std::uintptr_t(2) << 20;
  const std::uintptr_t begin = (ptr + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (ptr + std::uintptr_t(nbytes)) & ~(kHuge - 1);
  if (ptr == 0 || end <= begin) return 0;
  // Advice only: failure (THP disabled, not a private mapping) leaves plain pages.
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) != 0) return 0;
  return int64_t(end - begin);
#else
  (void)ptr;
  return 0;
#endif
}

}  // namespace ringfuse::cpu
