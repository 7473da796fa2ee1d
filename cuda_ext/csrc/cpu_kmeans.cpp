// Fisher-weighted 1-D k-means per row (SPEC A.5, H.1): the compiled twin of core/kmeans.py's torch path.
//
// Per row: sort once, prefix sums of (w, w*x, w*x^2) in double, then everything is searches in the
// sorted row. For sorted centroids the clusters are contiguous runs split at the midpoints of
// neighbouring centroids, so the cost of a run against any centre comes from two prefix entries.
// Greedy weighted k-means++ (2 + ln K candidates per step, drawn with probability ~ w*D^2, the one
// lowering the potential most kept: scikit-learn's scheme) then Lloyd to a fixed point, `restarts`
// times; the seeding with the lowest objective wins. Rows are independent and run in parallel;
// each (seed, row, restart) has its own counter-based random stream, so results do not depend on
// the number of threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

struct Sums {  // over a run of sorted values: sum w, sum w*x, sum w*x^2
  double w, wx, wxx;
};

inline Sums operator-(const Sums& a, const Sums& b) { return {a.w - b.w, a.wx - b.wx, a.wxx - b.wxx}; }

// sum w (x - c)^2 of a run from its sums (the same formula as the torch path's _cost)
inline double cost(const Sums& s, double c) { return s.wxx + c * c * s.w - 2 * c * s.wx; }

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniforms in [0, 1) of one (seed, row, restart) stream: a counter hashed, no state shared between rows.
struct Stream {
  uint64_t key, counter = 0;
  Stream(uint64_t seed, uint64_t row, uint64_t restart)
      : key(splitmix64(splitmix64(splitmix64(seed) ^ row) ^ (restart * 0xD1B54A32D192ED03ull))) {}
  double next() { return static_cast<double>(splitmix64(key + counter++) >> 11) * 0x1.0p-53; }
};

// The first i in [lo, hi) with above(i), or hi; `above` must be false then true along [lo, hi).
// Branchless: random targets make a branchy search mispredict about every other step.
template <typename Above>
inline int first_above(int lo, int hi, Above above) {
  int base = lo, len = hi - lo;
  while (len > 1) {
    const int half = len >> 1;
    base = above(base + half - 1) ? base : base + half;
    len -= half;
  }
  return base + (len == 1 && !above(base));
}

// One row sorted ascending (minus a shift, which keeps the sums of x^2 small) with prefix sums.
struct Row {
  int n = 0;
  const double* x = nullptr;  // [n]
  const Sums* p = nullptr;    // [n + 1]: p[i] sums the first i sorted values

  // how many of x are <= t, given that x[..lo) are and x[hi..) are not
  int count_le(double t, int lo, int hi) const {
    return first_above(lo, hi, [&](int i) { return x[i] > t; });
  }

  // how many of x are <= t, searching outwards from `hint` (Lloyd's boundaries move little per step)
  int count_le_near(double t, int hint) const {
    if (hint > 0 && x[hint - 1] > t) {  // the answer is below hint
      int hi = hint - 1;
      for (int step = 1;; step *= 2) {
        const int probe = hi - step;
        if (probe < 0) return count_le(t, 0, hi);
        if (x[probe] <= t) return count_le(t, probe + 1, hi);
        hi = probe;
      }
    }
    int lo = hint;
    for (int step = 1;; step *= 2) {
      const int probe = lo + step - 1;
      if (probe >= n) return count_le(t, lo, n);
      if (x[probe] > t) return count_le(t, lo, probe);
      lo = probe + 1;
    }
  }

  double run_cost(int start, int stop, double c) const { return std::max(0.0, cost(p[stop] - p[start], c)); }
};

constexpr int kMaxK = 256;

// Ascending centres with their runs: centre k owns sorted values [bounds[k], bounds[k+1]).
struct Centres {
  int m = 0;
  double c[kMaxK];
  int bounds[kMaxK + 1];
  double cumulative[kMaxK];  // running sum of the run costs (kept up to date by the seeding)

