// The single-pass Adam-mini step on the CPU: adam_mini_tx/kernels/spec.py states the math.
//
// Every parameter is cut into tiles of whole blocks (about kTileElements elements: a tile's p, g
// and m stay in the core's L2 cache), and each is read from memory once. Rows (and heads) are
// software-pipelined: block k's v is updated from its sum of g*g, then one loop updates block
// k's m and p while it sums block k+1's g*g, so p, m and the next g stream together and a
// block's g is in cache when it is updated (rows_tile_pipelined). With given row sums (from
// the statistics pass), an int8 m, or elementwise blocks, a tile sums a block's g*g first (pass
// A), then updates it (pass B) over the same addresses. The columns of a Conv1D weight need
// every row first: their sums are taken over bands of rows, then the bands are updated (see
// columns_tile). Tiles of all parameters are shared out among the intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using c10::BFloat16;

constexpr int64_t kTileElements = 1 << 16;
constexpr int64_t kGroup = 256;            // int8: most elements per scale, along the last axis
constexpr uint32_t kGolden = 10368889u;    // the Weyl step of the rounding noise (lowbits.py)

// Meta columns, one row per member (native.py writes them).
enum Meta : int64_t {
  kMode, kRowNumel, kLast, kDecay, kNoiseKey, kReadsStored, kRunsBegin, kRunsEnd, kMetaColumns
};
enum Mode : int64_t { kRows = 0, kColumns = 1, kElementwise = 2 };

struct Scalars {
  float w1;           // 1 - b1
  float b2;
  double one_minus_b2;
  float eps;
  float eps_root_c2;  // eps_root * (1 - b2**t)
  float root_c2;      // sqrt(1 - b2**t)
  float lr_over_c1;   // lr / (1 - b1**t)
  // a bf16 v (see BlockRule<BFloat16>): the chain's scalars as it rounds them
  float wd_bf16, neg_lr, root_c2_bf16, eps_root_c2_bf16;  // ATen's bf16 add rounds its alpha
};

struct Element {  // one member's constants of the element update
  float lr_wd;    // lr * wd where the member is decayed, else 0
  float c1;       // 1 - b1**t in the dtype the chain divides m in (bf16 for a bf16 state m)
  bool reread;    // the update reads m back from storage (a state m); else the fp32 value (a
                  // low-precision format)
  int64_t key;    // stochastic rounding key; -1: to nearest
};

inline float load(float x) { return x; }
inline float load(BFloat16 x) { return static_cast<float>(x); }

inline uint32_t noise_bits(int64_t index, int64_t key) {  // 24 random bits of element `index`
  return (static_cast<uint32_t>(index) * kGolden + static_cast<uint32_t>(key)) & 0xFFFFFFu;
}

// The bits of x rounded to the nearest bf16, ties to even (NaN: 0x7FC0), as c10::BFloat16(x)
// rounds it, but without a branch or 16-bit selects, so that the loops calling it vectorize.
inline uint32_t nearest_bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return std::isnan(x) ? 0x7FC0u : rounded;
}

// x in bf16: stochastically rounded with element `index`'s noise, or to nearest (key < 0, and
// for NaN and infinities).
inline BFloat16 to_bf16(float x, int64_t index, int64_t key) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t noisy = (bits + (noise_bits(index, key) >> 8)) >> 16;
  const bool nearest = key < 0 || !std::isfinite(x);
  return BFloat16(static_cast<uint16_t>(nearest ? nearest_bf16_bits(x) : noisy),
                  BFloat16::from_bits());
}

inline void store(float& out, float x, int64_t, int64_t) { out = x; }
inline void store(BFloat16& out, float x, int64_t index, int64_t key) {
  out = to_bf16(x, index, key);
}

