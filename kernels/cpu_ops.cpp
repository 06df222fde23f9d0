// CPU ops of the memory layers (built by memlayers/kernels/cpu_ops.py with torch's cpp_extension).
//
// Shape suffixes: see docs/shapes.md. Every op is deterministic: work is split over threads
// only where each output element is written by one thread, in a fixed order.
//
// - topk_merge:       per (token, head), the top-k of each half's sub-key scores and the exact
//                     top-k of their candidate pair sums -> (scores_THK, rows_THK, order_THK)
// - search_backward:  gradients of those scores w.r.t. the query halves and the sub-keys
// - bag_weight_grad:  <grad_y[t], values[slots[t, j]]> for every read
// - sort_reads:       counting sort of the reads by slot (stable) -> segments

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
inline int64_t count_at_least(const scalar_t* x, int64_t n, scalar_t bound) {
  int64_t count = 0;
  for (int64_t a = 0; a < n; ++a) count += x[a] >= bound;
  return count;
}

// Top-k of one row of n scores into vals/ids (best first, ties by ascending index).
// 1. A lower bound on the k-th largest score: the smallest of k disjoint block maxima (each block
//    holds a score at or above it), raised by a few bisection steps that keep >= k scores above it.
// 2. The scores at or above the bound (~k of them), in index order, compressed without branches.
// 3. Each candidate's place = #(larger candidates) + #(equal candidates before it): no insertion.
// cand_v/cand_i hold n + 8 entries. NaN scores are never selected (with NaNs a row may come back
// short: its tail keeps NaN scores and index 0, a valid row).
template <typename scalar_t>
inline void row_topk(const scalar_t* s_n, int64_t n, int64_t k, scalar_t* vals, int64_t* ids,
                     scalar_t* cand_v, int64_t* cand_i) {
  const int64_t block = n / k;
  scalar_t lo = s_n[0], hi = s_n[0];
  for (int64_t b = 0; b < k; ++b) {
    const scalar_t* x = s_n + b * block;
    scalar_t top = x[0];
    for (int64_t a = 1; a < block; ++a) top = x[a] > top ? x[a] : top;
    lo = (b == 0 || top < lo) ? top : lo;
    hi = top > hi ? top : hi;
  }
  for (int64_t a = k * block; a < n; ++a) hi = s_n[a] > hi ? s_n[a] : hi;
  for (int step = 0; step < 4; ++step) {
    const scalar_t mid = lo + (hi - lo) / 2;
    if (count_at_least(s_n, n, mid) >= k) lo = mid; else hi = mid;
  }
  int64_t count = 0;
  for (int64_t a = 0; a < n; ++a) {
    cand_v[count] = s_n[a];
    cand_i[count] = a;
    count += s_n[a] >= lo;
  }
  const int64_t padded = (count + 7) / 8 * 8;
  for (int64_t a = count; a < padded; ++a) cand_v[a] = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t r = 0; r < k; ++r) {
    vals[r] = std::numeric_limits<scalar_t>::quiet_NaN();
    ids[r] = 0;
  }
  for (int64_t a = 0; a < count; ++a) {
    const scalar_t x = cand_v[a];
    int64_t above = 0, equal = 0;
    for (int64_t d = 0; d < padded; ++d) {
      above += cand_v[d] > x;
      equal += cand_v[d] == x;
    }
    if (equal > 1) {  // ties (rare): only the equal candidates before this one rank above it
      equal = 0;
      for (int64_t d = 0; d < a; ++d) equal += cand_v[d] == x;
      above += equal;
    }
    if (above < k) {
      vals[above] = x;
      ids[above] = cand_i[a];
    }
  }
}

}  // namespace

