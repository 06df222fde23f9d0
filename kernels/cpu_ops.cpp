// CPU ops of the memory layers (built by memlayers/kernels/cpu_ops.py with torch's cpp_extension).
//
// Shape suffixes: see docs/shapes.md. Every op is deterministic: work is split over threads
// only where each output element is written by one thread, in a fixed order.
//
// - topk_merge:       per (token, head), the top-k of each half's sub-key scores and the exact
//                     top-k of their candidate pair sums -> (scores_THK, rows_THK, subs_THK2)
// - search_forward:   the same from the queries and sub-keys, each row of scores computed in place
//                     (queries (T, H, 2, Q): both halves side by side; sub-keys (2, H, n, Q))
// - search_backward:  gradients of those scores w.r.t. the query halves and the sub-keys
// - rms_rows:         qk-norm: every row of Q entries scaled to unit RMS (times a gain) -> (y, rstd)
// - rms_rows_backward: its gradients w.r.t. the rows and the gain
// - bag_forward:      the bag's output, sum over j of weights[t, j] * values[slots[t, j]] (fp32 rows of
//                     up to 64 with AVX-512; the others are F.embedding_bag's)
// - bag_weight_grad:  <grad_y[t], values[slots[t, j]]> for every read
// - sort_reads:       counting sort of the reads by slot (stable) -> segments
// - bag_value_grad:   the bag's row-sparse value gradient, each row summed over its reads in read order,
//                     and optionally its weight gradient in the same pass
// - lazy_adam_rows_:  LazyAdam's update of the rows with a gradient, in place, in torch's arithmetic
// - adamw_:           torch.optim.AdamW's CPU step on a group of dense parameters, in place, in its arithmetic
// - row_adagrad_rows_: RowAdagrad's update of the rows with a gradient, in place
// - slot_usage_update_: the slot-usage window's counts, a step's reads added and the oldest step's removed
//                     (a step kept as its reads or, when it read at least as many as there are slots,
//                     as a histogram over the slots)

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kPad = 16;  // candidate buffers hold n + kPad entries: whole vectors past the last one

#if defined(__AVX512F__)
// The lanes of the 16-wide vector at position a of a row of n entries that lie inside the row
inline __mmask16 lanes_within(int64_t a, int64_t n) {
  return a + 16 <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - a)) - 1);
}
#endif

template <typename scalar_t>
inline int32_t count_at_least(const scalar_t* x, int64_t n, scalar_t bound) {
  int32_t count = 0;
  for (int64_t a = 0; a < n; ++a) count += x[a] >= bound;
  return count;
}

#if defined(__AVX512F__)
// fp32 with AVX-512: count_at_least, compress_at_least and rank_candidates on 16 lanes, as the
// generic forms (above and below) do them one score at a time; the compress has no portable vector form
inline int32_t count_at_least(const float* x, int64_t n, float bound) {
  const __m512 b = _mm512_set1_ps(bound);
  int32_t count = 0;
  for (int64_t a = 0; a < n; a += 16) {
    const __mmask16 valid = lanes_within(a, n);
    count += __builtin_popcount(_mm512_mask_cmp_ps_mask(valid, _mm512_maskz_loadu_ps(valid, x + a), b, _CMP_GE_OQ));
  }
  return count;
}

inline int64_t compress_at_least(const float* s_n, int64_t n, float lo, float* cand_v, int32_t* cand_i) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 bound = _mm512_set1_ps(lo);
  int64_t count = 0;
  for (int64_t a = 0; a < n; a += 16) {
    const __mmask16 valid = lanes_within(a, n);
    const __m512 x = _mm512_maskz_loadu_ps(valid, s_n + a);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, x, bound, _CMP_GE_OQ);
    const __m512i index = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(a)));
    _mm512_storeu_ps(cand_v + count, _mm512_maskz_compress_ps(keep, x));
    _mm512_storeu_si512(cand_i + count, _mm512_maskz_compress_epi32(keep, index));
    count += __builtin_popcount(keep);
  }
  return count;
}

inline void rank_candidates(const float* cand_v, int64_t count, int64_t padded, int32_t* rank) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i one = _mm512_set1_epi32(1);
  // first without ties: the ranks sum to count (count - 1) / 2 exactly when no two candidates tie
  // (a tie lowers the later one's count of better candidates)
  int64_t sum = 0;
  for (int64_t b = 0; b < padded; b += 16) {
    const __m512 cand = _mm512_loadu_ps(cand_v + b);
    __m512i r = _mm512_setzero_si512();
    for (int64_t d = 0; d < count; ++d)
      r = _mm512_mask_add_epi32(r, _mm512_cmp_ps_mask(_mm512_set1_ps(cand_v[d]), cand, _CMP_GT_OQ), r, one);
    _mm512_storeu_si512(rank + b, r);
    const __mmask16 real = lanes_within(b, count);
    sum += _mm512_mask_reduce_add_epi32(real, r);
  }
  if (sum == count * (count - 1) / 2) return;
  for (int64_t b = 0; b < padded; b += 16) {
    const __m512 cand = _mm512_loadu_ps(cand_v + b);
    const __m512i place = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(b)));
    __m512i r = _mm512_setzero_si512();
    for (int64_t d = 0; d < count; ++d) {
      const __m512 x = _mm512_set1_ps(cand_v[d]);
      const __mmask16 after = _mm512_cmpgt_epi32_mask(place, _mm512_set1_epi32(static_cast<int32_t>(d)));
      const __mmask16 beaten = _mm512_cmp_ps_mask(x, cand, _CMP_GT_OQ) |
                               (_mm512_cmp_ps_mask(x, cand, _CMP_EQ_OQ) & after);
      r = _mm512_mask_add_epi32(r, beaten, r, one);
    }
    _mm512_storeu_si512(rank + b, r);
  }
}
#endif