inline float bf16(float x) {  // rounded to nearest
  const uint32_t bits = nearest_bf16_bits(x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// How a block's v and its elements' p are updated, by the dtype V of v (the state's dtype).
// fp32 v: one value per block, step = lr / (c1 d), and p <- p - (step m + lr wd p), rounded once
// (a bf16 parameter adds the bf16-rounded update).
template <typename V>
struct BlockRule {
  static float block(V& v, double mean, const Scalars& s) {
    const float value = load(v) * s.b2 + static_cast<float>(mean * s.one_minus_b2);
    store(v, value, 0, -1);
    const float denominator = std::sqrt(load(v) + s.eps_root_c2) / s.root_c2 + s.eps;
    return s.lr_over_c1 / denominator;
  }
  template <typename P>
  static void param(P& out, float p, float m, float step, const Scalars&, const Element& e) {
    const float update = -(step * m + e.lr_wd * p);
    if constexpr (std::is_same_v<P, BFloat16>) {
      store(out, p + bf16(update), 0, -1);
    } else {
      out = p + update;
    }
  }
};

// bf16 v (bf16 state): the chain computes in bf16, one rounding per operation; so does this.
// block: d = bf16(bf16(bf16(sqrt(v)) / sqrt(c2)) + eps); an element: u = bf16(m / c1),
// bf16(u / d), bf16(u + bf16(wd) p), bf16(-lr u), and p + u in p's dtype.
template <>
struct BlockRule<BFloat16> {
  static float block(BFloat16& v, double mean, const Scalars& s) {
    const float fresh = bf16(static_cast<float>(mean * s.one_minus_b2));
    const float value = bf16(bf16(load(v) * s.b2) + fresh);
    store(v, value, 0, -1);
    const float shifted = s.eps_root_c2_bf16 != 0.f ? bf16(value + s.eps_root_c2_bf16) : value;
    return bf16(bf16(bf16(std::sqrt(shifted)) / s.root_c2_bf16) + s.eps);
  }
  template <typename P>
  static void param(P& out, float p, float m, float denominator, const Scalars& s,
                    const Element& e) {
    float u = bf16(m / e.c1);
    u = bf16(u / denominator);
    if (e.lr_wd != 0.f) u = bf16(u + s.wd_bf16 * p);
    u = bf16(u * s.neg_lr);
    store(out, p + u, 0, -1);
  }
};

template <typename T>
double sum_of_squares(const T* x, int64_t n) {
  double total = 0.0;
  for (int64_t begin = 0; begin < n; begin += 1024) {
    const int64_t end = std::min(n, begin + 1024);
    float partial = 0.f;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = begin; i < end; ++i) {
      const float value = load(x[i]);
      partial += value * value;
    }
    total += partial;
  }
  return total;
}

// Element i of a float or bf16 m: m <- lerp(m, g, 1 - b1), then p (BlockRule's step value)
// from m as stored (kReread) or as computed. (kReread is a template argument: a select on a
// loop-invariant bool keeps GCC from vectorizing the bf16 loops.)
template <typename V, bool kReread, typename P, typename M>
inline void update_element(P* p, const P* g, M* m, int64_t i, int64_t index0, float step,
                           const Scalars& s, const Element& e) {
  const float old = load(m[i]);
  const float value = std::fma(s.w1, load(g[i]) - old, old);  // ATen's lerp
  M stored;
  store(stored, value, index0 + i, e.key);
  m[i] = stored;
  BlockRule<V>::param(p[i], load(p[i]), kReread ? load(stored) : value, step, s, e);
}

// One span of elements [0, n) of a float or bf16 m; `step` (BlockRule's block value) is per
// element when kPerElement.
template <bool kPerElement, typename V, typename P, typename M>
void update_span(P* p, const P* g, M* m, int64_t n, int64_t index0, const float* step,
                 const Scalars& s, const Element& e) {
  if (e.reread) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      update_element<V, true>(p, g, m, i, index0, kPerElement ? step[i] : step[0], s, e);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      update_element<V, false>(p, g, m, i, index0, kPerElement ? step[i] : step[0], s, e);
  }
}