  double objective(const Row& row) const {
    double total = 0;
    for (int k = 0; k < m; ++k) total += row.run_cost(bounds[k], bounds[k + 1], c[k]);
    return total;
  }

  void update_cumulative(const Row& row) {
    double total = 0;
    for (int k = 0; k < m; ++k) cumulative[k] = total += row.run_cost(bounds[k], bounds[k + 1], c[k]);
  }
};

constexpr int kMaxTrials = 8;  // candidates per seeding step: 2 + ln K <= 7

// first_above for `count` independent searches at once, in lock-step: each one's probes form a
// chain of dependent loads, and interleaving the chains keeps the core busy while they wait.
// base[q]: start of range q, replaced by its result; end[q]: its end (<= n). above(q, i) takes i in [0, n).
template <typename Above>
void first_above_each(int count, int* base, const int* end, int n, Above above) {
  int len[2 * kMaxTrials], longest = 0;
  for (int q = 0; q < count; ++q) longest = std::max(longest, len[q] = end[q] - base[q]);
  while (longest > 1) {
    for (int q = 0; q < count; ++q) {
      const int half = len[q] >> 1;  // 0 once a range is down to one entry: it then stays put
      const bool right = (half > 0) & !above(q, std::max(base[q] + half - 1, 0));
      base[q] += right ? half : 0;
      len[q] -= half;
    }
    longest -= longest >> 1;
  }
  for (int q = 0; q < count; ++q) base[q] += (len[q] == 1) & !above(q, std::min(base[q], n - 1));
}

// `trials` sorted values, each drawn with probability ~ w * D^2: pick the run by its potential,
// then the point inside it by a binary search on the running potential against the run's centre
// (ascending along the row).
void sample_by_potential(const Row& row, const Centres& s, Stream& rng, int trials, double* values) {
  const int m = s.m;
  int pick[kMaxTrials], stop[kMaxTrials];
  double centre[kMaxTrials], threshold[kMaxTrials];
  for (int t = 0; t < trials; ++t) {
    const double target = rng.next() * s.cumulative[m - 1];
    const int run = std::min(m - 1, first_above(0, m, [&](int k) { return s.cumulative[k] > target; }));
    const double before = run > 0 ? s.cumulative[run - 1] : 0.0;
    centre[t] = s.c[run];
    pick[t] = s.bounds[run];
    stop[t] = s.bounds[run + 1];
    threshold[t] = cost(row.p[pick[t]], centre[t]) + (target - before);
  }
  first_above_each(trials, pick, stop, row.n, [&](int t, int i) { return cost(row.p[i + 1], centre[t]) > threshold[t]; });
  for (int t = 0; t < trials; ++t) values[t] = row.x[std::max(0, std::min({pick[t], stop[t] - 1, row.n - 1}))];
}

struct Insertion {
  double delta;
  int slot, lo, hi;
};

// Change of the potential if each of `values` joined the centres; only the span between its
// neighbouring centres changes, and its new run [lo, hi) lies inside their runs.
void try_insert(const Row& row, const Centres& s, const double* values, int trials, Insertion* out) {
  const int m = s.m;
  int base[2 * kMaxTrials], end[2 * kMaxTrials];
  double limit[2 * kMaxTrials], left[kMaxTrials], right[kMaxTrials];
  for (int t = 0; t < trials; ++t) {
    const double v = values[t];
    int slot = 0;
    while (slot < m && s.c[slot] < v) ++slot;
    left[t] = slot > 0 ? s.c[slot - 1] : v;
    right[t] = slot < m ? s.c[slot] : v;
    out[t].slot = slot;
    // lo: how many values are <= (left + v) / 2, within the left centre's run (0 without one)
    base[t] = slot > 0 ? s.bounds[slot - 1] : 0;
    end[t] = s.bounds[slot];
    limit[t] = (left[t] + v) / 2;
    // hi: how many are <= (v + right) / 2, within the right centre's run (n without one)
    base[trials + t] = s.bounds[slot];
    end[trials + t] = slot < m ? s.bounds[slot + 1] : row.n;
    limit[trials + t] = (v + right[t]) / 2;
    if (slot == 0) end[t] = 0;
    if (slot == m) base[trials + t] = row.n;
  }
  first_above_each(2 * trials, base, end, row.n, [&](int q, int i) { return row.x[i] > limit[q]; });
  for (int t = 0; t < trials; ++t) {
    Insertion& at = out[t];
    at.lo = base[t];
    at.hi = base[trials + t];
    const Sums& a = row.p[at.lo];
    const Sums& b = row.p[s.bounds[at.slot]];
    const Sums& e = row.p[at.hi];
    at.delta = cost(e - a, values[t]) - (cost(b - a, left[t]) + cost(e - b, right[t]));
  }
}

