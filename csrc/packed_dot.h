// The float inner loops of the packed runtime (moved unchanged from csrc/packed_linear.cpp, where they
// were first written): segment_dot, a segment's codes times its pre-scaled x for one tile's 8 rows, and
// prescale_rows, which writes that pre-scaled x. Shared by the fused float kernel (csrc/packed_linear.cpp)
// and the int8-activation kernel (csrc/packed_linear_q8.cpp), which runs segments whose codes are not
// byte-aligned through the float loop. Every function is inlined into each ISA's entry point.
#pragma once

#include "packed_layout.h"

namespace sgsc {
namespace packed {

// Slot J of 8 words as floats: u * 2^(J*SLOT) in place (x carries 2^(-J*SLOT)), the top slot shifted down.
template <int PER, int J>
SGSC_ALWAYS_INLINE f8 slot_in_place(u8v v) {
  if constexpr (PER == 1) {
    return __builtin_convertvector((i8v)v, f8);  // a raw signed code
  } else if constexpr (J == PER - 1) {
    return __builtin_convertvector((i8v)(v >> (J * (32 / PER))), f8);
  } else {
    constexpr uint32_t mask = ((uint32_t{1} << (32 / PER)) - 1) << (J * (32 / PER));
    return __builtin_convertvector((i8v)(v & mask), f8);
  }
}

// Slots J.. of one word times their x, into accumulator set J % A (unrolled: every shift and mask
// is a constant).
template <int PER, int MB, int A, int J>
SGSC_ALWAYS_INLINE void multiply_slots(u8v v, const float* x, f8 (&part)[A][MB]) {
  if constexpr (J < PER) {
    const f8 code = slot_in_place<PER, J>(v);
    for (int m = 0; m < MB; ++m) part[J % A][m] += code * x[J * MB + m];
    multiply_slots<PER, MB, A, J + 1>(v, x, part);
  }
}

// acc[m] += sum over the segment's codes of u * xs, for one tile's 8 rows. xs is the segment's
// pre-scaled x, batch-row-minor: xs[(t * PER + j) * MB + m]. A accumulator sets hide the FMA
// latency when MB alone gives too few independent chains.
template <int PER, int MB>
SGSC_ALWAYS_INLINE void segment_dot(const uint32_t* words, int64_t n_words, const float* xs, f8* acc) {
  constexpr int A = MB >= 4 ? 1 : 4 / MB;
  f8 part[A][MB];
  for (int a = 0; a < A; ++a)
    for (int m = 0; m < MB; ++m) part[a][m] = f8{};
  for (int64_t t = 0; t < n_words; ++t) {
    multiply_slots<PER, MB, A, 0>(load8(words + kLanes * t), xs + t * PER * MB, part);
  }
  for (int m = 0; m < MB; ++m) {
    f8 sum = part[0][m];
    for (int a = 1; a < A; ++a) sum += part[a][m];
    acc[m] += sum;
  }
}

// Segment s's pre-scaled x of MB batch rows (x0: the first, rows ld floats apart), batch-row-minor:
// dst[i * MB + m] = x[m][k0 + i] * factor[i % PER], zeros past the segment's end (where the words hold
// zero codes too). Writing MB floats at a time keeps the stores sequential.
template <int MB>
void prescale_rows(const Plan& p, int64_t s, const float* x0, int64_t ld, float* dst) {
  const int per = codes_per_word(p.width(s));
  const int64_t len = p.len(s), full_words = len / per, n = p.xs_offset[s + 1] - p.xs_offset[s];
  const float* factor = p.slot_factor.data() + 32 * s;
  x0 += p.k0(s);
  for (int64_t w = 0; w < full_words; ++w)
    for (int j = 0; j < per; ++j) {
      const int64_t i = w * per + j;
      for (int m = 0; m < MB; ++m) dst[i * MB + m] = x0[m * ld + i] * factor[j];
    }
  for (int64_t i = full_words * per; i < n; ++i)
    for (int m = 0; m < MB; ++m) dst[i * MB + m] = i < len ? x0[m * ld + i] * factor[i % per] : 0.0f;
}

}  // namespace packed
}  // namespace sgsc