// update_span over [0, n) with one step, in the same loop as the sum of squares of the next
// block's [0, n_next) (as sum_of_squares: fp32 over 1024 elements, then double), returned: p, m
// and the next g stream from memory together, and this block's g is in cache (its sum was taken
// during the previous block's update).
template <typename V, bool kReread, typename P, typename M>
double update_summing_next(P* p, const P* g, M* m, int64_t n, int64_t index0, float step,
                           const P* next, int64_t n_next, const Scalars& s, const Element& e) {
  double total = 0.0;
  const int64_t longest = std::max(n, n_next);
  for (int64_t begin = 0; begin < longest; begin += 1024) {
    const int64_t end = std::min(longest, begin + 1024);
    const int64_t both = std::clamp(std::min(n, n_next), begin, end);
    float partial = 0.f;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = begin; i < both; ++i) {
      const float value = load(next[i]);
      partial += value * value;
      update_element<V, kReread>(p, g, m, i, index0, step, s, e);
    }
    const int64_t sum_end = std::min(end, n_next);
#pragma omp simd reduction(+ : partial)
    for (int64_t i = both; i < sum_end; ++i) partial += load(next[i]) * load(next[i]);
    const int64_t update_end = std::min(end, n);
#pragma omp simd
    for (int64_t i = both; i < update_end; ++i)
      update_element<V, kReread>(p, g, m, i, index0, step, s, e);
    total += partial;
  }
  return total;
}

// One int8 group [0, n): codes and its scale read, updated, requantized (blockwise absmax).
template <bool kPerElement, typename V, typename P>
void update_span(P* p, const P* g, int8_t* codes, float* scale, int64_t n, int64_t index0,
                 const float* step, const Scalars& s, const Element& e) {
  float values[kGroup];
  const float old_scale = *scale;
  float absmax = 0.f;
  int nan = 0;
#pragma omp simd reduction(max : absmax) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const float old = static_cast<float>(codes[i]) * old_scale;
    const float value = std::fma(s.w1, load(g[i]) - old, old);  // ATen's lerp
    values[i] = value;
    nan |= std::isnan(value);
    absmax = std::max(absmax, std::fabs(value));
    BlockRule<V>::param(p[i], load(p[i]), value, kPerElement ? step[i] : step[0], s, e);
  }
  const float new_scale = nan ? NAN : absmax / 127.f;
  const float divisor = new_scale > 0.f ? new_scale : 1.f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float scaled = values[i] / divisor;
    scaled = e.key < 0 ? std::nearbyint(scaled)
                       : std::floor(scaled + noise_bits(index0 + i, e.key) * (1.f / 16777216.f));
    codes[i] = nan ? 0 : static_cast<int8_t>(std::min(127.f, std::max(-127.f, scaled)));
  }
  *scale = new_scale;
}

struct Member {
  void* p;
  const void* g;
  void* m;
  float* scales;  // int8 only
  void* v;
  const void* row_sums;  // nullptr: pass A computes the sums
  bool sums_double;
  bool g_bf16;
  int64_t mode, row_numel, last, group;
  Element element;
  std::vector<std::pair<int64_t, int64_t>> runs;  // (rows per block, blocks)
  std::vector<float> column_steps;  // columns: each column's block step (BlockRule::block)
};

struct Tile {
  int64_t member, run, in_run, block, row, end_row;  // from block `in_run` of run `run` (the
};                                                    // member's block `block`): rows [row, end_row)

template <typename T>
double row_sum(const Member& mb, int64_t r) {
  return static_cast<const T*>(mb.row_sums)[r];
}
double given_sum(const Member& mb, int64_t row, int64_t rows) {
  double total = 0.0;
  for (int64_t r = row; r < row + rows; ++r)
    total += mb.sums_double ? row_sum<double>(mb, r) : row_sum<float>(mb, r);
  return total;
}

