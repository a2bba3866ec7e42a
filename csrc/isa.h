// Instruction-set dispatch for the CPU kernels.
//
// Hot loops are compiled several times (GCC/Clang function multiversioning) and the loader picks
// the best clone for the running CPU, so one wheel is fast on AVX-512, AVX2 and SSE4.1 machines
// without -march=native. selected_isa() reports the same choice for `sgsc doctor`.
#pragma once

#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SGSC_NO_MULTIVERSION)
#define SGSC_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "sse4.1", "default")))
#else
#define SGSC_MULTIVERSION
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SGSC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SGSC_ALWAYS_INLINE inline
#endif

namespace sgsc {

inline std::string selected_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SGSC_NO_MULTIVERSION)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  if (__builtin_cpu_supports("sse4.1")) return "sse4.1";
  return "x86-64 baseline";
#else
  return "portable (no multiversioning on this platform)";
#endif
}

}  // namespace sgsc