void insert(Centres& s, double v, const Insertion& at) {
  for (int k = s.m; k > at.slot; --k) s.c[k] = s.c[k - 1];
  for (int k = s.m + 1; k > at.slot + 1; --k) s.bounds[k] = s.bounds[k - 1];
  s.c[at.slot] = v;
  s.bounds[at.slot] = at.lo;
  s.bounds[at.slot + 1] = at.hi;
  ++s.m;
}

void greedy_kmeanspp(const Row& row, int k, Stream& rng, Centres& s) {
  const double target = rng.next() * row.p[row.n].w;  // first centre: drawn with probability ~ w
  const int first = first_above(0, row.n, [&](int i) { return row.p[i + 1].w > target; });
  s.m = 1;
  s.c[0] = row.x[std::min(first, row.n - 1)];
  s.bounds[0] = 0;
  s.bounds[1] = row.n;
  const int trials = std::min(kMaxTrials, 2 + static_cast<int>(std::log(static_cast<double>(k))));
  double values[kMaxTrials];
  Insertion at[kMaxTrials];
  for (int step = 1; step < k; ++step) {
    s.update_cumulative(row);
    sample_by_potential(row, s, rng, trials, values);
    try_insert(row, s, values, trials, at);
    int best = 0;  // the candidate lowering the potential most; the first of equals
    for (int t = 1; t < trials; ++t) best = at[t].delta < at[best].delta ? t : best;
    insert(s, values[best], at[best]);
  }
}

// Each centre moves to its run's weighted mean (an empty run keeps its centre) until the runs stop
// changing or no centre moves more than tol * span.
void lloyd(const Row& row, Centres& s, int max_iter, double tol) {
  const int k = s.m, n = row.n;
  const double limit = tol * (row.x[n - 1] - row.x[0]);
  double moved[kMaxK];
  int bounds[kMaxK + 1];
  for (int it = 0; it < max_iter; ++it) {
    for (int j = 0; j < k; ++j) {
      const int a = s.bounds[j], b = s.bounds[j + 1];
      const Sums sums = row.p[b] - row.p[a];
      // clamped into the run: after huge weights, a run of tiny ones loses digits in the differences
      moved[j] = sums.w > 0 ? std::min(std::max(sums.wx / sums.w, row.x[a]), row.x[b - 1]) : s.c[j];
    }
    std::sort(moved, moved + k);
    bounds[0] = 0;
    bounds[k] = n;
    bool same_runs = true;
    for (int j = 1; j < k; ++j) {
      bounds[j] = row.count_le_near((moved[j - 1] + moved[j]) / 2, s.bounds[j]);
      same_runs &= bounds[j] == s.bounds[j];
    }
    double shift = 0;
    for (int j = 0; j < k; ++j) shift = std::max(shift, std::abs(moved[j] - s.c[j]));
    std::copy(moved, moved + k, s.c);
    std::copy(bounds, bounds + k + 1, s.bounds);
    if (same_runs || shift <= limit) break;
  }
}

// Order-preserving unsigned key of a float's bits (negatives flipped, positives above them).
inline uint32_t order_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits ^ (static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u);
}

