// The packed runtime's in-memory layout on the CPU, shared by csrc/packed_linear.cpp (the fused
// unpack-and-multiply kernel) and csrc/packed_dequantize.cpp: the checked Plan of a layout's tensors,
// the 8-lane vector types, and the work-stealing loop both kernels run their tiles in.
//
// The schemas and the layout's documentation (with a worked example) live in sgsc/ops/packed.py;
// sgsc.ops.reference.packed_dequantize is the twin that reads it in plain PyTorch. In short:
//
// * Rows are cut into tiles of 8. A tile holds one or more segments: a run of columns [k0, k1)
//   stored at one width W. A word of 32 bits holds PER = 32 / W codes (W <= 16; one raw int32 code
//   otherwise) in slots of SLOT = 32 / PER bits, code j of the word in bits [j*SLOT, j*SLOT + W).
//   Word t of the tile's 8 rows are 8 consecutive int32: one 32-byte load feeds all 8 rows.
// * W <= 16 stores u = code + 2^(W-1) (unsigned, so no sign extension in the inner loop); the
//   offset comes back as one subtraction per row: sum_k code*x = sum_k u*x - 2^(W-1) * sum_k x.
//   W > 16 stores the signed code itself (one per word, offset 0).
// * Slot j < PER-1 is converted in place, as u * 2^(j*SLOT) (exact: W significant bits), and x is
//   pre-scaled by 2^(-j*SLOT) once per call, so extracting a code costs one AND; the top slot is
//   brought down by one logical shift (its u may set the sign bit). Scaling x by powers of two is
//   exact unless x * 2^(-j*SLOT) is subnormal (|x| < 2^-98 for SLOT*(PER-1) <= 28).
// * Output-row groups: every row has its own scale (row_scale), applied once per output. Input-
//   column groups: segments are the column groups, their scale (seg_scale) folds into the
//   pre-scaled x, and row_scale is 1.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "isa.h"
#include "stable.h"

// The 32-byte vector types never cross a call boundary between ISAs (every helper is inlined into
// its ISA's entry point), so GCC's note that their by-value ABI differs without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sgsc {
namespace packed {

constexpr int kLanes = 8;            // rows per tile (sgsc.ops.spec.LANES): one 256-bit vector of fp32 accumulators
constexpr int64_t kStealTiles = 4;   // tiles (or prescale rows) a thread takes from the shared counter at a time

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));

// Codes per 32-bit word at width w (sgsc.ops.packed.codes_per_word mirrors it).
inline int codes_per_word(int64_t width) { return width <= 16 ? static_cast<int>(32 / width) : 1; }

// The layout's tensors, checked once per call.
struct Plan {
  int64_t out_features = 0, in_features = 0, segments = 0, tiles = 0;
  const uint32_t* words = nullptr;
  const int64_t* seg = nullptr;  // (S, 3): k0, k1, width
  const float* seg_scale = nullptr;
  const int64_t* tile_seg = nullptr;  // (TS, 2): segment, word offset
  const int64_t* tile_ptr = nullptr;  // (T + 1,)
  const int32_t* rows = nullptr;      // (T, 8): output row of each lane, -1 for padding
  const float* row_scale = nullptr;   // (T, 8)
  std::vector<int64_t> xs_offset;     // (S + 1,): where each segment's pre-scaled x starts, in codes
  // Per segment: slot j's factor on x, seg_scale * 2^(-j * SLOT) (the top slot's 2^0), at [32 * s + j];
  // 2^(W-1) * seg_scale, the offset term's factor on the sum of x; and the first segment over the
  // same columns (output groups: every width spans [0, K), so one sum of x serves them all).
  std::vector<float> slot_factor;
  std::vector<double> offset_factor;
  std::vector<int64_t> same_columns_as;
  bool covers_all_columns = true;     // every tile's segments run end to end over [0, K)
  bool covers_all_rows = false;       // every output row is one tile lane: the kernel writes all of y
  std::vector<uint8_t> row_in_tile;   // (N,): 1 where a tile lane names the row

  int64_t k0(int64_t s) const { return seg[3 * s]; }
  int64_t len(int64_t s) const { return seg[3 * s + 1] - seg[3 * s]; }
  int64_t width(int64_t s) const { return seg[3 * s + 2]; }
  int64_t words_of(int64_t s) const { return (len(s) + codes_per_word(width(s)) - 1) / codes_per_word(width(s)); }
};

void check_tensor(const Tensor& t, ScalarType dtype, int64_t dim, const char* name, const char* op);

// The optional bias of a packed product, checked against its output width: its data, or nullptr.
const float* checked_bias(const std::optional<Tensor>& bias, int64_t out_features, const char* op);

// The layout's tensors, every index checked (a corrupt layout is an error, never a wild read).
Plan make_plan(const Tensor& words, const Tensor& seg_table, const Tensor& seg_scale,
               const Tensor& tile_table, const Tensor& tile_ptr, const Tensor& rows,
               const Tensor& row_scale, int64_t out_features, int64_t in_features, const char* op);

SGSC_ALWAYS_INLINE u8v load8(const uint32_t* p) {
  u8v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#ifdef SGSC_X86_DISPATCH
#define SGSC_PACKED_AVX2 1
#endif

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SGSC_HAS_SHUFFLEVECTOR 1
#endif
#endif

#ifdef SGSC_HAS_SHUFFLEVECTOR
// c[j][r] -> c[r][j]: 8 columns of 8 lanes become 8 rows of 8 columns, so each row is one 32-byte
// store instead of eight scalar ones (the unpack / shuffle / 128-bit-permute transpose).
SGSC_ALWAYS_INLINE void transpose8x8(f8 (&c)[8]) {
  f8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(c[i], c[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(c[i], c[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    c[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    c[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
#endif

// Runs task on one of this library's helper threads, started on first need and kept, at most one per
// core (the stable ABI offers torch's parallel loop, but not the task pool behind at::launch).
void launch(std::function<void()> task);

// Whether the caller already runs inside a parallel region: a helper thread, or one of torch's
// parallel-loop threads past the first. Nested work then stays on the calling thread.
bool in_parallel_region();

// Runs body(first, last) over [0, items) in blocks of kStealTiles, taken from a shared counter by the
// calling thread and by tasks on the helper threads of launch(). The call returns once every block is
// done, never waiting for a helper to start or finish idle: with at::parallel_for, whose end is a
// barrier, a helper that had lost its core to another process held every batch-1 call until the
// scheduler gave it back (8 ms instead of 1.5 ms on the loaded 2-core host). A helper that starts
// late finds the counter past the end and touches nothing but the shared counters it co-owns.
template <typename Body>
void steal_blocks(int64_t items, int64_t work_per_item, const Body& body) {
  // About 64K multiply-adds per thread at least: tiny layers stay on one thread, where a helper costs more.
  const int64_t threads =
      std::min<int64_t>(num_threads(), std::max<int64_t>(1, items * work_per_item / (1 << 16)));
  if (threads <= 1 || in_parallel_region()) return body(0, items);
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  const Body* work = &body;  // dereferenced only by a thread holding a block, i.e. before this call returns
  auto run = [counters, items, work] {
    for (int64_t first = counters->next.fetch_add(kStealTiles); first < items;
         first = counters->next.fetch_add(kStealTiles)) {
      const int64_t last = std::min(items, first + kStealTiles);
      (*work)(first, last);
      counters->done.fetch_add(last - first, std::memory_order_release);
    }
  };
  for (int64_t h = 1; h < threads; ++h) launch(run);
  run();
  while (counters->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace packed
}  // namespace sgsc
