// Integer dot products of the int8-activation kernel (csrc/packed_linear_q8.cpp): one segment's codes
// times the arranged q of x, for one tile's 8 rows, summed per block of kQBlock codes in exact int32 and
// added into fp32 as float(sum) * s_b. Byte-aligned widths (PER = 4, 8, 16, 32 codes per word): phase p of a
// word, (v >> p * SLOT) & byte mask, holds codes i * PER / 4 + p in its 4 bytes. Other widths up to 8 bits
// (PER = 10, 6, 5: 3, 5, 6 bits), on CPUs with AVX-512 VBMI: vpmultishiftqb gathers codes 4p + i of each
// word into the bytes of phase p (bit offsets within each 64-bit pair of rows), masked to the slot.
#pragma once

#include "packed_dot.h"

#ifdef SGSC_X86_DISPATCH
#include <immintrin.h>
// GCC 12's _mm256_multishift_epi64_epi8 passes an unset vector as its unused merge source, which it then
// warns about where the intrinsic is inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace sgsc {
namespace packed {

// Codes per quantization block of x (sgsc.ops.spec.Q8_BLOCK): 480 = lcm(32, 10, 6, 5), so every block holds
// whole words at every width of 8 bits or less; |sum u q| <= 255 * 127 * 480 < 2^24, exact in int32 and float.
constexpr int64_t kQBlock = 480;

// Whether a word's codes fill whole bytes: PER / 4 phases of 4 codes; otherwise ceil(PER / 4) phases.
constexpr bool byte_slots(int per) { return per == 4 || per == 8 || per == 16 || per == 32; }
constexpr int phases(int per) { return byte_slots(per) ? per / 4 : (per + 3) / 4; }

// ---- integer dot products of one segment for one tile's 8 rows: sum over blocks of float(sum u q) * s_b ----

template <int PER>
SGSC_ALWAYS_INLINE f8 q_dot_portable(const uint32_t* w, int64_t n_words, const int32_t* xa, const float* sx) {
  constexpr int P4 = PER / 4, SLOT = 32 / PER, WB = kQBlock / PER;
  constexpr uint32_t mask = (uint32_t{1} << SLOT) - 1;
  f8 acc = f8{};
  for (int64_t w0 = 0, b = 0; w0 < n_words; w0 += WB, ++b) {
    i8v c = i8v{};
    for (int64_t t = w0, w1 = std::min(n_words, w0 + WB); t < w1; ++t) {
      const u8v v = load8(w + kLanes * t);
      for (int p = 0; p < P4; ++p) {
        const int32_t packed = xa[t * P4 + p];
        for (int i = 0; i < 4; ++i) {
          const int32_t q = static_cast<int8_t>(static_cast<uint32_t>(packed) >> (8 * i));
          c += (i8v)((v >> static_cast<uint32_t>(8 * i + p * SLOT)) & mask) * q;
        }
      }
    }
    acc += __builtin_convertvector(c, f8) * sx[b];
  }
  return acc;
}

#ifdef SGSC_X86_DISPATCH
#define SGSC_Q8_AVX2 "avx2,fma"
#define SGSC_Q8_VNNI "avx2,fma,avx512f,avx512vl,avx512vnni"

inline __attribute__((target(SGSC_Q8_AVX2))) f8 as_f8(__m256 v) {
  f8 r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}

// (Called, not inlined: a function using these intrinsics cannot be inlined into the ISA-neutral tile body.
// The sum is added into *out through memory, so no vector crosses the call.)
template <int PER>
__attribute__((target(SGSC_Q8_AVX2), noinline)) void q_dot_avx2(const uint32_t* w, int64_t n_words, const int32_t* xa,
                                                                const float* sx, f8* out) {
  constexpr int P4 = PER / 4, SLOT = 32 / PER, WB = kQBlock / PER;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << SLOT) - 1)), ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t w0 = 0, b = 0; w0 < n_words; w0 += WB, ++b) {
    __m256i c[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t t = w0, w1 = std::min(n_words, w0 + WB); t < w1; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kLanes * t));
      __m256i pairs = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int p = 0; p < P4; ++p) {
        const __m256i bytes = SLOT == 8 ? v : _mm256_and_si256(_mm256_srli_epi32(v, p * SLOT), mask);
        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(bytes, _mm256_set1_epi32(xa[t * P4 + p])));
      }
      c[t & 3] = _mm256_add_epi32(c[t & 3], _mm256_madd_epi16(pairs, ones));
    }
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(sx[b]), acc);
  }
  *out += as_f8(acc);
}