// Raises a bound lo (count_at_least(s_n, n, lo) >= k) towards hi (the largest score) by bisection
// steps that keep >= k scores above it, until at most 1.5 k remain.
template <typename scalar_t>
inline scalar_t raise_bound(const scalar_t* __restrict__ s_n, int64_t n, int64_t k, scalar_t lo, scalar_t hi) {
  int32_t above = count_at_least(s_n, n, lo);
  for (int step = 0; step < 6 && above > k + k / 2; ++step) {
    const scalar_t mid = lo + (hi - lo) / 2;
    const int32_t count = count_at_least(s_n, n, mid);
    if (count >= k) {
      lo = mid;
      above = count;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// A bound lo with count_at_least(s_n, n, lo) >= k and few scores above it: the smallest of the
// maxima of k disjoint strided groups (each holds a score at or above it), raised by `raise_bound`.
template <typename scalar_t>
inline scalar_t topk_bound(const scalar_t* __restrict__ s_n, int64_t n, int64_t k, scalar_t* __restrict__ top_k) {
  const int64_t groups = n / k;
  for (int64_t l = 0; l < k; ++l) top_k[l] = s_n[l];
  for (int64_t g = 1; g < groups; ++g)
    for (int64_t l = 0; l < k; ++l) top_k[l] = s_n[g * k + l] > top_k[l] ? s_n[g * k + l] : top_k[l];
  scalar_t lo = top_k[0], hi = top_k[0];
  for (int64_t l = 1; l < k; ++l) {
    lo = top_k[l] < lo ? top_k[l] : lo;
    hi = top_k[l] > hi ? top_k[l] : hi;
  }
  for (int64_t a = groups * k; a < n; ++a) hi = s_n[a] > hi ? s_n[a] : hi;
  return raise_bound(s_n, n, k, lo, hi);
}

#if defined(__AVX512F__)
// fp32 with AVX-512, k <= 16 <= n: the groups are the 16 lanes of the row's vectors (every lane
// holds a score, so >= 16 >= k scores are at or above the smallest lane maximum lo), their maxima
// and its min / max taken in registers. Raised in one branch-free pass that counts the scores at
// or above lo + (hi - lo) / 4 and lo + (hi - lo) / 2 together, to the higher of them that keeps k
// (the bisection above takes 2.7 passes a row of 128 with a mispredicted branch or two; this
// leaves ~21.5 candidates against its ~20; the search op at top-16 of 128 takes 2-4% less).
// Any valid bound selects the same top-k.
inline float topk_bound(const float* __restrict__ s_n, int64_t n, int64_t k, float* __restrict__ top_k) {
  if (k > 16 || n < 16) return topk_bound<float>(s_n, n, k, top_k);
  __m512 lane_max = _mm512_loadu_ps(s_n);
  for (int64_t a = 16; a < n; a += 16) {
    const __mmask16 valid = lanes_within(a, n);
    lane_max = _mm512_mask_max_ps(lane_max, valid, _mm512_maskz_loadu_ps(valid, s_n + a), lane_max);
  }
  const float lo = _mm512_reduce_min_ps(lane_max), span = _mm512_reduce_max_ps(lane_max) - lo;
  const float quarter = lo + span * 0.25f, half = lo + span * 0.5f;  // NaN span: no score counts, lo stays
  const __m512 at_quarter = _mm512_set1_ps(quarter), at_half = _mm512_set1_ps(half);
  int32_t above_quarter = 0, above_half = 0;
  for (int64_t a = 0; a < n; a += 16) {
    const __mmask16 valid = lanes_within(a, n);
    const __m512 x = _mm512_maskz_loadu_ps(valid, s_n + a);
    above_quarter += __builtin_popcount(_mm512_mask_cmp_ps_mask(valid, x, at_quarter, _CMP_GE_OQ));
    above_half += __builtin_popcount(_mm512_mask_cmp_ps_mask(valid, x, at_half, _CMP_GE_OQ));
  }
  return above_half >= k ? half : above_quarter >= k ? quarter : lo;
}
#endif

// The scores at or above lo, in index order, into cand_v/cand_i -> their count.
template <typename scalar_t>
inline int64_t compress_at_least(const scalar_t* s_n, int64_t n, scalar_t lo, scalar_t* cand_v, int32_t* cand_i) {
  int64_t count = 0;
  for (int64_t a = 0; a < n; ++a) {
    cand_v[count] = s_n[a];
    cand_i[count] = static_cast<int32_t>(a);
    count += s_n[a] >= lo;
  }
  return count;
}

// rank[a] = #(candidates above a) + #(equal candidates before a): the place of a, best first,
// ties by index. Entries [count, padded) of cand_v hold -inf.
template <typename scalar_t>
inline void rank_candidates(const scalar_t* cand_v, int64_t count, int64_t padded, int32_t* rank) {
  for (int64_t a = 0; a < padded; ++a) rank[a] = 0;
  for (int64_t d = 0; d < count; ++d) {
    const scalar_t x = cand_v[d];
    for (int64_t a = 0; a < padded; ++a) rank[a] += (x > cand_v[a]) | ((x == cand_v[a]) & (d < a));
  }
}


// Top-k of one row of n scores into vals/ids (best first, ties by ascending index): a bound with
// ~k scores above it, those scores compressed in index order, each placed by its rank (no sort).
// vals/ids and the scratch cand_v, cand_i, rank hold n + kPad entries (vals/ids get every
// candidate, the k best first). NaN scores are never selected (with NaNs a
// row may come back short: its tail keeps NaN scores and index 0, a valid row).
template <typename scalar_t>
inline void row_topk(const scalar_t* s_n, int64_t n, int64_t k, scalar_t* vals, int64_t* ids,
                     scalar_t* cand_v, int32_t* cand_i, int32_t* rank) {
  int64_t count = compress_at_least(s_n, n, topk_bound(s_n, n, k, cand_v), cand_v, cand_i);
  if (count < k)  // only with NaNs (the bound may be NaN): every other score is a candidate
    count = compress_at_least(s_n, n, -std::numeric_limits<scalar_t>::infinity(), cand_v, cand_i);
  const int64_t padded = (count + kPad - 1) / kPad * kPad;
  for (int64_t a = count; a < padded; ++a) cand_v[a] = -std::numeric_limits<scalar_t>::infinity();
  rank_candidates(cand_v, count, padded, rank);
  for (int64_t r = count; r < k; ++r) {  // a short row (NaNs): the places no candidate takes
    vals[r] = std::numeric_limits<scalar_t>::quiet_NaN();
    ids[r] = 0;
  }
  for (int64_t a = 0; a < count; ++a) {  // ranks are distinct: a permutation of [0, count)
    vals[rank[a]] = cand_v[a];
    ids[rank[a]] = cand_i[a];
  }
}

// <x, y> over v entries: vectors of `bytes` bytes summed in a register, then across their lanes
template <typename scalar_t, int bytes>
inline scalar_t dot(const scalar_t* x, const scalar_t* y, int64_t v) {
  typedef scalar_t vec_t __attribute__((vector_size(bytes)));
  constexpr int64_t lanes = sizeof(vec_t) / sizeof(scalar_t);
  vec_t acc = {};
  int64_t c = 0;
  for (; c + lanes <= v; c += lanes) {
    vec_t a, b;
    std::memcpy(&a, x + c, sizeof(vec_t));
    std::memcpy(&b, y + c, sizeof(vec_t));
    acc += a * b;
  }
  scalar_t part[lanes];
  std::memcpy(part, &acc, sizeof(vec_t));
  for (int64_t width = lanes / 2; width > 0; width /= 2)  // pairwise: log2(lanes) dependent adds
    for (int64_t l = 0; l < width; ++l) part[l] += part[l + width];
  scalar_t total = part[0];
  for (; c < v; ++c) total += x[c] * y[c];
  return total;
}

// A read's weight gradient <grad_y row, value row> over v entries: 64-byte vectors for wide rows,
// 32 bytes for short ones (a shorter sum across the lanes)
template <typename scalar_t>
inline scalar_t read_dot(const scalar_t* grad_y, const scalar_t* row, int64_t v) {
  return v >= 128 ? dot<scalar_t, 64>(grad_y, row, v) : dot<scalar_t, 32>(grad_y, row, v);
}

// Asks for the v entries at `row` to be brought into cache (rows read a few reads ahead of their use:
// rows of a large table are cache misses, and the hardware prefetcher does not see where the next one is)
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t v) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < v * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(bytes + b);
}

constexpr int64_t kPrefetchAhead = 4;  // reads (or rows) ahead of the one in hand whose rows are prefetched

// Columns [c0, ...) of out_V = sum over `count` terms of w * row, (w, row) = term(at), in blocks of
// `vectors` vectors of `bytes` bytes, each summed in term order in a register (a block's vectors
// share one pass over the terms) -> the first column left over.
template <int bytes, int vectors, typename scalar_t, typename Term>
inline int64_t sum_vector_columns(scalar_t* __restrict__ out, int64_t c0, int64_t v, int64_t count, Term term) {
  typedef scalar_t vec_t __attribute__((vector_size(bytes)));
  constexpr int64_t lanes = sizeof(vec_t) / sizeof(scalar_t);
  for (; c0 + vectors * lanes <= v; c0 += vectors * lanes) {
    vec_t acc[vectors] = {};
    for (int64_t at = 0; at < count; ++at) {
      const auto [w, row] = term(at);
      for (int m = 0; m < vectors; ++m) {
        vec_t x;
        std::memcpy(&x, row + c0 + m * lanes, sizeof(vec_t));
        acc[m] += w * x;
      }
    }
    std::memcpy(out + c0, acc, sizeof(acc));
  }
  return c0;
}

// out_V = sum over `count` terms of w * row[0:v], (w, row) = term(at), each column summed in term
// order in a register: blocks of four, two, one 64-byte vectors of columns, then 16-byte vectors,
// then single columns (plain loops here get vectorised across the terms, with gathers, or chain
// every term through a store).
template <typename scalar_t, typename Term>
inline void weighted_row_sum(scalar_t* __restrict__ out, int64_t v, int64_t count, Term term) {
  int64_t c0 = sum_vector_columns<64, 4>(out, 0, v, count, term);
  c0 = sum_vector_columns<64, 2>(out, c0, v, count, term);
  c0 = sum_vector_columns<64, 1>(out, c0, v, count, term);
  c0 = sum_vector_columns<16, 1>(out, c0, v, count, term);
  for (int64_t c = c0; c < v; ++c) {
    scalar_t acc = 0;
    for (int64_t at = 0; at < count; ++at) {
      const auto [w, row] = term(at);
      acc += w * row[c];
    }
    out[c] = acc;
  }
}

}  // namespace

