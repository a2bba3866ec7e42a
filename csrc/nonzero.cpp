// CPU kernels of sgsc::nonzero_select and sgsc::nonzero_expand: the sparse groups of the packed
// format (sgsc/export/codec.py), a bitmask of a group's nonzero codes plus those codes in order.
//
// The schemas and the contract live in sgsc/ops/library.py; sgsc.ops.reference holds the NumPy twins. Both ops
// walk rows independently once each row's share of the values is known (a count, then a prefix sum
// over rows), so rows run in parallel and every row writes only its own output.
//
// Masks are little endian: bit i of a row is bit i % 8 of its byte i / 8, so eight bytes loaded as a
// little-endian word hold bits i..i+63 in order, and each set bit is found with count-trailing-zeros.
// A row costs one step per set bit plus one per 64 positions, instead of a compare per position.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "buffers.h"
#include "stable.h"

namespace sgsc {
namespace {

// Rows per parallel task: enough positions that waking the pool pays for itself.
int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, row_len)); }

// ---- nonzero_select -------------------------------------------------------------------------

int64_t count_nonzero(const int32_t* row, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += row[i] != 0;  // vectorises: no branch
  return count;
}

Tensor nonzero_select_cpu(const Tensor& codes, const Tensor& rows) {
  SGSC_CHECK_TYPE(codes.scalar_type() == kInt, "sgsc.nonzero_select: codes must be int32, got ",
                  codes.scalar_type());
  SGSC_CHECK_VALUE(codes.dim() == 2, "sgsc.nonzero_select: codes must be 2-D (groups, codes per group), got shape ",
                   codes.sizes());
  SGSC_CHECK_TYPE(rows.scalar_type() == kLong, "sgsc.nonzero_select: rows must be int64, got ",
                  rows.scalar_type());
  SGSC_CHECK_VALUE(rows.dim() == 1, "sgsc.nonzero_select: rows must be 1-D, got shape ", rows.sizes());
  const auto source = as_contiguous(codes);
  const auto picked = as_contiguous(rows);
  const int64_t groups = source.size(0), row_len = source.size(1), n_rows = picked.numel();
  const int64_t* row_ids = picked.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n_rows; ++r) {
    SGSC_CHECK_INDEX(row_ids[r] >= 0 && row_ids[r] < groups, "sgsc.nonzero_select: rows[", r, "] = ", row_ids[r],
                     " is not a row of codes (", groups, " rows)");
  }
  const int32_t* src = source.const_data_ptr<int32_t>();
  std::vector<int64_t> start(n_rows + 1, 0);
  parallel_for(0, n_rows, row_grain(row_len), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) start[r + 1] = count_nonzero(src + row_ids[r] * row_len, row_len);
  });
  for (int64_t r = 0; r < n_rows; ++r) start[r + 1] += start[r];
  auto values = empty_output({start[n_rows]}, kInt, source);
  int32_t* dst = values.mutable_data_ptr<int32_t>();
  parallel_for(0, n_rows, row_grain(row_len), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int32_t* row = src + row_ids[r] * row_len;
      int32_t* kept = dst + start[r];
      const int64_t count = start[r + 1] - start[r];
      // Without a branch on the code: a zero is written where the next nonzero code goes and is
      // overwritten by it; the walk stops once the row's share is full, so nothing lands past it.
      for (int64_t i = 0, k = 0; i < row_len && k < count; ++i) {
        kept[k] = row[i];
        k += row[i] != 0;
      }
    }
  });
  return values;
}

// ---- nonzero_expand -------------------------------------------------------------------------

int64_t mask_bytes(int64_t group_len) { return (group_len + 7) / 8; }

int64_t popcount_row(const uint8_t* mask, int64_t n_bytes) {
  int64_t count = 0, i = 0;
  for (; i + 8 <= n_bytes; i += 8) count += __builtin_popcountll(load_le64(mask + i));
  for (; i < n_bytes; ++i) count += __builtin_popcount(mask[i]);
  return count;
}

// Writes the row's codes: the values in order at the mask's set bits, zero elsewhere.
void expand_row(const uint8_t* mask, const int32_t* values, int32_t* out, int64_t group_len) {
  std::memset(out, 0, group_len * sizeof(int32_t));
  const int64_t n_bytes = mask_bytes(group_len);
  int64_t base = 0, i = 0;
  for (; i + 8 <= n_bytes; i += 8, base += 64) {
    for (uint64_t word = load_le64(mask + i); word != 0; word &= word - 1) {
      out[base + __builtin_ctzll(word)] = *values++;
    }
  }
  for (; i < n_bytes; ++i, base += 8) {
    for (unsigned byte = mask[i]; byte != 0; byte &= byte - 1) out[base + __builtin_ctz(byte)] = *values++;
  }
}

Tensor nonzero_expand_cpu(const Tensor& masks, const Tensor& values, int64_t group_len) {
  SGSC_CHECK_TYPE(masks.scalar_type() == kByte, "sgsc.nonzero_expand: masks must be uint8, got ",
                  masks.scalar_type());
  SGSC_CHECK_TYPE(values.scalar_type() == kInt, "sgsc.nonzero_expand: values must be int32, got ",
                  values.scalar_type());
  SGSC_CHECK_VALUE(group_len >= 0, "sgsc.nonzero_expand: group_len must be >= 0, got ", group_len);
  SGSC_CHECK_VALUE(masks.dim() == 2 && masks.size(1) == mask_bytes(group_len),
                   "sgsc.nonzero_expand: masks must be 2-D with ceil(group_len / 8) = ", mask_bytes(group_len),
                   " bytes per row, got shape ", masks.sizes());
  SGSC_CHECK_VALUE(values.dim() == 1, "sgsc.nonzero_expand: values must be 1-D, got shape ", values.sizes());
  const auto mask_rows = as_contiguous(masks);
  const auto ordered = as_contiguous(values);
  const int64_t n_rows = mask_rows.size(0), n_bytes = mask_rows.size(1);
  const uint8_t* mask = mask_rows.const_data_ptr<uint8_t>();
  const unsigned padding = group_len % 8 == 0 ? 0u : (0xFFu << (group_len % 8)) & 0xFFu;
  std::vector<int64_t> start(n_rows + 1, 0);
  for (int64_t r = 0; r < n_rows; ++r) {
    // Bits past the last code would place values outside the row.
    SGSC_CHECK_VALUE(n_bytes == 0 || (mask[r * n_bytes + n_bytes - 1] & padding) == 0,
                     "sgsc.nonzero_expand: row ", r, " of masks has bits set past its ", group_len, " codes");
  }
  parallel_for(0, n_rows, row_grain(group_len), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) start[r + 1] = popcount_row(mask + r * n_bytes, n_bytes);
  });
  for (int64_t r = 0; r < n_rows; ++r) start[r + 1] += start[r];
  SGSC_CHECK_VALUE(ordered.numel() == start[n_rows], "sgsc.nonzero_expand: masks have ", start[n_rows],
                   " bits set, values has ", ordered.numel(), " codes");
  auto out = empty_output({n_rows, group_len}, kInt, ordered);
  const int32_t* src = ordered.const_data_ptr<int32_t>();
  int32_t* dst = out.mutable_data_ptr<int32_t>();
  parallel_for(0, n_rows, row_grain(group_len), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) expand_row(mask + r * n_bytes, src + start[r], dst + r * group_len, group_len);
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sgsc, CPU, m) {
  m.impl("nonzero_select", TORCH_BOX(&nonzero_select_cpu));
  m.impl("nonzero_expand", TORCH_BOX(&nonzero_expand_cpu));
}

}  // namespace sgsc