// s1_HTn, s2_HTn: sub-key scores of the two query halves, (H, T, n) contiguous.
// -> scores_THK, rows_THK (row = i1 * n + i2), both best first, and subs_THK2 (i1, i2 as int32).
std::vector<torch::Tensor> topk_merge(torch::Tensor s1_HTn, torch::Tensor s2_HTn, int64_t topk) {
  TORCH_CHECK(s1_HTn.dim() == 3 && s1_HTn.sizes() == s2_HTn.sizes(), "topk_merge: s1, s2 must be (H, T, n)");
  s1_HTn = s1_HTn.contiguous();
  s2_HTn = s2_HTn.contiguous();
  const int64_t heads = s1_HTn.size(0), tokens = s1_HTn.size(1), n = s1_HTn.size(2), k = topk;
  TORCH_CHECK(k >= 1 && k <= n, "topk_merge: topk must be in [1, n]");
  auto scores_THK = torch::empty({tokens, heads, k}, s1_HTn.options());
  auto rows_THK = torch::empty({tokens, heads, k}, s1_HTn.options().dtype(torch::kInt64));
  auto subs_THK2 = torch::empty({tokens, heads, k, 2}, s1_HTn.options().dtype(torch::kInt32));
  // pairs (i, j) of positions in the two sorted top-k lists with (i + 1)(j + 1) <= k
  std::vector<int64_t> pair_i, pair_j;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; (i + 1) * (j + 1) <= k; ++j) {
      pair_i.push_back(i);
      pair_j.push_back(j);
    }
  const int64_t pairs = static_cast<int64_t>(pair_i.size());
  AT_DISPATCH_FLOATING_TYPES(s1_HTn.scalar_type(), "topk_merge", [&] {
    const scalar_t* s1 = s1_HTn.data_ptr<scalar_t>();
    const scalar_t* s2 = s2_HTn.data_ptr<scalar_t>();
    scalar_t* out_s = scores_THK.data_ptr<scalar_t>();
    int64_t* out_r = rows_THK.data_ptr<int64_t>();
    int32_t* out_sub = subs_THK2.data_ptr<int32_t>();
    at::parallel_for(0, tokens * heads, 256, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> v1(k), v2(k), vs(k);
      const int64_t width = std::max(n, pairs) + 8;
      std::vector<int64_t> i1(k), i2(k), pick(k), cand_i(width);
      std::vector<scalar_t> cand_v(width), sums(pairs);
      for (int64_t th = lo; th < hi; ++th) {
        const int64_t t = th / heads, h = th % heads;
        const int64_t off = (h * tokens + t) * n;
        row_topk(s1 + off, n, k, v1.data(), i1.data(), cand_v.data(), cand_i.data());
        row_topk(s2 + off, n, k, v2.data(), i2.data(), cand_v.data(), cand_i.data());
        // the candidate pairs' sums, in (i, j) order: equal sums rank by (i, j), under which a
        // pair is always preceded by the pairs that dominate it
        for (int64_t p = 0; p < pairs; ++p) sums[p] = v1[pair_i[p]] + v2[pair_j[p]];
        row_topk(sums.data(), pairs, k, vs.data(), pick.data(), cand_v.data(), cand_i.data());
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
  });
  return {scores_THK, rows_THK, subs_THK2};
}

// d scores_THK / d (q1_THQ, q2_THQ, keys1_HnQ, keys2_HnQ) for scores = q1 . keys1[i1] + q2 . keys2[i2],
// (i1, i2) = subs_THK2 from topk_merge.
std::vector<torch::Tensor> search_backward(torch::Tensor grad_THK, torch::Tensor subs_THK2, torch::Tensor q1_THQ,
                                           torch::Tensor q2_THQ, torch::Tensor keys1_HnQ, torch::Tensor keys2_HnQ) {
  grad_THK = grad_THK.contiguous();
  subs_THK2 = subs_THK2.contiguous();
  q1_THQ = q1_THQ.contiguous();
  q2_THQ = q2_THQ.contiguous();
  keys1_HnQ = keys1_HnQ.contiguous();
  keys2_HnQ = keys2_HnQ.contiguous();
  const int64_t tokens = q1_THQ.size(0), heads = q1_THQ.size(1), q = q1_THQ.size(2);
  const int64_t n = keys1_HnQ.size(1), k = subs_THK2.size(2);
  auto gq1 = torch::empty_like(q1_THQ), gq2 = torch::empty_like(q2_THQ);
  auto gk1 = torch::zeros_like(keys1_HnQ), gk2 = torch::zeros_like(keys2_HnQ);
  AT_DISPATCH_FLOATING_TYPES(q1_THQ.scalar_type(), "search_backward", [&] {
    const scalar_t* g = grad_THK.data_ptr<scalar_t>();
    const int32_t* subs = subs_THK2.data_ptr<int32_t>();
    const scalar_t* qs[2] = {q1_THQ.data_ptr<scalar_t>(), q2_THQ.data_ptr<scalar_t>()};
    const scalar_t* ks[2] = {keys1_HnQ.data_ptr<scalar_t>(), keys2_HnQ.data_ptr<scalar_t>()};
    scalar_t* gqs[2] = {gq1.data_ptr<scalar_t>(), gq2.data_ptr<scalar_t>()};
    scalar_t* gks[2] = {gk1.data_ptr<scalar_t>(), gk2.data_ptr<scalar_t>()};
    // query halves: one (token, head) per iteration
    at::parallel_for(0, tokens * heads, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t th = lo; th < hi; ++th) {
        const int64_t h = th % heads;
        for (int half = 0; half < 2; ++half) {
          scalar_t* out = gqs[half] + th * q;
          for (int64_t c = 0; c < q; ++c) out[c] = 0;
          for (int64_t r = 0; r < k; ++r) {
            const int64_t sub = subs[(th * k + r) * 2 + half];
            const scalar_t w = g[th * k + r];
            const scalar_t* key = ks[half] + (h * n + sub) * q;
            for (int64_t c = 0; c < q; ++c) out[c] += w * key[c];
          }
        }
      }
    });
    // sub-keys: one (half, head) per iteration, tokens in order (fp64 accumulation for fp32)
    using acc_t = double;
    at::parallel_for(0, 2 * heads, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> acc(n * q);
      for (int64_t hh = lo; hh < hi; ++hh) {
        const int half = static_cast<int>(hh / heads);
        const int64_t h = hh % heads;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t t = 0; t < tokens; ++t) {
          const int64_t th = t * heads + h;
          const scalar_t* qv = qs[half] + th * q;
          for (int64_t r = 0; r < k; ++r) {
            const int64_t sub = subs[(th * k + r) * 2 + half];
            const acc_t w = g[th * k + r];
            acc_t* a = acc.data() + sub * q;
            for (int64_t c = 0; c < q; ++c) a[c] += w * qv[c];
          }
        }
        scalar_t* out = gks[half] + h * n * q;
        for (int64_t i = 0; i < n * q; ++i) out[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return {gq1, gq2, gk1, gk2};
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
    constexpr int64_t lanes = 8;
    at::parallel_for(0, tokens, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const scalar_t* gt = gy + t * v;
        for (int64_t j = 0; j < reads; ++j) {
          const scalar_t* row = vals + slots[t * reads + j] * v;
          scalar_t acc[lanes] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t c = 0;
          for (; c + lanes <= v; c += lanes)
            for (int64_t l = 0; l < lanes; ++l) acc[l] += gt[c + l] * row[c + l];
          for (; c < v; ++c) acc[0] += gt[c] * row[c];
          scalar_t total = 0;
          for (int64_t l = 0; l < lanes; ++l) total += acc[l];
          out[t * reads + j] = total;
        }
      }
    });
  });
  return grad_TR;
}

// Stable counting sort of the reads slots_L by slot -> (unique_U, start_U1, read_L).
std::vector<torch::Tensor> sort_reads(torch::Tensor slots_L, int64_t n_slots) {
  slots_L = slots_L.contiguous();
  const int64_t reads = slots_L.numel();
  const int64_t* slots = slots_L.data_ptr<int64_t>();
  std::vector<int64_t> start(n_slots + 1, 0);
  for (int64_t l = 0; l < reads; ++l) {
    TORCH_CHECK(slots[l] >= 0 && slots[l] < n_slots, "sort_reads: slot out of range");
    ++start[slots[l] + 1];
  }
  int64_t unique = 0;
  for (int64_t s = 0; s < n_slots; ++s) {
    unique += start[s + 1] > 0;
    start[s + 1] += start[s];
  }
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