// scores_n[a] = <q_Q, key a>, keysT_Qn: the sub-keys as columns (sums over the Q dims in order)
template <typename scalar_t>
inline void score_sub_keys(const scalar_t* __restrict__ q_Q, const scalar_t* __restrict__ keysT_Qn, int64_t q,
                           int64_t n, scalar_t* __restrict__ scores_n) {
  for (int64_t a = 0; a < n; ++a) scores_n[a] = q_Q[0] * keysT_Qn[a];
  for (int64_t c = 1; c < q; ++c)
    for (int64_t a = 0; a < n; ++a) scores_n[a] += q_Q[c] * keysT_Qn[c * n + a];
}

#if defined(__AVX512F__)
// fp32 with AVX-512: 16 scores at a time summed over the Q dims in a register (the same order)
inline void score_sub_keys(const float* __restrict__ q_Q, const float* __restrict__ keysT_Qn, int64_t q,
                           int64_t n, float* __restrict__ scores_n) {
  int64_t a = 0;
  for (; a + 16 <= n; a += 16) {
    __m512 s = _mm512_mul_ps(_mm512_set1_ps(q_Q[0]), _mm512_loadu_ps(keysT_Qn + a));
    for (int64_t c = 1; c < q; ++c)
      s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_set1_ps(q_Q[c]), _mm512_loadu_ps(keysT_Qn + c * n + a)));
    _mm512_storeu_ps(scores_n + a, s);
  }
  for (; a < n; ++a) {
    float s = q_Q[0] * keysT_Qn[a];
    for (int64_t c = 1; c < q; ++c) s += q_Q[c] * keysT_Qn[c * n + a];
    scores_n[a] = s;
  }
}
#endif

// The candidate pairs' sums v1[pair_i[p]] + v2[pair_j[p]], p < pairs, from the two halves' sorted
// top-k lists (sums holds pairs + kPad entries); the pairs come in (i, j) order, so row i is the
// contiguous run of j < k / (i + 1), which this loop adds as vectors
template <typename scalar_t>
inline void pair_sums(const scalar_t* v1, const scalar_t* v2, const int32_t* pair_i, const int32_t* pair_j,
                      int64_t pairs, int64_t k, scalar_t* __restrict__ sums) {
  for (int64_t i = 0, p = 0; i < k; p += k / (i + 1), ++i)
    for (int64_t j = 0; j < k / (i + 1); ++j) sums[p + j] = v1[i] + v2[j];
}

#if defined(__AVX512F__)
// fp32 with AVX-512, k <= 16: both lists in a register each, 16 pairs at a time by permutes
// (pair_i/pair_j hold whole vectors: padded with position 0)
inline void pair_sums(const float* v1, const float* v2, const int32_t* pair_i, const int32_t* pair_j,
                      int64_t pairs, int64_t k, float* __restrict__ sums) {
  if (k > 16) return pair_sums<float>(v1, v2, pair_i, pair_j, pairs, k, sums);
  const __m512 a = _mm512_loadu_ps(v1), b = _mm512_loadu_ps(v2);
  for (int64_t p = 0; p < pairs; p += 16)
    _mm512_storeu_ps(sums + p, _mm512_add_ps(_mm512_permutexvar_ps(_mm512_loadu_si512(pair_i + p), a),
                                             _mm512_permutexvar_ps(_mm512_loadu_si512(pair_j + p), b)));
}
#endif

// The search of every (token, head) from its two rows of sub-key scores, row_scores(th, half,
// buffer) -> a pointer to them (scored into `buffer`, n entries, or found in a tensor): each
// half's top-k, then the top-k of the candidate pairs' sums.
// -> scores_THK, rows_THK (row = i1 * n + i2), both best first, and subs_THK2 (i1, i2 as int32).
template <typename scalar_t, typename RowScores>
std::vector<torch::Tensor> merge_search(int64_t tokens, int64_t heads, int64_t n, int64_t k,
                                        const torch::TensorOptions& options, RowScores row_scores) {
  TORCH_CHECK(k >= 1 && k <= n, "product-key search: topk must be in [1, n]");
  auto scores_THK = torch::empty({tokens, heads, k}, options);
  auto rows_THK = torch::empty({tokens, heads, k}, options.dtype(torch::kInt64));
  auto subs_THK2 = torch::empty({tokens, heads, k, 2}, options.dtype(torch::kInt32));
  // pairs (i, j) of positions in the two sorted top-k lists with (i + 1)(j + 1) <= k
  std::vector<int32_t> pair_i, pair_j;
  for (int32_t i = 0; i < k; ++i)
    for (int32_t j = 0; (i + 1) * (j + 1) <= k; ++j) {
      pair_i.push_back(i);
      pair_j.push_back(j);
    }
  const int64_t pairs = static_cast<int64_t>(pair_i.size());
  pair_i.resize(pairs + kPad, 0);
  pair_j.resize(pairs + kPad, 0);
  scalar_t* out_s = scores_THK.data_ptr<scalar_t>();
  int64_t* out_r = rows_THK.data_ptr<int64_t>();
  int32_t* out_sub = subs_THK2.data_ptr<int32_t>();
  at::parallel_for(0, tokens * heads, 256, [&](int64_t lo, int64_t hi) {
    const int64_t width = std::max(n, pairs) + kPad;
    std::vector<int64_t> i1(width), i2(width), pick(width);
    std::vector<int32_t> cand_i(width), rank(width);
    std::vector<scalar_t> v1(width), v2(width), vs(width), cand_v(width), sums(pairs + kPad), buffer(n);
    for (int64_t th = lo; th < hi; ++th) {
      const scalar_t* s1_n = row_scores(th, 0, buffer.data());
      row_topk(s1_n, n, k, v1.data(), i1.data(), cand_v.data(), cand_i.data(), rank.data());
      const scalar_t* s2_n = row_scores(th, 1, buffer.data());
      row_topk(s2_n, n, k, v2.data(), i2.data(), cand_v.data(), cand_i.data(), rank.data());
      // the candidate pairs' sums, in (i, j) order (row i: j < k / (i + 1)): equal sums rank by
      // (i, j), under which a pair is always preceded by the pairs that dominate it
      pair_sums(v1.data(), v2.data(), pair_i.data(), pair_j.data(), pairs, k, sums.data());
      row_topk(sums.data(), pairs, k, vs.data(), pick.data(), cand_v.data(), cand_i.data(), rank.data());
      scalar_t* os = out_s + th * k;
      int64_t* orr = out_r + th * k;
      int32_t* osub = out_sub + th * k * 2;
      for (int64_t r = 0; r < k; ++r) {
        const int64_t a = i1[pair_i[pick[r]]], b = i2[pair_j[pick[r]]];
        os[r] = vs[r];
        orr[r] = a * n + b;
        osub[2 * r] = static_cast<int32_t>(a);
        osub[2 * r + 1] = static_cast<int32_t>(b);
      }
    }
  });
  return {scores_THK, rows_THK, subs_THK2};
}