template <int PER>
__attribute__((target(SGSC_Q8_VNNI), noinline)) void q_dot_vnni(const uint32_t* w, int64_t n_words, const int32_t* xa,
                                                                const float* sx, f8* out) {
  constexpr int P4 = PER / 4, SLOT = 32 / PER, WB = kQBlock / PER, U = 8 / P4;  // U words x P4 phases = 8 chains
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << SLOT) - 1));
  __m256 acc = _mm256_setzero_ps();
  for (int64_t w0 = 0, b = 0; w0 < n_words; w0 += WB, ++b) {
    __m256i c[8];
    for (int i = 0; i < 8; ++i) c[i] = _mm256_setzero_si256();
    const int64_t w1 = std::min(n_words, w0 + WB);
    int64_t t = w0;
    for (; t + U <= w1; t += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kLanes * (t + u)));
#pragma GCC unroll 8
        for (int p = 0; p < P4; ++p) {
          const __m256i bytes = SLOT == 8 ? v : _mm256_and_si256(_mm256_srli_epi32(v, p * SLOT), mask);
          c[u * P4 + p] = _mm256_dpbusd_epi32(c[u * P4 + p], bytes, _mm256_set1_epi32(xa[(t + u) * P4 + p]));
        }
      }
    }
    for (; t < w1; ++t) {  // the segment's last words
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kLanes * t));
#pragma GCC unroll 8
      for (int p = 0; p < P4; ++p) {
        const __m256i bytes = SLOT == 8 ? v : _mm256_and_si256(_mm256_srli_epi32(v, p * SLOT), mask);
        c[p] = _mm256_dpbusd_epi32(c[p], bytes, _mm256_set1_epi32(xa[t * P4 + p]));
      }
    }
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3])),
                                         _mm256_add_epi32(_mm256_add_epi32(c[4], c[5]), _mm256_add_epi32(c[6], c[7])));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(sx[b]), acc);
  }
  *out += as_f8(acc);
}

// Eight batch rows at once (rows a_stride / s_stride apart in xa / sx): each word's code bytes are extracted
// once and feed 8 vpdpbusd, one accumulator chain per row; out[r] += row r's sum.
template <int PER>
__attribute__((target(SGSC_Q8_VNNI), noinline)) void q_dot_vnni_rows(const uint32_t* w, int64_t n_words,
                                                                     const int32_t* xa, int64_t a_stride,
                                                                     const float* sx, int64_t s_stride, f8* out) {
  constexpr int P4 = PER / 4, SLOT = 32 / PER, WB = kQBlock / PER;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << SLOT) - 1));
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t w0 = 0, b = 0; w0 < n_words; w0 += WB, ++b) {
    __m256i c[8];
    for (int r = 0; r < 8; ++r) c[r] = _mm256_setzero_si256();
    for (int64_t t = w0, w1 = std::min(n_words, w0 + WB); t < w1; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kLanes * t));