// Tiles of whole blocks. Rows: a row is row_numel contiguous elements; elementwise: one element
// (an int8 m also keeps its groups whole). Columns (the columns of an (in, out) tensor): bands of
// whole rows of the tensor (see columns_tile).
void cut(const Member& mb, int64_t index, std::vector<Tile>& tiles) {
  if (mb.mode == kColumns) {  // bands of whole rows of the (in, out) tensor
    const int64_t in = mb.row_numel, band = std::max<int64_t>(1, kTileElements / mb.last);
    for (int64_t row = 0; row < in; row += band)
      tiles.push_back({index, 0, 0, 0, row, std::min(in, row + band)});
    return;
  }
  const int64_t per_row = mb.mode == kElementwise ? 1 : mb.row_numel;
  const bool grouped = mb.scales != nullptr && mb.mode == kElementwise;  // rows hold whole groups
  int64_t row = 0, block = 0;
  Tile open{index, 0, 0, 0, 0, 0};
  for (int64_t run = 0; run < static_cast<int64_t>(mb.runs.size()); ++run) {
    const auto [length, count] = mb.runs[run];
    for (int64_t b = 0; b < count; ++b) {
      row += length;
      ++block;
      const bool aligned = !grouped || (row % mb.last) % mb.group == 0 || row % mb.last == 0;
      if ((row - open.row) * per_row >= kTileElements && aligned) {
        open.end_row = row;
        tiles.push_back(open);
        open = {index, b + 1 < count ? run : run + 1, b + 1 < count ? b + 1 : 0, block, row, 0};
      }
    }
  }
  open.end_row = row;
  if (row > open.row) tiles.push_back(open);
}

// Calls visit(row, length, block) for every block of the tile, in order.
template <typename Visit>
void for_each_block(const Member& mb, const Tile& tile, Visit&& visit) {
  int64_t row = tile.row, block = tile.block, in_run = tile.in_run;
  for (int64_t run = tile.run; run < static_cast<int64_t>(mb.runs.size()); ++run, in_run = 0) {
    const auto [length, count] = mb.runs[run];
    for (int64_t b = in_run; b < count; ++b, row += length, ++block) {
      if (row >= tile.end_row) return;
      visit(row, length, block);
    }
  }
}

// Rows of a float or bf16 m without given sums, software-pipelined: block k is updated in the
// loop that sums block k+1's g*g (update_summing_next); v of a block is updated just before its
// elements, as in rows_tile.
template <typename P, typename M, typename V>
void rows_tile_pipelined(const Member& mb, const Tile& tile, P* p, const P* g, M* m, V* v,
                         const Scalars& s) {
  int64_t begin = 0, n = 0, block = -1;  // the block whose sum is taken and update is due
  double sum = 0.0;
  auto finish = [&](const P* next, int64_t n_next) {
    const float step = BlockRule<V>::block(v[block], sum / static_cast<double>(n), s);
    return mb.element.reread
               ? update_summing_next<V, true>(p + begin, g + begin, m + begin, n, begin, step,
                                              next, n_next, s, mb.element)
               : update_summing_next<V, false>(p + begin, g + begin, m + begin, n, begin, step,
                                               next, n_next, s, mb.element);
  };
  for_each_block(mb, tile, [&](int64_t row, int64_t length, int64_t next_block) {
    const int64_t next_begin = row * mb.row_numel, next_n = length * mb.row_numel;
    sum = block < 0 ? sum_of_squares(g + next_begin, next_n) : finish(g + next_begin, next_n);
    begin = next_begin;
    n = next_n;
    block = next_block;
  });
  if (block >= 0) finish(g, 0);
}