// The product-key search from the sub-key scores s1_HTn, s2_HTn of the two query halves (H, T, n).
std::vector<torch::Tensor> topk_merge(torch::Tensor s1_HTn, torch::Tensor s2_HTn, int64_t topk) {
  TORCH_CHECK(s1_HTn.dim() == 3 && s1_HTn.sizes() == s2_HTn.sizes(), "topk_merge: s1, s2 must be (H, T, n)");
  s1_HTn = s1_HTn.contiguous();
  s2_HTn = s2_HTn.contiguous();
  const int64_t heads = s1_HTn.size(0), tokens = s1_HTn.size(1), n = s1_HTn.size(2);
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(s1_HTn.scalar_type(), "topk_merge", [&] {
    const scalar_t* s[2] = {s1_HTn.data_ptr<scalar_t>(), s2_HTn.data_ptr<scalar_t>()};
    out = merge_search<scalar_t>(tokens, heads, n, topk, s1_HTn.options(), [&](int64_t th, int half, scalar_t*) {
      return s[half] + ((th % heads) * tokens + th / heads) * n;
    });
  });
  return out;
}

// The product-key search from the queries q_TH2Q (both halves of each (token, head) side by side)
// and the sub-keys keys_2HnQ: each row of sub-key scores computed where it is used (for small
// n * Q: the (H, T, n) scores are never stored).
std::vector<torch::Tensor> search_forward(torch::Tensor q_TH2Q, torch::Tensor keys_2HnQ, int64_t topk) {
  TORCH_CHECK(q_TH2Q.dim() == 4 && q_TH2Q.size(2) == 2, "search_forward: q must be (T, H, 2, Q)");
  TORCH_CHECK(keys_2HnQ.dim() == 4 && keys_2HnQ.size(0) == 2 && keys_2HnQ.size(1) == q_TH2Q.size(1) &&
              keys_2HnQ.size(3) == q_TH2Q.size(3), "search_forward: keys must be (2, H, n, Q)");
  q_TH2Q = q_TH2Q.contiguous();
  auto keysT_2HQn = keys_2HnQ.transpose(2, 3).contiguous();
  const int64_t tokens = q_TH2Q.size(0), heads = q_TH2Q.size(1), q = q_TH2Q.size(3), n = keys_2HnQ.size(2);
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(q_TH2Q.scalar_type(), "search_forward", [&] {
    const scalar_t* qs = q_TH2Q.data_ptr<scalar_t>();
    const scalar_t* ks = keysT_2HQn.data_ptr<scalar_t>();
    out = merge_search<scalar_t>(tokens, heads, n, topk, q_TH2Q.options(), [&](int64_t th, int half, scalar_t* buffer) {
      score_sub_keys(qs + (th * 2 + half) * q, ks + (half * heads + th % heads) * q * n, q, n, buffer);
      return static_cast<const scalar_t*>(buffer);
    });
  });
  return out;
}

// body(std::integral_constant<int64_t, Q>) with Q = q for the usual half key dims (loops over Q
// entries then unroll into a few vector ops), Q = 0 (use the runtime q) for any other
template <typename Body>
inline void with_fixed_dim(int64_t q, Body body) {
  switch (q) {
    case 4: return body(std::integral_constant<int64_t, 4>());
    case 8: return body(std::integral_constant<int64_t, 8>());
    case 16: return body(std::integral_constant<int64_t, 16>());
    case 32: return body(std::integral_constant<int64_t, 32>());
    case 64: return body(std::integral_constant<int64_t, 64>());
    default: return body(std::integral_constant<int64_t, 0>());
  }
}

// d scores_THK / d (q_TH2Q, keys_2HnQ) for scores = q[., ., 0] . keys[0, ., i1] + q[., ., 1] . keys[1, ., i2],
// (i1, i2) = subs_THK2 from the search -> (grad_q_TH2Q, grad_keys_2HnQ).
std::vector<torch::Tensor> search_backward(torch::Tensor grad_THK, torch::Tensor subs_THK2, torch::Tensor q_TH2Q,
                                           torch::Tensor keys_2HnQ) {
  grad_THK = grad_THK.contiguous();
  subs_THK2 = subs_THK2.contiguous();
  q_TH2Q = q_TH2Q.contiguous();
  keys_2HnQ = keys_2HnQ.contiguous();
  const int64_t tokens = q_TH2Q.size(0), heads = q_TH2Q.size(1), q = q_TH2Q.size(3);
  const int64_t n = keys_2HnQ.size(2), k = subs_THK2.size(2);
  auto grad_q = torch::empty_like(q_TH2Q), grad_keys = torch::empty_like(keys_2HnQ);
  AT_DISPATCH_FLOATING_TYPES(q_TH2Q.scalar_type(), "search_backward", [&] {
    const scalar_t* g = grad_THK.data_ptr<scalar_t>();
    const int32_t* subs = subs_THK2.data_ptr<int32_t>();
    // half `half` of (token, head) th: its query at (th * 2 + half) * q; its sub-keys at (half * heads + h) * n * q
    const scalar_t* qs = q_TH2Q.data_ptr<scalar_t>();
    const scalar_t* ks[2] = {keys_2HnQ.data_ptr<scalar_t>(), keys_2HnQ.data_ptr<scalar_t>() + heads * n * q};
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gks[2] = {grad_keys.data_ptr<scalar_t>(), grad_keys.data_ptr<scalar_t>() + heads * n * q};
    // query halves: one (token, head) per iteration
    at::parallel_for(0, tokens * heads, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t th = lo; th < hi; ++th) {
        const int64_t h = th % heads;
        for (int half = 0; half < 2; ++half) {
          weighted_row_sum(gq + (th * 2 + half) * q, q, k, [&](int64_t r) {
            return std::make_pair(g[th * k + r], ks[half] + (h * n + subs[(th * k + r) * 2 + half]) * q);
          });
        }
      }
    });
    // sub-keys: one (half, head) per iteration, tokens in order (fp64 accumulation for fp32)
    at::parallel_for(0, 2 * heads, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> acc(n * q);
      for (int64_t hh = lo; hh < hi; ++hh) {
        const int half = static_cast<int>(hh / heads);
        const int64_t h = hh % heads;
        std::fill(acc.begin(), acc.end(), 0.0);
        with_fixed_dim(q, [&](auto fixed) {
          constexpr int64_t kQ = decltype(fixed)::value;
          const int64_t qq = kQ > 0 ? kQ : q;
          for (int64_t t = 0; t < tokens; ++t) {
            const int64_t th = t * heads + h;
            const scalar_t* __restrict__ qv = qs + (th * 2 + half) * qq;
            for (int64_t r = 0; r < k; ++r) {
              const double w = g[th * k + r];
              double* __restrict__ a = acc.data() + subs[(th * k + r) * 2 + half] * qq;
              for (int64_t c = 0; c < qq; ++c) a[c] += w * qv[c];
            }
          }
        });
        scalar_t* out = gks[half] + h * n * q;
        for (int64_t i = 0; i < n * q; ++i) out[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return {grad_q, grad_keys};
}

// qk-norm over the last dim (Q) of x: y = x * rstd * gain, rstd = 1 / sqrt(mean(x^2) + eps) per row
// (sums of squares in fp64 for fp32; gain: (Q,) or undefined for none) -> (y like x, rstd (rows,))
std::vector<torch::Tensor> rms_rows(torch::Tensor x, c10::optional<torch::Tensor> gain_Q, double eps) {
  x = x.contiguous();
  const int64_t q = x.size(-1), rows = x.numel() / q;
  torch::Tensor gain = gain_Q.has_value() ? gain_Q->contiguous().to(x.scalar_type()) : torch::Tensor();
  TORCH_CHECK(!gain.defined() || gain.numel() == q, "rms_rows: gain must have the rows' length");
  auto y = torch::empty_like(x), rstd_R = torch::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_rows", [&] {
    const scalar_t* xs = x.data_ptr<scalar_t>();
    const scalar_t* g = gain.defined() ? gain.data_ptr<scalar_t>() : nullptr;
    scalar_t* ys = y.data_ptr<scalar_t>();
    scalar_t* rs = rstd_R.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* xr = xs + r * q;
        double squares = 0;
        for (int64_t c = 0; c < q; ++c) squares += static_cast<double>(xr[c]) * xr[c];
        const scalar_t rstd = static_cast<scalar_t>(1.0 / std::sqrt(squares / q + eps));
        rs[r] = rstd;
        for (int64_t c = 0; c < q; ++c) ys[r * q + c] = g ? xr[c] * rstd * g[c] : xr[c] * rstd;
      }
    });
  });
  return {y, rstd_R};
}

