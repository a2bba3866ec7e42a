// The stream layout of sgsc::pack (each group's codes at its own width, byte-aligned groups), shared by
// csrc/bitpack.cpp (pack, unpack, unpack_dequantize) and csrc/unpack_linear.cpp (the product computed
// from the stream). The layout with a worked example is in sgsc.ops.pack's docstring.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "stable.h"

namespace sgsc {

// Codes per parallel task of one group: a multiple of 8, and 8 codes of any width fill whole bytes, so every
// task starts on a byte boundary and owns its bytes.
constexpr int64_t kChunk = 1 << 14;
static_assert(kChunk % 8 == 0, "tasks must start on a byte boundary");

// ---- layout: widths and byte offsets of every group ----------------------------------------

struct Layout {
  int64_t groups = 0;
  int64_t group_len = 0;          // L, codes per group
  int64_t chunks_per_group = 0;   // tasks per group
  std::vector<int> width;         // (G,) validated to [0, 32]
  std::vector<int64_t> offset;    // (G + 1,) byte offset of each group's stream; offset[G] = total

  int64_t tasks() const { return groups * chunks_per_group; }
  int64_t group(int64_t task) const { return task / chunks_per_group; }
  int64_t first_code(int64_t task) const { return (task % chunks_per_group) * kChunk; }
  int64_t codes(int64_t task) const { return std::min(kChunk, group_len - first_code(task)); }
  // Byte where a task's codes start: exact, since first_code is a multiple of 8.
  int64_t first_byte(int64_t task) const {
    return offset[group(task)] + first_code(task) * width[group(task)] / 8;
  }
  int64_t grain() const {
    // Keep tiny inputs on one thread, where waking the pool costs more than the work.
    return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, std::min(group_len, kChunk)));
  }
};

// The checked layout of unpack_dequantize's arguments: a uint8 stream of groups*rows_per_group rows of
// row_len codes, one width and one float32 scale per group.
Layout unpack_dequantize_layout(const Tensor& packed, const Tensor& widths, const Tensor& scales,
                                int64_t rows_per_group, int64_t row_len);

// n codes of the given width from src (a byte boundary) into dst, sign-extended; no read reaches end.
void unpack_codes(int width, const uint8_t* src, const uint8_t* end, int32_t* dst, int64_t n);

}  // namespace sgsc