#pragma GCC unroll 8
      for (int p = 0; p < P4; ++p) {
        const __m256i bytes = SLOT == 8 ? v : _mm256_and_si256(_mm256_srli_epi32(v, p * SLOT), mask);
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r)
          c[r] = _mm256_dpbusd_epi32(c[r], bytes, _mm256_set1_epi32(xa[r * a_stride + t * P4 + p]));
      }
    }
    for (int r = 0; r < 8; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[r]), _mm256_set1_ps(sx[r * s_stride + b]), acc[r]);
  }
  for (int r = 0; r < 8; ++r) out[r] += as_f8(acc[r]);
}
#define SGSC_Q8_VBMI "avx2,fma,avx512f,avx512vl,avx512vnni,avx512bw,avx512vbmi"

// Phase P's vpmultishiftqb control: byte i (i < 4) of each 64-bit lane takes the bits of code 4P + i of the
// low row's word, byte 4 + i those of the high row's word (a code past the word's end reads bits that the
// zero q byte multiplies).
template <int PER, int P>
constexpr int64_t multishift_control() {
  uint64_t ctrl = 0;
  for (int half = 0; half < 2; ++half)
    for (int i = 0; i < 4; ++i) {
      const int j = 4 * P + i, offset = j < PER ? 32 * half + (32 / PER) * j : 0;
      ctrl |= static_cast<uint64_t>(offset) << (8 * (4 * half + i));
    }
  return static_cast<int64_t>(ctrl);
}

template <int PER, int P>
__attribute__((target(SGSC_Q8_VBMI), always_inline)) inline __m256i vbmi_phase(__m256i v) {
  const __m256i ctrl = _mm256_set1_epi64x(multishift_control<PER, P>());
  return _mm256_and_si256(_mm256_multishift_epi64_epi8(ctrl, v), _mm256_set1_epi8(static_cast<char>((1 << (32 / PER)) - 1)));
}

// One row (out += its sum) or eight rows (xa / sx of row r at r * a_stride / r * s_stride; out[r]) at once.
template <int PER, int ROWS>
__attribute__((target(SGSC_Q8_VBMI), noinline)) void q_dot_vbmi(const uint32_t* w, int64_t n_words, const int32_t* xa,
                                                                int64_t a_stride, const float* sx, int64_t s_stride,
                                                                f8* out) {
  constexpr int NP = phases(PER), WB = kQBlock / PER, CHAINS = ROWS == 1 ? 2 * NP : 8;
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t w0 = 0, b = 0; w0 < n_words; w0 += WB, ++b) {
    __m256i c[CHAINS];
    for (int i = 0; i < CHAINS; ++i) c[i] = _mm256_setzero_si256();
    for (int64_t t = w0, w1 = std::min(n_words, w0 + WB); t < w1; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kLanes * t));
      __m256i bytes[NP];
      bytes[0] = vbmi_phase<PER, 0>(v);
      if constexpr (NP > 1) bytes[1] = vbmi_phase<PER, 1>(v);
      if constexpr (NP > 2) bytes[2] = vbmi_phase<PER, 2>(v);
#pragma GCC unroll 8
      for (int p = 0; p < NP; ++p) {
        if constexpr (ROWS == 1) {
          const int chain = p + NP * static_cast<int>(t & 1);
          c[chain] = _mm256_dpbusd_epi32(c[chain], bytes[p], _mm256_set1_epi32(xa[t * NP + p]));
        } else {
#pragma GCC unroll 8
          for (int r = 0; r < ROWS; ++r)
            c[r] = _mm256_dpbusd_epi32(c[r], bytes[p], _mm256_set1_epi32(xa[r * a_stride + t * NP + p]));
        }
      }
    }
    if constexpr (ROWS == 1) {
      __m256i sum = c[0];
      for (int i = 1; i < CHAINS; ++i) sum = _mm256_add_epi32(sum, c[i]);
      acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(sx[b]), acc[0]);
    } else {
      for (int r = 0; r < ROWS; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[r]), _mm256_set1_ps(sx[r * s_stride + b]), acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) out[r] += as_f8(acc[r]);
}
#endif

}  // namespace packed
}  // namespace sgsc