// d rms_rows / d (x, gain): with u = x * rstd (the unit-RMS row) and gy = grad_y * gain,
// grad_x = rstd * (gy - u * mean(gy * u)) and grad_gain = sum over rows of grad_y * u (fp64
// accumulation for fp32, rows in order) -> (grad_x like x, grad_gain (Q,), empty without a gain)
std::vector<torch::Tensor> rms_rows_backward(torch::Tensor grad_y, torch::Tensor x, torch::Tensor rstd_R,
                                             c10::optional<torch::Tensor> gain_Q) {
  grad_y = grad_y.contiguous();
  x = x.contiguous();
  rstd_R = rstd_R.contiguous();
  const int64_t q = x.size(-1), rows = x.numel() / q;
  torch::Tensor gain = gain_Q.has_value() ? gain_Q->contiguous().to(x.scalar_type()) : torch::Tensor();
  auto grad_x = torch::empty_like(x);
  auto grad_gain = torch::zeros({gain.defined() ? q : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_rows_backward", [&] {
    const scalar_t* gys = grad_y.data_ptr<scalar_t>();
    const scalar_t* xs = x.data_ptr<scalar_t>();
    const scalar_t* rs = rstd_R.data_ptr<scalar_t>();
    const scalar_t* g = gain.defined() ? gain.data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1024, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> gy(q);
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t rstd = rs[r];
        scalar_t dot = 0;
        for (int64_t c = 0; c < q; ++c) {
          gy[c] = g ? gys[r * q + c] * g[c] : gys[r * q + c];
          dot += gy[c] * (xs[r * q + c] * rstd);
        }
        const scalar_t mean = dot / static_cast<scalar_t>(q);
        for (int64_t c = 0; c < q; ++c) gx[r * q + c] = rstd * (gy[c] - xs[r * q + c] * rstd * mean);
      }
    });
    if (g) {
      std::vector<double> acc(q, 0.0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < q; ++c) acc[c] += static_cast<double>(gys[r * q + c]) * (xs[r * q + c] * rs[r]);
      scalar_t* gg = grad_gain.data_ptr<scalar_t>();
      for (int64_t c = 0; c < q; ++c) gg[c] = static_cast<scalar_t>(acc[c]);
    }
  });
  return {grad_x, grad_gain};
}

// Reads ahead of the one in hand whose value rows the bag's forward prefetches (measured at 16k
// slots, V 32, the table out of cache: 0.64 -> 0.44 ms a forward; 4 and 8 reads ahead gained less)
constexpr int64_t kBagForwardAhead = 16;

#if defined(__AVX512F__)
// The bag's forward for tokens [lo, hi): each column of y_TV[t] one fused multiply-add per read, in
// read order, from zero. `vectors` 64-byte vectors of fp32 a row (v = 16 * vectors), summed in registers.
template <int vectors>
inline void bag_forward_rows(const float* vals, const int64_t* slots, const float* w, float* y, int64_t reads,
                             int64_t n_slots, int64_t lo, int64_t hi) {
  constexpr int64_t v = 16 * vectors;
  for (int64_t t = lo; t < hi; ++t) {
    __m512 acc[vectors];
    for (int m = 0; m < vectors; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < reads; ++j) {
      const int64_t at = t * reads + j;
      if (at + kBagForwardAhead < hi * reads) prefetch_row(vals + slots[at + kBagForwardAhead] * v, v);
      TORCH_CHECK(slots[at] >= 0 && slots[at] < n_slots, "bag_forward: slot out of range");
      const float* row = vals + slots[at] * v;
      const __m512 weight = _mm512_set1_ps(w[at]);
      for (int m = 0; m < vectors; ++m) acc[m] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(row + 16 * m), acc[m]);
    }
    for (int m = 0; m < vectors; ++m) _mm512_storeu_ps(y + t * v + 16 * m, acc[m]);
  }
}
#endif

// y_TV[t] = sum over j of weights_TR[t, j] * values_NV[slots_TR[t, j]] for fp32 rows of 16, 32, 48
// or 64 entries with AVX-512: every column one fused multiply-add per read, in read order, from zero,
// which is how F.embedding_bag's CPU kernel (fbgemm's) sums them (the tests hold the two equal bit
// for bit), with the value rows prefetched ahead (in a training step the table is not in cache).
// -> None for any other dtype, width or CPU (the caller then uses F.embedding_bag).
c10::optional<torch::Tensor> bag_forward(torch::Tensor values_NV, torch::Tensor slots_TR, torch::Tensor weights_TR) {
  const int64_t v = values_NV.size(1);
#if defined(__AVX512F__)
  if (values_NV.scalar_type() == torch::kFloat32 && v % 16 == 0 && v >= 16 && v <= 64) {
    values_NV = values_NV.contiguous();
    slots_TR = slots_TR.contiguous();
    weights_TR = weights_TR.contiguous().to(torch::kFloat32);
    const int64_t tokens = slots_TR.size(0), reads = slots_TR.size(1), n_slots = values_NV.size(0);
    auto y_TV = torch::empty({tokens, v}, values_NV.options());
    const float* vals = values_NV.data_ptr<float>();
    const int64_t* slots = slots_TR.data_ptr<int64_t>();
    const float* w = weights_TR.data_ptr<float>();
    float* y = y_TV.data_ptr<float>();
    at::parallel_for(0, tokens, 64, [&](int64_t lo, int64_t hi) {
      switch (v / 16) {
        case 1: return bag_forward_rows<1>(vals, slots, w, y, reads, n_slots, lo, hi);
        case 2: return bag_forward_rows<2>(vals, slots, w, y, reads, n_slots, lo, hi);
        case 3: return bag_forward_rows<3>(vals, slots, w, y, reads, n_slots, lo, hi);
        default: return bag_forward_rows<4>(vals, slots, w, y, reads, n_slots, lo, hi);
      }
    });
    return y_TV;
  }
#endif
  return c10::nullopt;
}

// grad_TR[t, j] = <grad_y_TV[t], values_NV[slots_TR[t, j]]>
torch::Tensor bag_weight_grad(torch::Tensor values_NV, torch::Tensor slots_TR, torch::Tensor grad_y_TV) {
  values_NV = values_NV.contiguous();
  slots_TR = slots_TR.contiguous();
  grad_y_TV = grad_y_TV.contiguous().to(values_NV.scalar_type());
  const int64_t tokens = slots_TR.size(0), reads = slots_TR.size(1), v = values_NV.size(1);
  auto grad_TR = torch::empty({tokens, reads}, values_NV.options());
  AT_DISPATCH_FLOATING_TYPES(values_NV.scalar_type(), "bag_weight_grad", [&] {
    const scalar_t* vals = values_NV.data_ptr<scalar_t>();
    const scalar_t* gy = grad_y_TV.data_ptr<scalar_t>();
    const int64_t* slots = slots_TR.data_ptr<int64_t>();
    scalar_t* out = grad_TR.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t)
        for (int64_t j = 0; j < reads; ++j) {
          const int64_t at = t * reads + j;
          if (at + kPrefetchAhead < hi * reads) prefetch_row(vals + slots[at + kPrefetchAhead] * v, v);
          out[at] = read_dot(gy + t * v, vals + slots[at] * v, v);
        }
    });
  });
  return grad_TR;
}