// Rows: per block, pass A (or the given sums), v, then pass B over its rows.
template <typename P, typename M, typename V>
void rows_tile(const Member& mb, const Tile& tile, const Scalars& s) {
  P* p = static_cast<P*>(mb.p);
  const P* g = static_cast<const P*>(mb.g);
  M* m = static_cast<M*>(mb.m);
  V* v = static_cast<V*>(mb.v);
  if constexpr (!std::is_same_v<M, int8_t>) {
    if (!mb.row_sums) return rows_tile_pipelined(mb, tile, p, g, m, v, s);
  }
  const int64_t groups = (mb.last + mb.group - 1) / mb.group;
  for_each_block(mb, tile, [&](int64_t row, int64_t length, int64_t block) {
    const int64_t begin = row * mb.row_numel, n = length * mb.row_numel;
    const double sum = mb.row_sums ? given_sum(mb, row, length) : sum_of_squares(g + begin, n);
    const float step = BlockRule<V>::block(v[block], sum / static_cast<double>(n), s);
    if constexpr (std::is_same_v<M, int8_t>) {  // whole lines of the last axis, group by group
      for (int64_t line = begin; line < begin + n; line += mb.last) {
        for (int64_t within = 0; within < mb.last; within += mb.group) {
          const int64_t at = line + within;
          update_span<false, V>(p + at, g + at, m + at,
                             mb.scales + (line / mb.last) * groups + within / mb.group,
                             std::min(mb.group, mb.last - within), at, &step, s, mb.element);
        }
      }
    } else {
      update_span<false, V>(p + begin, g + begin, m + begin, n, begin, &step, s, mb.element);
    }
  });
}

// Spans of a per-element `steps` row: elements [begin, begin + n) of one line of the last axis.
template <typename P, typename M, typename V>
void update_line(const Member& mb, int64_t begin, int64_t n, const float* steps,
                 const Scalars& s) {
  P* p = static_cast<P*>(mb.p) + begin;
  const P* g = static_cast<const P*>(mb.g) + begin;
  M* m = static_cast<M*>(mb.m) + begin;
  if constexpr (std::is_same_v<M, int8_t>) {
    const int64_t groups = (mb.last + mb.group - 1) / mb.group;
    for (int64_t done = 0; done < n;) {
      const int64_t at = begin + done, within = at % mb.last;
      const int64_t size = std::min({mb.group - within % mb.group, mb.last - within, n - done});
      update_span<true, V>(p + done, g + done, m + done,
                        mb.scales + (at / mb.last) * groups + within / mb.group, size, at,
                        steps + done, s, mb.element);
      done += size;
    }
  } else {
    update_span<true, V>(p, g, m, n, begin, steps, s, mb.element);
  }
}

// Columns of a contiguous (in, out) tensor, whose blocks are groups of columns: a column's sum
// needs every row, so its tiles are bands of whole rows. The sums come first (given, or
// column_sums over all bands), then each block's v and step (columns_steps), then each band
// updates its rows with the per-column steps (columns_tile): p, g and m are read in order.

// Adds the band's sums of squares per column to sums[0, out) (fp32 over 256 rows at a time).
template <typename P>
void band_sums(const Member& mb, const Tile& band, double* sums) {
  const P* g = static_cast<const P*>(mb.g);
  const int64_t out = mb.last;
  std::vector<float> partial(out);
  for (int64_t i0 = band.row; i0 < band.end_row; i0 += 256) {
    std::fill(partial.begin(), partial.end(), 0.f);
    for (int64_t i = i0; i < std::min(band.end_row, i0 + 256); ++i) {
      const P* line = g + i * out;
#pragma omp simd
      for (int64_t c = 0; c < out; ++c) partial[c] += load(line[c]) * load(line[c]);
    }
    for (int64_t c = 0; c < out; ++c) sums[c] += partial[c];
  }
}

// Each columns member's sums of squares per column over all its bands (the bands in parallel,
// their partial sums added in order); empty for other members and, with skip_given, for members
// whose row sums are given.
std::vector<std::vector<double>> column_sums(const std::vector<Member>& members,
                                             const std::vector<Tile>& tiles, bool skip_given) {
  std::vector<std::pair<const Tile*, int64_t>> bands;  // a band, and its partial sums' offset
  int64_t size = 0;
  for (const Tile& tile : tiles) {
    const Member& mb = members[tile.member];
    if (mb.mode == kColumns && !(skip_given && mb.row_sums)) {
      bands.emplace_back(&tile, size);
      size += mb.last;
    }
  }
  std::vector<double> partial(size, 0.0);
  at::parallel_for(0, static_cast<int64_t>(bands.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto [band, at] = bands[b];
      const Member& mb = members[band->member];
      if (mb.g_bf16)
        band_sums<BFloat16>(mb, *band, partial.data() + at);
      else
        band_sums<float>(mb, *band, partial.data() + at);
    }
  });
  std::vector<std::vector<double>> sums(members.size());
  for (const auto& [band, at] : bands) {
    std::vector<double>& total = sums[band->member];
    total.resize(members[band->member].last, 0.0);
    for (size_t c = 0; c < total.size(); ++c) total[c] += partial[at + c];
  }
  return sums;
}

