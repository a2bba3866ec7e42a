// make_plan: a packed layout's tensors checked and read into a Plan (csrc/packed_layout.h).

#include "packed_layout.h"

#include <pthread.h>

#include <cmath>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

namespace sgsc {
namespace packed {

void check_tensor(const Tensor& t, ScalarType dtype, int64_t dim, const char* name, const char* op) {
  SGSC_CHECK_TYPE(t.scalar_type() == dtype, "sgsc.", op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  SGSC_CHECK_VALUE(t.dim() == dim, "sgsc.", op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  SGSC_CHECK_VALUE(t.device().is_cpu(), "sgsc.", op, ": ", name, " must be on the CPU, got ", t.device());
  SGSC_CHECK_VALUE(t.is_contiguous(), "sgsc.", op, ": ", name, " must be contiguous");
}

const float* checked_bias(const std::optional<Tensor>& bias, int64_t out_features, const char* op) {
  if (!bias.has_value()) return nullptr;
  check_tensor(*bias, kFloat, 1, "bias", op);
  SGSC_CHECK_VALUE(bias->size(0) == out_features, "sgsc.", op, ": bias must have ", out_features, " elements, got ",
                   bias->size(0));
  return bias->const_data_ptr<float>();
}

namespace {

struct HelperPool {
  std::mutex mutex;
  std::condition_variable wake;
  std::deque<std::function<void()>> tasks;
  int64_t threads = 0, idle = 0;
};

// Never destroyed: helpers may still wait on it while the process exits. A forked child has none of
// its parent's helper threads, so it starts an empty pool of its own.
HelperPool* helper_pool = nullptr;
std::once_flag helper_pool_once;
thread_local bool on_helper_thread = false;

HelperPool& the_helper_pool() {
  std::call_once(helper_pool_once, [] {
    helper_pool = new HelperPool;
    pthread_atfork(nullptr, nullptr, [] { helper_pool = new HelperPool; });
  });
  return *helper_pool;
}

void serve(HelperPool* pool) {
  on_helper_thread = true;
  std::unique_lock<std::mutex> lock(pool->mutex);
  for (;;) {
    ++pool->idle;
    pool->wake.wait(lock, [pool] { return !pool->tasks.empty(); });
    --pool->idle;
    std::function<void()> task = std::move(pool->tasks.front());
    pool->tasks.pop_front();
    lock.unlock();
    task();
    lock.lock();
  }
}

}  // namespace

void launch(std::function<void()> task) {
  HelperPool& pool = the_helper_pool();
  std::unique_lock<std::mutex> lock(pool.mutex);
  pool.tasks.push_back(std::move(task));
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  if (pool.idle > 0 || pool.threads >= cores) {
    pool.wake.notify_one();
    return;
  }
  ++pool.threads;
  lock.unlock();
  std::thread(serve, &pool).detach();
}

bool in_parallel_region() { return on_helper_thread || thread_index() != 0; }

static void set_segment_factors(Plan& p) {
  const int64_t S = p.segments;
  p.slot_factor.assign(32 * S, 0.0f);
  p.offset_factor.assign(S, 0.0);
  p.same_columns_as.assign(S, 0);
  for (int64_t s = 0; s < S; ++s) {
    const int per = codes_per_word(p.width(s)), slot = 32 / per;
    for (int j = 0; j < per; ++j)
      p.slot_factor[32 * s + j] = p.seg_scale[s] * (j == per - 1 ? 1.0f : std::ldexp(1.0f, -j * slot));
    p.offset_factor[s] = per == 1 ? 0.0 : std::ldexp(1.0, static_cast<int>(p.width(s)) - 1) * p.seg_scale[s];
    p.same_columns_as[s] = s > 0 && p.seg[3 * s] == p.seg[3 * (s - 1)] && p.seg[3 * s + 1] == p.seg[3 * (s - 1) + 1]
                               ? p.same_columns_as[s - 1]
                               : s;
  }
}

Plan make_plan(const Tensor& words, const Tensor& seg_table, const Tensor& seg_scale,
               const Tensor& tile_table, const Tensor& tile_ptr, const Tensor& rows,
               const Tensor& row_scale, int64_t out_features, int64_t in_features, const char* op) {
  check_tensor(words, kInt, 1, "words", op);
  check_tensor(seg_table, kLong, 2, "seg_table", op);
  check_tensor(seg_scale, kFloat, 1, "seg_scale", op);
  check_tensor(tile_table, kLong, 2, "tile_table", op);
  check_tensor(tile_ptr, kLong, 1, "tile_ptr", op);
  check_tensor(rows, kInt, 2, "rows", op);
  check_tensor(row_scale, kFloat, 2, "row_scale", op);
  SGSC_CHECK_VALUE(out_features >= 0 && in_features >= 0, "sgsc.", op,
                   ": out_features and in_features must be >= 0, got ", out_features, " and ", in_features);
  const int64_t S = seg_table.size(0), T = rows.size(0), TS = tile_table.size(0);
  SGSC_CHECK_VALUE(seg_table.size(1) == 3 && seg_scale.size(0) == S, "sgsc.", op,
                   ": seg_table must be (S, 3) and seg_scale (S,), got ", seg_table.sizes(), " and ", seg_scale.sizes());
  SGSC_CHECK_VALUE(rows.size(1) == kLanes && row_scale.sizes().equals(rows.sizes()), "sgsc.", op,
                   ": rows and row_scale must be (T, 8), got ", rows.sizes(), " and ", row_scale.sizes());
  SGSC_CHECK_VALUE(tile_table.size(1) == 2 && tile_ptr.size(0) == T + 1, "sgsc.", op,
                   ": tile_table must be (TS, 2) and tile_ptr (T + 1,), got ", tile_table.sizes(), " and ",
                   tile_ptr.sizes());
  Plan p;
  p.out_features = out_features;
  p.in_features = in_features;
  p.segments = S;
  p.tiles = T;
  p.words = reinterpret_cast<const uint32_t*>(words.const_data_ptr<int32_t>());
  p.seg = seg_table.const_data_ptr<int64_t>();
  p.seg_scale = seg_scale.const_data_ptr<float>();
  p.tile_seg = tile_table.const_data_ptr<int64_t>();
  p.tile_ptr = tile_ptr.const_data_ptr<int64_t>();
  p.rows = rows.const_data_ptr<int32_t>();
  p.row_scale = row_scale.const_data_ptr<float>();
  // Every index the kernels follow is checked here, so a corrupt layout is an error, never a wild read.
  p.xs_offset.assign(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    SGSC_CHECK_VALUE(p.width(s) >= 1 && p.width(s) <= 32 && p.k0(s) >= 0 && p.k0(s) <= p.seg[3 * s + 1] &&
                     p.seg[3 * s + 1] <= in_features,
                     "sgsc.", op, ": seg_table row ", s, " = [", p.k0(s), ", ", p.seg[3 * s + 1], ", ", p.width(s),
                     "] is not [k0, k1, width] with 0 <= k0 <= k1 <= ", in_features, " and width in [1, 32]");
    p.xs_offset[s + 1] = p.xs_offset[s] + p.words_of(s) * codes_per_word(p.width(s));
  }
  set_segment_factors(p);
  SGSC_CHECK_VALUE(T == 0 || (p.tile_ptr[0] == 0 && p.tile_ptr[T] == TS), "sgsc.", op,
                   ": tile_ptr must run from 0 to the ", TS, " rows of tile_table");
  std::vector<uint8_t>& seen = p.row_in_tile;
  seen.assign(out_features, 0);
  int64_t covered_rows = 0;
  for (int64_t t = 0; t < T; ++t) {
    SGSC_CHECK_VALUE(p.tile_ptr[t] <= p.tile_ptr[t + 1], "sgsc.", op, ": tile_ptr must be non-decreasing, it falls at tile ", t);
    int64_t next_column = 0;  // the segments cover [0, K) exactly when each starts where the last ended
    for (int64_t i = p.tile_ptr[t]; i < p.tile_ptr[t + 1]; ++i) {
      const int64_t s = p.tile_seg[2 * i], offset = p.tile_seg[2 * i + 1];
      SGSC_CHECK_VALUE(s >= 0 && s < S, "sgsc.", op, ": tile_table row ", i, " names segment ", s, " of ", S);
      SGSC_CHECK_VALUE(offset >= 0 && offset + kLanes * p.words_of(s) <= words.numel(), "sgsc.", op,
                       ": tile_table row ", i, " reads words past the end of words (", words.numel(), ")");
      next_column = p.k0(s) == next_column ? p.seg[3 * s + 1] : -1;
    }
    p.covers_all_columns = p.covers_all_columns && next_column == in_features;
    for (int r = 0; r < kLanes; ++r) {
      const int32_t row = p.rows[kLanes * t + r];
      SGSC_CHECK_VALUE(row >= -1 && row < out_features, "sgsc.", op, ": rows[", t, ", ", r, "] = ", row,
                       " is not an output row (or -1) of ", out_features);
      if (row >= 0) {
        SGSC_CHECK_VALUE(!seen[row], "sgsc.", op, ": output row ", row, " appears in two tile lanes");
        seen[row] = 1;
        ++covered_rows;
      }
    }
  }
  p.covers_all_rows = covered_rows == out_features;
  return p;
}

}  // namespace packed
}  // namespace sgsc