// The first pass of a counting sort of `reads` slots: start[s] = how many reads precede slot s's
// segment (n_slots + 1 entries); returns how many distinct slots were read.
int64_t segment_starts(const int64_t* slots, int64_t reads, int64_t n_slots, std::vector<int64_t>& start,
                       const char* op) {
  start.assign(n_slots + 1, 0);
  for (int64_t l = 0; l < reads; ++l) {
    TORCH_CHECK(slots[l] >= 0 && slots[l] < n_slots, op, ": slot out of range");
    ++start[slots[l] + 1];
  }
  int64_t unique = 0;
  for (int64_t s = 0; s < n_slots; ++s) {
    unique += start[s + 1] > 0;
    start[s + 1] += start[s];
  }
  return unique;
}

// Stable counting sort of the reads slots_L by slot -> (unique_U, start_U1, read_L).
std::vector<torch::Tensor> sort_reads(torch::Tensor slots_L, int64_t n_slots) {
  slots_L = slots_L.contiguous();
  const int64_t reads = slots_L.numel();
  const int64_t* slots = slots_L.data_ptr<int64_t>();
  std::vector<int64_t> start;
  const int64_t unique = segment_starts(slots, reads, n_slots, start, "sort_reads");
  auto opts = slots_L.options();
  auto unique_U = torch::empty({unique}, opts), start_U1 = torch::empty({unique + 1}, opts);
  auto read_L = torch::empty({reads}, opts);
  int64_t* u_out = unique_U.data_ptr<int64_t>();
  int64_t* s_out = start_U1.data_ptr<int64_t>();
  int64_t* r_out = read_L.data_ptr<int64_t>();
  int64_t u = 0;
  for (int64_t s = 0; s < n_slots; ++s) {
    if (start[s + 1] > start[s]) {
      u_out[u] = s;
      s_out[u++] = start[s];
    }
  }
  s_out[unique] = reads;
  for (int64_t l = 0; l < reads; ++l) r_out[start[slots[l]]++] = l;
  return {unique_U, start_U1, read_L};
}

// The value gradient of y_TV[t] = sum_j weights_TR[t, j] * values[slots_TR[t, j]], row-sparse:
// -> (unique_U, grad_UV) with grad_UV[u] = sum over the reads (t, j) of slot unique_U[u], in read
// order, of weights_TR[t, j] * grad_y_TV[t], in grad_y's dtype: `sort_reads`'s segments, summed
// one row at a time (the rows are written once, in order; grad_y rows are read where needed).
// With values_NV given (same dtype as grad_y), also the weight gradient grad_TR[t, j] =
// <grad_y_TV[t], values_NV[slots_TR[t, j]]> in the same pass, while the slot's value row is in
// cache (each entry is the dot product `bag_weight_grad` computes, so the results are the same)
// -> (unique_U, grad_UV, grad_TR); without it grad_TR is empty.
std::vector<torch::Tensor> bag_value_grad(torch::Tensor slots_TR, torch::Tensor weights_TR, torch::Tensor grad_y_TV,
                                          int64_t n_slots, c10::optional<torch::Tensor> values_NV) {
  slots_TR = slots_TR.contiguous();
  grad_y_TV = grad_y_TV.contiguous();
  weights_TR = weights_TR.contiguous().to(grad_y_TV.scalar_type());
  const int64_t tokens = slots_TR.size(0), reads = slots_TR.size(1), v = grad_y_TV.size(1);
  const bool with_weights = values_NV.has_value();
  torch::Tensor values = with_weights ? values_NV->contiguous() : torch::Tensor();
  TORCH_CHECK(!with_weights || (values.scalar_type() == grad_y_TV.scalar_type() && values.dim() == 2 &&
                                values.size(0) == n_slots && values.size(1) == v),
              "bag_value_grad: values_NV must be (n_slots, V) in grad_y's dtype");
  const int64_t* slots = slots_TR.data_ptr<int64_t>();
  std::vector<int64_t> end;  // segment starts, then (as reads are placed) where each segment ends
  const int64_t unique = segment_starts(slots, tokens * reads, n_slots, end, "bag_value_grad");
  std::vector<int32_t> read_L(tokens * reads), token_L(tokens * reads);  // the reads sorted by slot
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < reads; ++j) {
      const int64_t at = end[slots[t * reads + j]]++;
      read_L[at] = static_cast<int32_t>(t * reads + j);
      token_L[at] = static_cast<int32_t>(t);
    }
  auto unique_U = torch::empty({unique}, slots_TR.options());
  auto grad_UV = torch::empty({unique, v}, grad_y_TV.options());
  auto grad_TR = with_weights ? torch::empty({tokens, reads}, grad_y_TV.options()) : torch::empty({0}, grad_y_TV.options());
  int64_t* u_out = unique_U.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(grad_y_TV.scalar_type(), "bag_value_grad", [&] {
    const scalar_t* gy = grad_y_TV.data_ptr<scalar_t>();
    const scalar_t* w = weights_TR.data_ptr<scalar_t>();
    const scalar_t* vals = with_weights ? values.data_ptr<scalar_t>() : nullptr;
    scalar_t* out = grad_UV.data_ptr<scalar_t>();
    scalar_t* out_w = with_weights ? grad_TR.data_ptr<scalar_t>() : nullptr;
    int64_t u = 0, begin = 0;
    for (int64_t s = 0; s < n_slots; ++s) {
      if (end[s] == begin) continue;
      u_out[u] = s;
      weighted_row_sum(out + u * v, v, end[s] - begin, [&](int64_t at) {
        return std::make_pair(w[read_L[begin + at]], gy + token_L[begin + at] * v);
      });
      if (with_weights) {
        const scalar_t* row = vals + s * v;
        for (int64_t at = begin; at < end[s]; ++at) out_w[read_L[at]] = read_dot(gy + token_L[at] * v, row, v);
      }
      begin = end[s];
      ++u;
    }
  });
  return {unique_U, grad_UV, grad_TR};
}

// Adam's per-step factors (-lr / (1 - beta1^s), sqrt(1 - beta2^s)) in fp64, as torch's Adam computes
// them in Python; tabulated once per step count in the range of this call's counts when that range
// is shorter than the rows (a pow per row costs about as much as the row's update).
class BiasCorrections {
 public:
  BiasCorrections(const int32_t* steps, const int64_t* rows, int64_t n_rows, double lr, double beta1, double beta2)
      : lr_(lr), beta1_(beta1), beta2_(beta2) {
    int32_t lo = std::numeric_limits<int32_t>::max(), hi = 0;
    for (int64_t u = 0; u < n_rows; ++u) {
      lo = std::min(lo, steps[rows[u]] + 1);
      hi = std::max(hi, steps[rows[u]] + 1);
    }
    if (n_rows > 0 && hi - lo < n_rows) {
      first_ = lo;
      for (int32_t s = lo; s <= hi; ++s) table_.push_back(compute(s));
    }
  }

  std::pair<double, double> operator()(int32_t s) const {
    return table_.empty() ? compute(s) : table_[s - first_];
  }

 private:
  std::pair<double, double> compute(int32_t s) const {
    return {-lr_ / (1 - std::pow(beta1_, static_cast<double>(s))), std::sqrt(1 - std::pow(beta2_, static_cast<double>(s)))};
  }

  double lr_, beta1_, beta2_;
  int32_t first_ = 0;
  std::vector<std::pair<double, double>> table_;
};

// m[0:v] = torch's lerp(m, g, w), in place: fma(w, g - m, m) for small weights, fma(w - 1, g - m, g)
// for the others, as torch's vectorised CPU lerp computes it
template <typename scalar_t>
inline void lerp_row(scalar_t* __restrict__ m, const scalar_t* __restrict__ g, scalar_t w, int64_t v) {
  const bool from_start = w < scalar_t(0.5);
  const scalar_t a = from_start ? w : w - 1;
  for (int64_t c = 0; c < v; ++c) m[c] = std::fma(a, g[c] - m[c], from_start ? m[c] : g[c]);
}