// Each block's v and step from its columns' sums (given row sums: one per column).
template <typename V>
void columns_steps(Member& mb, const std::vector<double>& sums, const Scalars& s) {
  V* v = static_cast<V*>(mb.v);
  const int64_t in = mb.row_numel, columns = mb.last;
  mb.column_steps.assign(columns, 0.f);
  for_each_block(mb, Tile{0, 0, 0, 0, 0, columns}, [&](int64_t column, int64_t length,
                                                      int64_t block) {
    double sum = 0.0;
    for (int64_t c = column; c < column + length; ++c)
      sum += mb.row_sums ? given_sum(mb, c, 1) : sums[c];
    const float step = BlockRule<V>::block(v[block], sum / static_cast<double>(length * in), s);
    std::fill(mb.column_steps.begin() + column, mb.column_steps.begin() + column + length, step);
  });
}

// A band of rows, with the member's column steps.
template <typename P, typename M, typename V>
void columns_tile(const Member& mb, const Tile& band, const Scalars& s) {
  for (int64_t i = band.row; i < band.end_row; ++i)
    update_line<P, M, V>(mb, i * mb.last, mb.last, mb.column_steps.data(), s);
}

// Elementwise blocks (plain Adam): v and the step per element.
template <typename P, typename M, typename V>
void elementwise_tile(const Member& mb, const Tile& tile, const Scalars& s) {
  const P* g = static_cast<const P*>(mb.g);
  V* v = static_cast<V*>(mb.v);
  const int64_t n = tile.end_row - tile.row;
  std::vector<float> steps(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t at = tile.row + i;
    const double square = mb.row_sums ? given_sum(mb, at, 1)
                                      : static_cast<double>(load(g[at])) * load(g[at]);
    steps[i] = BlockRule<V>::block(v[at], square, s);
  }
  for (int64_t done = 0; done < n;) {  // lines of the last axis (an int8 m's groups lie in them)
    const int64_t at = tile.row + done;
    const int64_t size = std::min(n - done, mb.last - at % mb.last);
    update_line<P, M, V>(mb, at, size, steps.data() + done, s);
    done += size;
  }
}

template <typename P, typename M, typename V>
void run_tile(const Member& mb, const Tile& tile, const Scalars& s) {
  switch (mb.mode) {
    case kRows: return rows_tile<P, M, V>(mb, tile, s);
    case kColumns: return columns_tile<P, M, V>(mb, tile, s);
    default: return elementwise_tile<P, M, V>(mb, tile, s);
  }
}

using TileFn = void (*)(const Member&, const Tile&, const Scalars&);

template <typename P, typename M>
TileFn pick_v(at::ScalarType v) {
  return v == at::kBFloat16 ? run_tile<P, M, BFloat16> : run_tile<P, M, float>;
}
template <typename P>
TileFn pick_m(at::ScalarType m, at::ScalarType v) {
  if (m == at::kChar) return pick_v<P, int8_t>(v);
  return m == at::kBFloat16 ? pick_v<P, BFloat16>(v) : pick_v<P, float>(v);
}
TileFn pick(at::ScalarType p, at::ScalarType m, at::ScalarType v) {
  return p == at::kBFloat16 ? pick_m<BFloat16>(m, v) : pick_m<float>(m, v);
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "adam_mini_tx native step: ", what); }

