// Instruction-set dispatch for the CPU kernels.
//
// Hot loops are compiled once per instruction set (SGSC_CLONES below) and a call takes the clone of
// active_isa(): the best this CPU supports, lowered by the environment variable SGSC_CPU_ISA
// (avx512 | avx2 | sse41 | scalar, read once, at the first call), so one host can run and test the
// paths of a smaller CPU. One wheel is thus fast on AVX-512, AVX2 and SSE4.1 machines without
// -march=native. The scalar clone is the x86-64 baseline with the auto-vectoriser off.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SGSC_NO_MULTIVERSION)
#define SGSC_X86_DISPATCH 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SGSC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SGSC_ALWAYS_INLINE inline
#endif

namespace sgsc {

// Ordered: a CPU that runs one level runs every level below it. kAvx2 means AVX2 with FMA, which
// every AVX2 CPU we know of has and the packed kernels' AVX2 paths use.
enum class Isa : int { kScalar = 0, kSse41 = 1, kAvx2 = 2, kAvx512 = 3 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kSse41: return "sse41";
    default: return "scalar";
  }
}

// The best level this CPU supports.
inline Isa detected_isa() {
#ifdef SGSC_X86_DISPATCH
  static const Isa detected = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    if (__builtin_cpu_supports("sse4.1")) return Isa::kSse41;
    return Isa::kScalar;
  }();
  return detected;
#else
  return Isa::kScalar;
#endif
}

// The level SGSC_CPU_ISA asks for (the detected one when unset). sgsc.ops.native refuses an unknown
// value before this library loads; here it reads as unset.
inline Isa requested_isa() {
  const char* asked = std::getenv("SGSC_CPU_ISA");
  if (asked == nullptr || *asked == '\0') return detected_isa();
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kSse41, Isa::kScalar}) {
    if (std::strcmp(asked, isa_name(isa)) == 0) return isa;
  }
  return detected_isa();
}

// The level every kernel runs at: the request, capped at what the CPU has. Fixed at the first call.
inline Isa active_isa() {
  static const Isa active = [] {
    const Isa asked = requested_isa(), cpu = detected_isa();
    return static_cast<int>(asked) < static_cast<int>(cpu) ? asked : cpu;
  }();
  return active;
}

inline bool isa_at_least(Isa level) { return static_cast<int>(active_isa()) >= static_cast<int>(level); }

}  // namespace sgsc

// SGSC_CLONES(ret, name, (params...), (args...)) defines `ret name(params...)`, which calls
// `name_body(args...)` (an SGSC_ALWAYS_INLINE function the caller writes first) compiled for the
// active instruction set. The body is inlined into one function per level, so the compiler
// vectorises each copy for its own target; every copy computes the same values (no FMA
// contraction in these loops: the AVX2 target omits "fma" on purpose, as target_clones("avx2") did).
#ifdef SGSC_X86_DISPATCH
#define SGSC_CLONES(ret, name, params, args)                                                                      \
  __attribute__((target("avx512f"))) ret name##_avx512 params { return name##_body args; }                     \
  __attribute__((target("avx2"))) ret name##_avx2 params { return name##_body args; }                          \
  __attribute__((target("sse4.1"))) ret name##_sse41 params { return name##_body args; }                       \
  __attribute__((optimize("no-tree-vectorize", "no-tree-slp-vectorize"))) ret name##_scalar params {                \
    return name##_body args;                                                                                    \
  }                                                                                                             \
  ret name params {                                                                                             \
    switch (::sgsc::active_isa()) {                                                                             \
      case ::sgsc::Isa::kAvx512: return name##_avx512 args;                                                     \
      case ::sgsc::Isa::kAvx2: return name##_avx2 args;                                                         \
      case ::sgsc::Isa::kSse41: return name##_sse41 args;                                                       \
      default: return name##_scalar args;                                                                       \
    }                                                                                                           \
  }
#else
#define SGSC_CLONES(ret, name, params, args) \
  ret name params { return name##_body args; }
#endif