#if defined(__AVX512F__)
// fp32 with AVX-512: the same fused multiply-adds on 16 lanes (gcc leaves the generic form scalar)
inline void lerp_row(float* __restrict__ m, const float* __restrict__ g, float w, int64_t v) {
  const bool from_start = w < 0.5f;
  const __m512 a = _mm512_set1_ps(from_start ? w : w - 1);
  for (int64_t c = 0; c < v; c += 16) {
    const __mmask16 valid = lanes_within(c, v);
    const __m512 mv = _mm512_maskz_loadu_ps(valid, m + c), gv = _mm512_maskz_loadu_ps(valid, g + c);
    _mm512_mask_storeu_ps(m + c, valid, _mm512_fmadd_ps(a, _mm512_sub_ps(gv, mv), from_start ? mv : gv));
  }
}
#endif

// Adam's moments of one row of v entries, in place, in torch's arithmetic: the first moment
// lerp(m, g, w1), the second sq * b2 then addcmul(g, g, c2) (one fused multiply-add, as torch's
// vectorised kernel rounds it)
template <typename scalar_t>
inline void adam_moments_row(scalar_t* __restrict__ m, scalar_t* __restrict__ sq, const scalar_t* __restrict__ g,
                             scalar_t w1, scalar_t b2, scalar_t c2, int64_t v) {
  lerp_row(m, g, w1, v);
  for (int64_t c = 0; c < v; ++c) sq[c] = std::fma(c2 * g[c], g[c], sq[c] * b2);
}

// Adam's parameter update of one row, in place: p (times `decay` when `decayed`: AdamW's decoupled
// weight decay, applied first) + (neg_step * m) / (root / bc2_sqrt + e), root the square roots of
// the second moment, in torch's order of operations (addcdiv's value * m / denom)
template <typename scalar_t>
inline void adam_update_row(scalar_t* __restrict__ p, const scalar_t* __restrict__ m, const scalar_t* __restrict__ root,
                            scalar_t neg_step, scalar_t bc2_sqrt, scalar_t e, bool decayed, scalar_t decay, int64_t v) {
  for (int64_t c = 0; c < v; ++c) {
    const scalar_t update = m[c] * neg_step / (root[c] / bc2_sqrt + e);
    p[c] = decayed ? p[c] * decay + update : p[c] + update;
  }
}

// value_optim.LazyAdam's step on the rows rows_U (distinct) of param_NV, in place, with their
// gradient grad_UV: the torch path's arithmetic op for op (fp32 ops on fp32 tables, bias
// corrections in fp64), including the one rounding of the fused multiply-adds in which torch's
// vectorised CPU lerp and addcmul compute (the caller checks that torch's build does so). The
// square roots are torch's own (at::sqrt_ on the rows' second moments: torch's CPU sqrt is not
// always the correctly rounded one), so a step is three passes over the U rows: moments, sqrt,
// parameters. The moments' and parameters' rows are prefetched a few rows ahead: in a training step
// they come from memory (the rows are sorted but sparse, which the hardware prefetcher does not follow).
void lazy_adam_rows_(torch::Tensor param_NV, torch::Tensor exp_avg_NV, torch::Tensor exp_avg_sq_NV,
                     torch::Tensor step_N, torch::Tensor rows_U, torch::Tensor grad_UV, double lr, double beta1,
                     double beta2, double eps, double weight_decay) {
  for (const auto& t : {param_NV, exp_avg_NV, exp_avg_sq_NV, step_N})
    TORCH_CHECK(t.is_contiguous(), "lazy_adam_rows_: the parameter and its state must be contiguous");
  TORCH_CHECK(step_N.scalar_type() == torch::kInt32, "lazy_adam_rows_: the step counts must be int32");
  rows_U = rows_U.contiguous();
  grad_UV = grad_UV.contiguous().to(param_NV.scalar_type());
  const int64_t v = param_NV.size(1), n_rows = rows_U.numel();
  const int64_t* rows = rows_U.data_ptr<int64_t>();
  int32_t* steps = step_N.data_ptr<int32_t>();
  auto root_UV = torch::empty({n_rows, v}, param_NV.options());
  AT_DISPATCH_FLOATING_TYPES(param_NV.scalar_type(), "lazy_adam_rows_", [&] {
    scalar_t* m = exp_avg_NV.data_ptr<scalar_t>();
    scalar_t* sq = exp_avg_sq_NV.data_ptr<scalar_t>();
    const scalar_t* g = grad_UV.data_ptr<scalar_t>();
    scalar_t* root = root_UV.data_ptr<scalar_t>();
    const scalar_t w1 = static_cast<scalar_t>(1 - beta1), b2 = static_cast<scalar_t>(beta2);
    const scalar_t c2 = static_cast<scalar_t>(1 - beta2);
    at::parallel_for(0, n_rows, 64, [&, w1, b2, c2](int64_t lo, int64_t hi) {  // constants by value: the loops vectorise
      for (int64_t u = lo; u < hi; ++u) {
        if (u + kPrefetchAhead < hi) {
          prefetch_row(m + rows[u + kPrefetchAhead] * v, v);
          prefetch_row(sq + rows[u + kPrefetchAhead] * v, v);
        }
        scalar_t* __restrict__ mr = m + rows[u] * v;
        scalar_t* __restrict__ sr = sq + rows[u] * v;
        scalar_t* __restrict__ rr = root + u * v;
        const scalar_t* __restrict__ gr = g + u * v;
        adam_moments_row(mr, sr, gr, w1, b2, c2, v);
        std::memcpy(rr, sr, v * sizeof(scalar_t));
      }
    });
    root_UV.sqrt_();
    const BiasCorrections bias(steps, rows, n_rows, lr, beta1, beta2);
    scalar_t* p = param_NV.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps), decay = static_cast<scalar_t>(1 - lr * weight_decay);
    at::parallel_for(0, n_rows, 64, [&, e, decay, weight_decay](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        if (u + kPrefetchAhead < hi) prefetch_row(p + rows[u + kPrefetchAhead] * v, v);
        const auto [neg_step_d, bc2_sqrt_d] = bias(++steps[rows[u]]);
        const scalar_t neg_step = static_cast<scalar_t>(neg_step_d), bc2_sqrt = static_cast<scalar_t>(bc2_sqrt_d);
        adam_update_row(p + rows[u] * v, m + rows[u] * v, root + u * v, neg_step, bc2_sqrt, e, weight_decay != 0, decay, v);
      }
    });
  });
  for (const auto& t : {param_NV, exp_avg_NV, exp_avg_sq_NV, step_N}) t.unsafeGetTensorImpl()->bump_version();
}