Member geometry_of(const at::Tensor& grad, const int64_t* row, const int64_t* pairs) {
  Member mb{};
  mb.g = grad.data_ptr();
  mb.g_bf16 = grad.scalar_type() == at::kBFloat16;
  mb.mode = row[kMode];
  mb.row_numel = row[kRowNumel];
  mb.last = std::max<int64_t>(row[kLast], 1);
  const int64_t groups = (mb.last + kGroup - 1) / kGroup;
  mb.group = (mb.last + groups - 1) / groups;
  for (int64_t r = row[kRunsBegin]; r < row[kRunsEnd]; ++r)
    mb.runs.emplace_back(pairs[2 * r], pairs[2 * r + 1]);
  return mb;
}

void step_(at::TensorList params, at::TensorList grads, at::TensorList moments,
           at::TensorList scales, at::TensorList seconds, at::TensorList row_sums,
           const at::Tensor& meta, const at::Tensor& runs, at::ArrayRef<double> scalars) {
  const int64_t count = static_cast<int64_t>(params.size());
  check(grads.size() == params.size() && moments.size() == params.size() &&
            scales.size() == params.size() && seconds.size() == params.size() &&
            row_sums.size() == params.size(), "one entry per member in every list");
  check(meta.scalar_type() == at::kLong && meta.is_contiguous() && meta.dim() == 2 &&
            meta.size(0) == count && meta.size(1) == kMetaColumns, "meta is (members, 8) int64");
  check(runs.scalar_type() == at::kLong && runs.is_contiguous(), "runs are int64 pairs");
  check(scalars.size() == 8, "8 scalars: lr, b1, b2, eps, eps_root, wd, c1, c2");
  const double lr = scalars[0], b1 = scalars[1], b2 = scalars[2], eps = scalars[3];
  const double eps_root = scalars[4], wd = scalars[5], c1 = scalars[6], c2 = scalars[7];
  const float c1_f = static_cast<float>(c1), root_c2 = static_cast<float>(std::sqrt(c2));
  const Scalars s{static_cast<float>(1.0 - b1), static_cast<float>(b2), 1.0 - b2,
                  static_cast<float>(eps), static_cast<float>(eps_root * c2), root_c2,
                  static_cast<float>(lr / c1), bf16(static_cast<float>(wd)), static_cast<float>(-lr),
                  bf16(root_c2),
                  bf16(static_cast<float>(eps_root) * bf16(static_cast<float>(c2)))};
  const int64_t* table = meta.data_ptr<int64_t>();
  const int64_t* pairs = runs.data_ptr<int64_t>();
  std::vector<Member> members(count);
  std::vector<TileFn> functions(count);
  std::vector<Tile> tiles;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t* row = table + k * kMetaColumns;
    const at::Tensor &p = params[k], &g = grads[k], &m = moments[k], &v = seconds[k];
    check(p.device().is_cpu() && p.is_contiguous() && g.is_contiguous() && m.is_contiguous() &&
              v.is_contiguous(), "CPU tensors, contiguous");
    check(g.scalar_type() == p.scalar_type() && g.numel() == p.numel() &&
              m.numel() == p.numel(), "grad and m like the parameter");
    Member& mb = members[k] = geometry_of(g, row, pairs);
    mb.p = p.data_ptr();
    mb.m = m.data_ptr();
    mb.scales = m.scalar_type() == at::kChar ? scales[k].data_ptr<float>() : nullptr;
    mb.v = v.data_ptr();
    mb.row_sums = row_sums[k].numel() ? row_sums[k].data_ptr() : nullptr;
    mb.sums_double = row_sums[k].scalar_type() == at::kDouble;
    const bool reread = row[kReadsStored] != 0;
    mb.element = {row[kDecay] ? static_cast<float>(lr * wd) : 0.f,
                  reread && m.scalar_type() == at::kBFloat16 ? bf16(c1_f) : c1_f, reread,
                  row[kNoiseKey]};
    functions[k] = pick(p.scalar_type(), m.scalar_type(), v.scalar_type());
    cut(mb, k, tiles);
  }
  const std::vector<std::vector<double>> sums = column_sums(members, tiles, true);
  for (int64_t k = 0; k < count; ++k) {
    if (members[k].mode != kColumns) continue;
    if (seconds[k].scalar_type() == at::kBFloat16)
      columns_steps<BFloat16>(members[k], sums[k], s);
    else
      columns_steps<float>(members[k], sums[k], s);
  }
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Tile& tile = tiles[t];
      functions[tile.member](members[tile.member], tile, s);
    }
  });
}

