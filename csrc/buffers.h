// Byte-level helpers shared by the CPU kernels that read packed streams and write large outputs.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "isa.h"
#include "stable.h"

namespace sgsc {

// Eight bytes as a little-endian word, whatever the host's byte order.
SGSC_ALWAYS_INLINE uint64_t load_le64(const uint8_t* p) {
  uint64_t x;
  std::memcpy(&x, p, sizeof(x));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  x = __builtin_bswap64(x);
#endif
  return x;
}

// A fresh output tensor whose large pages are backed by transparent huge pages where the kernel
// allows it on request (the usual `madvise` setting). First touches of a fresh 4 KiB-page buffer can
// cost more than the work that fills it (on the 2-core VM of bench/RESULTS.md: 3x an unpack's time,
// and two thirds of a 64 MB fake-quantize forward+backward); NumPy advises its large arrays the same
// way. Only the 2 MiB-aligned interior is advised.
inline Tensor empty_output(IntArrayRef shape, ScalarType dtype, const Tensor& like) {
  Tensor out = empty(shape, dtype, like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const auto data = reinterpret_cast<uintptr_t>(out.mutable_data_ptr());
  const uintptr_t nbytes = static_cast<uintptr_t>(out.numel()) * out.element_size();
  const uintptr_t begin = (data + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (data + nbytes) & ~(kHugePage - 1);
  if (nbytes >= 4 * kHugePage && end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only: failure is harmless
  }
#endif
  return out;
}

}  // namespace sgsc