// torch.optim.AdamW's step (its for-loop form, which torch takes on CPU; decoupled weight decay, no
// amsgrad) on every parameter of one group, in place, in its arithmetic op for op: step += 1, the
// bias corrections in fp64 as Python computes them (1 - beta ** step, lr / bc1, bc2 ** 0.5: where
// LazyAdam's torch path takes a sqrt), then `lazy_adam_rows_`'s row arithmetic over the whole
// parameter (`adam_moments_row`, torch's own sqrt, `adam_update_row` with the decay p * (1 - lr * wd)).
// One call for the group in place of ~10 torch ops per parameter. steps: each parameter's 0-dim fp32 or fp64 step count.
void adamw_(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads, std::vector<torch::Tensor> exp_avgs,
            std::vector<torch::Tensor> exp_avg_sqs, std::vector<torch::Tensor> steps, double lr, double beta1,
            double beta2, double eps, double weight_decay) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count && steps.size() == count,
              "adamw_: one gradient, two moments and a step count per parameter");
  for (size_t i = 0; i < count; ++i) {
    torch::Tensor p = params[i], m = exp_avgs[i], sq = exp_avg_sqs[i], step = steps[i];
    torch::Tensor g = grads[i].contiguous();
    for (const auto& t : {p, m, sq})
      TORCH_CHECK(t.is_contiguous() && t.scalar_type() == p.scalar_type() && t.numel() == p.numel(),
                  "adamw_: a parameter and its moments must be contiguous, of one dtype and size");
    TORCH_CHECK(g.scalar_type() == p.scalar_type() && g.numel() == p.numel(), "adamw_: a gradient must match its parameter");
    TORCH_CHECK(step.numel() == 1 && (step.scalar_type() == torch::kFloat32 || step.scalar_type() == torch::kFloat64),
                "adamw_: a step count must be a 0-dim fp32 or fp64 tensor");
    double s;
    if (step.scalar_type() == torch::kFloat32) {
      s = static_cast<double>(*step.data_ptr<float>() += 1.0f);
    } else {
      s = *step.data_ptr<double>() += 1.0;
    }
    const double neg_step_d = -lr / (1 - std::pow(beta1, s)), bc2_sqrt_d = std::pow(1 - std::pow(beta2, s), 0.5);
    const int64_t n = p.numel();
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "adamw_", [&] {
      scalar_t* pp = p.data_ptr<scalar_t>();
      scalar_t* mp = m.data_ptr<scalar_t>();
      scalar_t* sp = sq.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t w1 = static_cast<scalar_t>(1 - beta1), b2 = static_cast<scalar_t>(beta2);
      const scalar_t c2 = static_cast<scalar_t>(1 - beta2), decay = static_cast<scalar_t>(1 - lr * weight_decay);
      at::parallel_for(0, n, 1 << 15, [&, w1, b2, c2](int64_t lo, int64_t hi) {
        adam_moments_row(mp + lo, sp + lo, gp + lo, w1, b2, c2, hi - lo);
      });
      const torch::Tensor root = sq.sqrt();  // torch's own square roots
      const scalar_t* rp = root.data_ptr<scalar_t>();
      const scalar_t neg_step = static_cast<scalar_t>(neg_step_d), bc2_sqrt = static_cast<scalar_t>(bc2_sqrt_d);
      const scalar_t e = static_cast<scalar_t>(eps);
      at::parallel_for(0, n, 1 << 15, [&, neg_step, bc2_sqrt, e, decay](int64_t lo, int64_t hi) {
        adam_update_row(pp + lo, mp + lo, rp + lo, neg_step, bc2_sqrt, e, weight_decay != 0, decay, hi - lo);
      });
    });
    for (const auto& t : {p, m, sq, step}) t.unsafeGetTensorImpl()->bump_version();
  }
}

// value_optim.RowAdagrad's step on the rows rows_U (distinct) of param_NV, in place:
// sum_N[row] += mean over the row of grad^2 (in sum_N's dtype), then
// param[row] += grad * (1 / (sqrt(sum_N[row]) + eps)) * -lr, with torch's own sqrt (as the torch
// path: at::sqrt_ on the rows' sums) and the torch path's order of operations, but for each row's
// sum of squares, taken in vector lanes (torch's mean sums in an order of its own: equal within
// rounding, as the tests hold it).
void row_adagrad_rows_(torch::Tensor param_NV, torch::Tensor sum_N, torch::Tensor rows_U, torch::Tensor grad_UV,
                       double lr, double eps) {
  TORCH_CHECK(param_NV.is_contiguous() && sum_N.is_contiguous(), "row_adagrad_rows_: the parameter and its state must be contiguous");
  rows_U = rows_U.contiguous();
  grad_UV = grad_UV.contiguous().to(param_NV.scalar_type());
  const int64_t v = param_NV.size(1), n_rows = rows_U.numel();
  const int64_t* rows = rows_U.data_ptr<int64_t>();
  auto root_U = torch::empty({n_rows}, sum_N.options());
  AT_DISPATCH_FLOATING_TYPES(param_NV.scalar_type(), "row_adagrad_rows_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(sum_N.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "row_adagrad_rows_: sums must be fp32 (fp64 for fp64)");
    acc_t* sums = sum_N.data_ptr<acc_t>();
    acc_t* root = root_U.data_ptr<acc_t>();
    const scalar_t* g = grad_UV.data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {  // the row's sum of squares in vector lanes (a scalar sum is one long chain)
        const acc_t square = static_cast<acc_t>(read_dot(g + u * v, g + u * v, v));
        root[u] = sums[rows[u]] += square / static_cast<acc_t>(v);
      }
    });
    root_U.sqrt_();
    scalar_t* p = param_NV.data_ptr<scalar_t>();
    const acc_t neg_lr = static_cast<acc_t>(-lr), e = static_cast<acc_t>(eps);
    at::parallel_for(0, n_rows, 64, [&, neg_lr, e](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        if (u + kPrefetchAhead < hi) prefetch_row(p + rows[u + kPrefetchAhead] * v, v);
        const scalar_t scale = static_cast<scalar_t>(acc_t(1) / (root[u] + e) * neg_lr);
        scalar_t* __restrict__ pr = p + rows[u] * v;
        const scalar_t* __restrict__ gr = g + u * v;
        for (int64_t c = 0; c < v; ++c) pr[c] += gr[c] * scale;
      }
    });
  });
  param_NV.unsafeGetTensorImpl()->bump_version();
  sum_N.unsafeGetTensorImpl()->bump_version();
}

// Slot-usage counts (memlayers/kernels/usage.py): counts_N[s] += 1 for every slot s of new_L (int32
// or int64, range-checked before anything is counted) and -= 1 for every read of the leaving step
// `old` (int32, an earlier call's return; may be empty): its slots, or with old_is_histogram its
// count per slot -> what the window keeps of this step: new_L as int32, or with keep_histogram
// its count per slot (N entries). One pass over each.
torch::Tensor slot_usage_update_(torch::Tensor counts_N, torch::Tensor new_L, torch::Tensor old, bool keep_histogram,
                                 bool old_is_histogram) {
  TORCH_CHECK(counts_N.scalar_type() == torch::kInt32 && counts_N.is_contiguous(), "slot_usage_update_: counts must be contiguous int32");
  TORCH_CHECK(old.scalar_type() == torch::kInt32, "slot_usage_update_: the leaving step must be int32");
  TORCH_CHECK(new_L.scalar_type() == torch::kInt32 || new_L.scalar_type() == torch::kInt64,
              "slot_usage_update_: slots must be int32 or int64");
  new_L = new_L.reshape(-1).contiguous();
  old = old.reshape(-1).contiguous();
  const int64_t n = counts_N.numel(), reads = new_L.numel();
  TORCH_CHECK(!old_is_histogram || old.numel() == n, "slot_usage_update_: a leaving histogram must have one count per slot");
  auto kept = keep_histogram ? torch::zeros({n}, new_L.options().dtype(torch::kInt32))
                             : torch::empty({reads}, new_L.options().dtype(torch::kInt32));
  int32_t* counts = counts_N.data_ptr<int32_t>();
  int32_t* out = kept.data_ptr<int32_t>();
  AT_DISPATCH_INDEX_TYPES(new_L.scalar_type(), "slot_usage_update_", [&] {
    const index_t* fresh = new_L.data_ptr<index_t>();
    int64_t lo = reads ? fresh[0] : 0, hi = lo;
    for (int64_t l = 0; l < reads; ++l) {
      lo = std::min<int64_t>(lo, fresh[l]);
      hi = std::max<int64_t>(hi, fresh[l]);
    }
    TORCH_CHECK(lo >= 0 && hi < std::max<int64_t>(n, 1), "slots: must be in [0, ", n, "), got [", lo, ", ", hi, "]");
    if (keep_histogram) {
      for (int64_t l = 0; l < reads; ++l) ++out[fresh[l]];
    } else {
      for (int64_t l = 0; l < reads; ++l) out[l] = static_cast<int32_t>(fresh[l]);
    }
  });
  if (keep_histogram) {
    for (int64_t s = 0; s < n; ++s) counts[s] += out[s];
  } else {
    for (int64_t l = 0; l < reads; ++l) ++counts[out[l]];
  }
  const int32_t* leaving = old.data_ptr<int32_t>();
  if (old_is_histogram) {
    for (int64_t s = 0; s < n; ++s) counts[s] -= leaving[s];
  } else {
    for (int64_t l = 0; l < old.numel(); ++l) --counts[leaving[l]];
  }
  counts_N.unsafeGetTensorImpl()->bump_version();
  return kept;
}