// Row sums of squares of one tile: rows (row_numel contiguous elements) or elements (columns:
// column_sums).
template <typename P>
void sums_tile(const Member& mb, const Tile& tile, float* out) {
  const P* g = static_cast<const P*>(mb.g);
  if (mb.mode == kElementwise) {
    for (int64_t r = tile.row; r < tile.end_row; ++r) out[r] = load(g[r]) * load(g[r]);
    return;
  }
  const int64_t per_row = mb.row_numel;
  for (int64_t r = tile.row; r < tile.end_row; ++r)
    out[r] = static_cast<float>(sum_of_squares(g + r * per_row, per_row));
}

// The statistics pass: every member's row sums of squares (fp32, accumulated in double) into
// `out` (one contiguous fp32 tensor per member, a value per row); true when all are finite.
bool row_sums_(at::TensorList grads, at::TensorList out, const at::Tensor& meta,
               const at::Tensor& runs) {
  const int64_t count = static_cast<int64_t>(grads.size());
  check(out.size() == grads.size(), "one output per gradient");
  check(meta.scalar_type() == at::kLong && meta.is_contiguous() && meta.dim() == 2 &&
            meta.size(0) == count && meta.size(1) == kMetaColumns, "meta is (members, 8) int64");
  std::vector<Member> members;
  std::vector<Tile> tiles;
  members.reserve(count);
  for (int64_t k = 0; k < count; ++k) {
    check(grads[k].device().is_cpu() && grads[k].is_contiguous() &&
              (grads[k].scalar_type() == at::kFloat || grads[k].scalar_type() == at::kBFloat16),
          "contiguous fp32 or bf16 CPU gradients");
    check(out[k].scalar_type() == at::kFloat && out[k].is_contiguous(), "fp32 outputs");
    members.push_back(geometry_of(grads[k], meta.data_ptr<int64_t>() + k * kMetaColumns,
                                  runs.data_ptr<int64_t>()));
    cut(members.back(), k, tiles);
  }
  std::vector<char> finite(tiles.size(), 1);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Tile& tile = tiles[t];
      if (members[tile.member].mode == kColumns) continue;
      float* sums = out[tile.member].data_ptr<float>();
      if (members[tile.member].g_bf16)
        sums_tile<BFloat16>(members[tile.member], tile, sums);
      else
        sums_tile<float>(members[tile.member], tile, sums);
      for (int64_t r = tile.row; r < tile.end_row; ++r) finite[t] &= std::isfinite(sums[r]);
    }
  });
  bool all_finite = std::all_of(finite.begin(), finite.end(), [](char ok) { return ok != 0; });
  const std::vector<std::vector<double>> columns = column_sums(members, tiles, false);
  for (int64_t k = 0; k < count; ++k) {
    float* sums = out[k].data_ptr<float>();
    for (size_t c = 0; c < columns[k].size(); ++c) {
      sums[c] = static_cast<float>(columns[k][c]);
      all_finite &= std::isfinite(sums[c]);
    }
  }
  return all_finite;
}

}  // namespace

TORCH_LIBRARY(adam_mini_tx, library) {
  library.def(
      "step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] moments, Tensor(c!)[] scales, "
      "Tensor(d!)[] seconds, Tensor[] row_sums, Tensor meta, Tensor runs, float[] scalars) -> ()");
  library.impl("step_", c10::DispatchKey::CPU, TORCH_FN(step_));
  library.def("row_sums_(Tensor[] grads, Tensor(a!)[] out, Tensor meta, Tensor runs) -> bool");
  library.impl("row_sums_", c10::DispatchKey::CPU, TORCH_FN(row_sums_));
}