inline float key_value(uint32_t key) {
  const uint32_t bits = key ^ ((key >> 31) ? 0x80000000u : 0xFFFFFFFFu);
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline float bits_float(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline uint32_t float_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits;
}

// Sorts 64-bit entries by their upper 32 bits, stably (entries with one key keep their order).
// Two 11-bit LSD radix passes on key bits 10..31, then an insertion sort on the whole key, which
// only has to swap the rare neighbours equal in those 22 bits; two passes instead of four bytes'
// worth halve the time. Rows where that fix-up grows long fall back to std::stable_sort.
// Returns `entries`, sorted; tmp [n] is scratch.
uint64_t* sort_entries(uint64_t* entries, uint64_t* tmp, int n) {
  uint32_t low = 0xFFFFFFFFu, high = 0;
  for (int i = 0; i < n; ++i) {
    const uint32_t k = static_cast<uint32_t>(entries[i] >> 32);
    low = std::min(low, k);
    high = std::max(high, k);
  }
  uint32_t mid[2048], top[2048];  // digit counts, then where each digit's entries go
  const uint32_t top_low = low >> 21, top_high = high >> 21;
  std::memset(mid, 0, sizeof mid);
  std::memset(top + top_low, 0, (top_high - top_low + 1) * sizeof(uint32_t));
  for (int i = 0; i < n; ++i) {
    const uint32_t k = static_cast<uint32_t>(entries[i] >> 32);
    ++mid[(k >> 10) & 2047];
    ++top[k >> 21];
  }
  uint32_t offset = 0;
  for (auto& c : mid) offset += std::exchange(c, offset);
  offset = 0;
  for (uint32_t d = top_low; d <= top_high; ++d) offset += std::exchange(top[d], offset);
  for (int i = 0; i < n; ++i) tmp[mid[(entries[i] >> 42) & 2047]++] = entries[i];
  for (int i = 0; i < n; ++i) entries[top[tmp[i] >> 53]++] = tmp[i];
  const auto key_less = [](uint64_t a, uint64_t b) { return (a >> 32) < (b >> 32); };
  int64_t budget = 16 * static_cast<int64_t>(n);  // moves before the fix-up gives up
  for (int i = 1; i < n; ++i) {
    const uint64_t e = entries[i];
    int j = i;
    for (; j > 0 && key_less(e, entries[j - 1]); --j) entries[j] = entries[j - 1];
    entries[j] = e;
    if ((budget -= i - j) < 0) {
      std::stable_sort(entries, entries + n, key_less);
      break;
    }
  }
  return entries;
}

struct Options {
  int k, max_iter, restarts;
  double tol;
  uint64_t seed;
};

// Per-thread work arrays, reused across the rows of a chunk.
struct Scratch {
  std::vector<uint64_t> entries, tmp;
  std::vector<double> x;
  std::vector<Sums> p;
  Centres seeding[2];  // the current seeding and the best so far
};

// The float just below or at the double t: for a float v, v > t exactly when v > round_down(t).
inline float round_down(double t) {
  float f = static_cast<float>(t);
  if (static_cast<double>(f) > t) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

// Sort the row with its sanitised weights (|w|; 0 where w or the value is not finite, the value
// then counting as 0; all ones when nothing is left), shift it by its median, and fill the prefix sums.
Row sort_row(const float* v, const float* w, int n, Scratch& s, double& shift) {
  s.entries.resize(n);
  s.tmp.resize(n);
  s.x.resize(n);
  s.p.resize(n + 1);
  uint32_t any_weight = 0;
  for (int j = 0; j < n; ++j) {  // branch-free, so it vectorises
    const bool finite = std::isfinite(v[j]);
    const float weight = finite && std::isfinite(w[j]) ? std::abs(w[j]) : 0.0f;
    any_weight |= float_bits(weight);
    s.entries[j] = (static_cast<uint64_t>(order_key(finite ? v[j] : 0.0f)) << 32) | float_bits(weight);
  }
  const uint64_t fallback = any_weight ? 0 : float_bits(1.0f);  // an all-zero row: unweighted
  const uint64_t* sorted = sort_entries(s.entries.data(), s.tmp.data(), n);
  shift = key_value(static_cast<uint32_t>(sorted[n / 2] >> 32));
  double sw = 0, swx = 0, swxx = 0;  // running sums in registers: a chain through memory is slower
  s.p[0] = {0, 0, 0};
  for (int i = 0; i < n; ++i) {
    const double x = static_cast<double>(key_value(static_cast<uint32_t>(sorted[i] >> 32))) - shift;
    const double weight = bits_float(static_cast<uint32_t>(sorted[i] | fallback));
    const double wx = weight * x;
    sw += weight;
    swx += wx;
    swxx += wx * x;
    s.x[i] = x;
    s.p[i + 1] = {sw, swx, swxx};
  }
  return Row{n, s.x.data(), s.p.data()};
}

// codes[j]: how many of the ascending centroids' midpoints v[j] exceeds (NaN: 0), one pass per midpoint.
void nearest_codes(const float* v, int n, const float* centroids, int k, uint8_t* codes) {
  std::memset(codes, 0, n);
  for (int m = 0; m + 1 < k; ++m) {
    const float t = round_down((static_cast<double>(centroids[m]) + centroids[m + 1]) / 2);
    for (int j = 0; j < n; ++j) codes[j] += v[j] > t;
  }
}

// One row: values v [n], weights w [n] (raw: sanitised here as core.kmeans does) -> centroids [k], codes [n].
void solve_row(const float* v, const float* w, int n, int64_t row_index, const Options& o, Scratch& s,
               float* centroids, uint8_t* codes) {
  double shift = 0;
  const Row row = sort_row(v, w, n, s, shift);
  double best_cost = std::numeric_limits<double>::infinity();
  int best = 0;
  for (int r = 0; r < o.restarts; ++r) {
    Centres& run = s.seeding[r == 0 ? 0 : 1 - best];
    Stream rng(o.seed, static_cast<uint64_t>(row_index), static_cast<uint64_t>(r));
    greedy_kmeanspp(row, o.k, rng, run);
    lloyd(row, run, o.max_iter, o.tol);
    const double objective = run.objective(row);
    if (r == 0 || objective < best_cost) best_cost = objective, best = static_cast<int>(&run - s.seeding);
  }
  for (int k = 0; k < o.k; ++k) centroids[k] = static_cast<float>(s.seeding[best].c[k] + shift);
  nearest_codes(v, n, centroids, o.k, codes);
}

std::tuple<at::Tensor, at::Tensor> kmeans_1d_cpu(const at::Tensor& values, const at::Tensor& weights, int64_t n_clusters,
                                                 int64_t max_iter, int64_t seed, double tol, int64_t restarts) {
  TORCH_CHECK(values.device().is_cpu() && weights.device().is_cpu(), "kmeans_1d_cpu needs CPU tensors");
  TORCH_CHECK(values.dim() == 2 && values.sizes() == weights.sizes(), "values and weights must be 2-D of one shape");
  TORCH_CHECK(n_clusters >= 1 && n_clusters <= 256, "n_clusters must be in 1..256, got ", n_clusters);
  TORCH_CHECK(values.size(1) < (int64_t{1} << 31), "rows longer than 2**31 - 1 values are not supported");
  const at::Tensor v = values.to(at::kFloat).contiguous(), w = weights.to(at::kFloat).contiguous();
  const int64_t rows = v.size(0);
  const int n = static_cast<int>(v.size(1));
  at::Tensor centroids = at::zeros({rows, n_clusters}, v.options());
  at::Tensor codes = at::zeros({rows, n}, v.options().dtype(at::kByte));
  if (rows == 0 || n == 0) return {centroids, codes};
  const Options o{static_cast<int>(n_clusters), static_cast<int>(std::max<int64_t>(0, max_iter)),
                  static_cast<int>(std::max<int64_t>(1, restarts)), tol, static_cast<uint64_t>(seed)};
  const float* vp = v.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* cp = centroids.data_ptr<float>();
  uint8_t* op = codes.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t r = begin; r < end; ++r)
      solve_row(vp + r * n, wp + r * n, n, r, o, scratch, cp + r * n_clusters, op + r * n);
  });
  return {centroids, codes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(squeeze, m) {
  m.def("kmeans_1d_cpu(Tensor values, Tensor weights, int n_clusters, int max_iter, int seed, float tol, "
        "int restarts) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("kmeans_1d_cpu", &kmeans_1d_cpu); }
