// Fused CPU kernels for one decode step of a RoPE model over the sink+window pool.
//
// Eager PyTorch spends most of a one-row decode step outside the matmuls: ~50 small ops per layer at a few
// microseconds each. These kernels do the same arithmetic as the eager path in streaming_core/attention.py
// and models/llama.py (see their docstrings for the semantics) in four calls per layer; `streaming_core/fused/__init__.py` compiles and loads them and
// the tests compare them with the eager path.
//
// The same module holds matmuls over int8-quantized activations (the int4 and int8 precisions' fastest
// kernels at a few rows on this kind of CPU; see the section below), and the same matmuls on AMX tiles
// for more rows, where the CPU has them (chosen at run time; the module itself needs only AVX2).
//
// Layouts (all contiguous): qkv [B, (H + 2 kvh) * hd]; rope tables [B, hd] (cos, and sin signed as
// positions.rotate expects); pool K/V [slots, kvh, cap, hd]; bias [B, L] additive (0 or -inf).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

namespace {

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T from_f(float x) {
  return static_cast<T>(x);
}

// -- AVX2 helpers --------------------------------------------------------------------------------------
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp for 8 floats: Cephes' range reduction and degree-5 polynomial (relative error ~1e-7); inputs below
// the fp32 range (masked scores are -inf) give exactly 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.37626f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}


// 8 floats stored as fp32, or as bf16 rounded to nearest-even exactly as c10::BFloat16(float) does
// (NaN becomes the quiet NaN 0x7FC0).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias =
      _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: its 4 values, twice
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
}

// out[j] = x[j] * cos[j] + x[j +- half] * sin[j]: positions.rotate on one head of hd features.
template <typename In>
inline void rotate_head(const In* x, const float* cos, const float* sin, float scale, int hd, float* out) {
  const int half = hd / 2;
  for (int j = 0; j < half; ++j) {
    out[j] = (to_f(x[j]) * scale) * cos[j] + (to_f(x[j + half]) * scale) * sin[j];
  }
  for (int j = half; j < hd; ++j) {
    out[j] = (to_f(x[j]) * scale) * cos[j] + (to_f(x[j - half]) * scale) * sin[j];
  }
}

template <typename In, typename KV>
void rope_write_impl(const at::Tensor& qkv, const at::Tensor& cos_w, const at::Tensor& sin_w,
                     const at::Tensor& cos_s, const at::Tensor& sin_s, double scale, int64_t heads,
                     int64_t kv_heads, at::Tensor& k_rows, at::Tensor& v_rows, const at::Tensor& targets,
                     at::Tensor& q_w, at::Tensor& q_s, bool sink_query) {
  const int64_t B = qkv.size(0);
  const int hd = static_cast<int>(q_w.size(2));
  const int64_t stride = qkv.size(1);
  const In* src = qkv.data_ptr<In>();
  const float* cw = cos_w.data_ptr<float>();
  const float* sw = sin_w.data_ptr<float>();
  const float* cs = sink_query ? cos_s.data_ptr<float>() : nullptr;
  const float* ss = sink_query ? sin_s.data_ptr<float>() : nullptr;
  const int64_t* tgt = targets.data_ptr<int64_t>();
  KV* kr = k_rows.data_ptr<KV>();
  KV* vr = v_rows.data_ptr<KV>();
  float* qw = q_w.data_ptr<float>();
  float* qs = sink_query ? q_s.data_ptr<float>() : nullptr;
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(hd);
    for (int64_t b = b0; b < b1; ++b) {
      const In* row = src + b * stride;
      const float* c1 = cw + b * hd;
      const float* s1 = sw + b * hd;
      for (int64_t h = 0; h < heads; ++h) {
        rotate_head(row + h * hd, c1, s1, static_cast<float>(scale), hd, qw + (b * heads + h) * hd);
        if (sink_query) {
          rotate_head(row + h * hd, cs + b * hd, ss + b * hd, static_cast<float>(scale), hd,
                      qs + (b * heads + h) * hd);
        }
      }
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t dst = tgt[b * kv_heads + h] * hd;
        rotate_head(row + (heads + h) * hd, c1, s1, 1.0f, hd, tmp.data());
        const In* v = row + (heads + kv_heads + h) * hd;
        for (int j = 0; j < hd; j += 8) {
          store8(kr + dst + j, _mm256_loadu_ps(tmp.data() + j));
          store8(vr + dst + j, load8(v + j));
        }
      }
    }
  });
}

// Rotates q (twice: stream positions for window keys, cache positions for sink keys) and k, scales q,
// and writes the new k (rotated) and v into the pool rows `targets` ([B * kvh] row indices of k_rows,
// the layer's pool viewed as [-1, hd]). Returns q_w and q_s [B, H, hd] in fp32 (q_s empty without sinks).
std::vector<at::Tensor> rope_write(const at::Tensor& qkv, const at::Tensor& cos_w, const at::Tensor& sin_w,
                                   const at::Tensor& cos_s, const at::Tensor& sin_s, double scale,
                                   int64_t heads, int64_t kv_heads, at::Tensor k_rows, at::Tensor v_rows,
                                   const at::Tensor& targets, bool sink_query) {
  TORCH_CHECK(qkv.is_contiguous() && cos_w.is_contiguous() && sin_w.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(k_rows.is_contiguous() && v_rows.is_contiguous() && targets.is_contiguous(), "contiguous pool");
  TORCH_CHECK(cos_w.scalar_type() == at::kFloat && targets.scalar_type() == at::kLong, "fp32 tables");
  const int64_t B = qkv.size(0);
  const int64_t hd = k_rows.size(1);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * hd, "qkv width");
  TORCH_CHECK(hd % 8 == 0, "head_dim a multiple of 8");
  auto opts = qkv.options().dtype(at::kFloat);
  at::Tensor q_w = at::empty({B, heads, hd}, opts);
  at::Tensor q_s = sink_query ? at::empty({B, heads, hd}, opts) : at::Tensor();
  TORCH_CHECK(k_rows.scalar_type() == v_rows.scalar_type(), "k and v pools share a dtype");
  const bool in_bf16 = qkv.scalar_type() == at::kBFloat16;
  const bool kv_bf16 = k_rows.scalar_type() == at::kBFloat16;
  TORCH_CHECK(in_bf16 || qkv.scalar_type() == at::kFloat, "qkv is fp32 or bf16");
  TORCH_CHECK(kv_bf16 || k_rows.scalar_type() == at::kFloat, "the pool is fp32 or bf16");
  if (in_bf16 && kv_bf16) {
    rope_write_impl<c10::BFloat16, c10::BFloat16>(qkv, cos_w, sin_w, cos_s, sin_s, scale, heads, kv_heads,
                                                  k_rows, v_rows, targets, q_w, q_s, sink_query);
  } else if (in_bf16) {
    rope_write_impl<c10::BFloat16, float>(qkv, cos_w, sin_w, cos_s, sin_s, scale, heads, kv_heads, k_rows,
                                          v_rows, targets, q_w, q_s, sink_query);
  } else if (kv_bf16) {
    rope_write_impl<float, c10::BFloat16>(qkv, cos_w, sin_w, cos_s, sin_s, scale, heads, kv_heads, k_rows,
                                          v_rows, targets, q_w, q_s, sink_query);
  } else {
    rope_write_impl<float, float>(qkv, cos_w, sin_w, cos_s, sin_s, scale, heads, kv_heads, k_rows, v_rows,
                                  targets, q_w, q_s, sink_query);
  }
  return {q_w, q_s};
}

constexpr int kMaxGroup = 16;  // query heads per KV head handled by one task

template <typename KV>
inline float dot(const float* q, const KV* k, int64_t hd) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += 8) acc = _mm256_fmadd_ps(load8(q + d), load8(k + d), acc);
  return hsum(acc);
}

// Asks for n elements from p into the L2 cache, one request per 64-byte line.
template <typename T>
inline void prefetch_rows(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
}

// The G query heads that share one KV head, scored together: each key row is loaded (and widened from
// bf16) once for all G, 4 keys at a time. sc[h * stride + j] = q_h . k_j + m[j] for j in [j0, j1).
// With `ahead`, the same key rows of the next task are prefetched as these are read: spread over the
// loop, the requests keep memory busy without queueing up in one burst.
template <int G, typename KV>
inline void group_scores(const float* q, const KV* K, int64_t j0, int64_t j1, int64_t hd, const float* m,
                         float* sc, int64_t stride, const KV* ahead) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    if (ahead != nullptr) prefetch_rows(ahead + j * hd, 4 * hd);
    __m256 acc[G][4];
    for (int h = 0; h < G; ++h)
      for (int t = 0; t < 4; ++t) acc[h][t] = _mm256_setzero_ps();
    const KV* k = K + j * hd;
    for (int64_t d = 0; d < hd; d += 8) {  // live: 4G sums, G query vectors, one key vector
      __m256 x[G];
      for (int h = 0; h < G; ++h) x[h] = _mm256_loadu_ps(q + h * hd + d);
      for (int t = 0; t < 4; ++t) {
        const __m256 kt = load8(k + t * hd + d);
        for (int h = 0; h < G; ++h) acc[h][t] = _mm256_fmadd_ps(x[h], kt, acc[h][t]);
      }
    }
    for (int h = 0; h < G; ++h) {  // lanes of the 4 sums: [0..3 low halves | 0..3 high halves]
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
      const __m128 four = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      _mm_storeu_ps(sc + h * stride + j, _mm_add_ps(four, _mm_loadu_ps(m + j)));
    }
  }
  for (; j < j1; ++j) {
    if (ahead != nullptr) prefetch_rows(ahead + j * hd, hd);
    for (int h = 0; h < G; ++h) sc[h * stride + j] = dot(q + h * hd, K + j * hd, hd) + m[j];
  }
}

// acc[h * hd + d] = sum_j p[h * stride + j] * v_j[d] for the G heads at once, over NV vectors of features
// from d0: each value row is loaded once for all G. An entry every head gives weight 0 (empty: maybe
// stale) is skipped. With `ahead`, the next task's value rows are prefetched along (as group_scores).
template <int G, int NV, typename KV>
inline void group_values_at(const float* p, int64_t stride, const KV* V, int64_t L, int64_t hd, int64_t d0,
                            float* acc, const KV* ahead) {
  __m256 a[G][NV];  // live: G * NV sums, G weights, one value vector
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < NV; ++i) a[h][i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    if (ahead != nullptr) prefetch_rows(ahead + j * hd, hd);
    bool any = false;
    __m256 w[G];
    for (int h = 0; h < G; ++h) {
      const float pj = p[h * stride + j];
      any |= pj != 0.f;
      w[h] = _mm256_set1_ps(pj);
    }
    if (!any) continue;
    const KV* row = V + j * hd + d0;
    for (int i = 0; i < NV; ++i) {
      const __m256 v = load8(row + 8 * i);
      for (int h = 0; h < G; ++h) a[h][i] = _mm256_fmadd_ps(w[h], v, a[h][i]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(acc + h * hd + d0 + 8 * i, a[h][i]);
}

template <int G, typename KV>
inline void group_values(const float* p, int64_t stride, const KV* V, int64_t L, int64_t hd, float* acc,
                         const KV* ahead) {
  int64_t d0 = 0;  // the first pass over the rows prefetches
  for (; d0 + 32 <= hd; d0 += 32) group_values_at<G, 4>(p, stride, V, L, hd, d0, acc, d0 == 0 ? ahead : nullptr);
  for (; d0 < hd; d0 += 8) group_values_at<G, 1>(p, stride, V, L, hd, d0, acc, d0 == 0 ? ahead : nullptr);
}

// Scores, then (after the softmax) values, for heads [h0, h0 + G) of one group.
template <int G, typename KV>
inline void group_attend_scores(const float* qw, const float* qs, const KV* K, int64_t S, int64_t L, int64_t hd,
                                const float* m, float* sc, int64_t stride, const KV* ahead) {
  group_scores<G>(qs, K, 0, S, hd, m, sc, stride, ahead);  // sinks: scored by the sink query
  group_scores<G>(qw, K, S, L, hd, m, sc, stride, ahead);
}

template <typename KV>
inline void scores_for_group(int64_t g, const float* qw, const float* qs, const KV* K, int64_t S, int64_t L,
                             int64_t hd, const float* m, float* sc, int64_t stride, const KV* ahead) {
  int64_t h = 0;  // the first heads' pass prefetches the next task's keys
  for (; h + 3 <= g; h += 3)
    group_attend_scores<3>(qw + h * hd, qs + h * hd, K, S, L, hd, m, sc + h * stride, stride, h ? nullptr : ahead);
  for (; h + 2 <= g; h += 2)
    group_attend_scores<2>(qw + h * hd, qs + h * hd, K, S, L, hd, m, sc + h * stride, stride, h ? nullptr : ahead);
  for (; h < g; ++h)
    group_attend_scores<1>(qw + h * hd, qs + h * hd, K, S, L, hd, m, sc + h * stride, stride, h ? nullptr : ahead);
}

template <typename KV>
inline void values_for_group(int64_t g, const float* p, int64_t stride, const KV* V, int64_t L, int64_t hd,
                             float* acc, const KV* ahead) {
  int64_t h = 0;
  for (; h + 3 <= g; h += 3) group_values<3>(p + h * stride, stride, V, L, hd, acc + h * hd, h ? nullptr : ahead);
  for (; h + 2 <= g; h += 2) group_values<2>(p + h * stride, stride, V, L, hd, acc + h * hd, h ? nullptr : ahead);
  for (; h < g; ++h) group_values<1>(p + h * stride, stride, V, L, hd, acc + h * hd, h ? nullptr : ahead);
}

template <typename KV, typename Out>
void attend_impl(const at::Tensor& q_w, const at::Tensor& q_s, const at::Tensor& pool_k,
                 const at::Tensor& pool_v, const at::Tensor& slots, const at::Tensor& sinks,
                 const at::Tensor& bias, int64_t L, at::Tensor& out) {
  const int64_t B = q_w.size(0), H = q_w.size(1), hd = q_w.size(2);
  const int64_t kvh = pool_k.size(1), cap = pool_k.size(2);
  const int64_t g = H / kvh;
  const float* qw = q_w.data_ptr<float>();
  const float* qs = q_s.defined() ? q_s.data_ptr<float>() : nullptr;
  const KV* K = pool_k.data_ptr<KV>();
  const KV* V = pool_v.data_ptr<KV>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* sink = sinks.data_ptr<int64_t>();
  const float* mask = bias.data_ptr<float>();
  Out* o = out.data_ptr<Out>();
  const int64_t L8 = (L + 7) / 8 * 8;
  // one (row, kv head) per task, its g query heads together (each K/V row is read once); steps below
  // ~32K multiply-adds stay on the calling thread, where a parallel region would cost more than it saves
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, L * hd * g));
  at::parallel_for(0, B * kvh, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> score(g * L8), acc(g * hd);  // per task: probabilities, then outputs
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kvh, kv = task % kvh;
      const KV* Kh = K + ((slot[b] * kvh + kv) * cap) * hd;
      const KV* Vh = V + ((slot[b] * kvh + kv) * cap) * hd;
      // the next task's rows are fetched while this one computes: a slot's L rows are one short run of
      // memory per head, which the hardware prefetcher does not get ahead of
      const KV *K_next = nullptr, *V_next = nullptr;
      if (task + 1 < end) {
        const int64_t nb = (task + 1) / kvh, nkv = (task + 1) % kvh;
        K_next = K + ((slot[nb] * kvh + nkv) * cap) * hd;
        V_next = V + ((slot[nb] * kvh + nkv) * cap) * hd;
      }
      const float* m = mask + b * L;
      const float* qw_h = qw + (b * H + kv * g) * hd;  // the group's g heads, consecutive
      const float* qs_h = qs ? qs + (b * H + kv * g) * hd : qw_h;
      const int64_t S = qs ? std::min<int64_t>(sink[b], L) : 0;
      scores_for_group(g, qw_h, qs_h, Kh, S, L, hd, m, score.data(), L8, K_next);
      for (int64_t h = 0; h < g; ++h) {
        float* sc = score.data() + h * L8;
        for (int64_t j = L; j < L8; ++j) sc[j] = -INFINITY;
        __m256 best = _mm256_set1_ps(-INFINITY);
        for (int64_t j = 0; j < L8; j += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(sc + j));
        float top = -INFINITY;
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, best);
        for (float x : lanes) top = std::max(top, x);
        const __m256 shift = _mm256_set1_ps(top);
        __m256 total = _mm256_setzero_ps();
        for (int64_t j = 0; j < L8; j += 8) {
          __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), shift));
          _mm256_storeu_ps(sc + j, p);
          total = _mm256_add_ps(total, p);
        }
        const float inv = 1.f / hsum(total);
        for (int64_t j = 0; j < L; ++j) sc[j] *= inv;
      }
      values_for_group(g, score.data(), L8, Vh, L, hd, acc.data(), V_next);
      for (int64_t h = 0; h < g; ++h) {
        Out* dst = o + (b * H + kv * g + h) * hd;
        for (int64_t d = 0; d < hd; d += 8) store8(dst + d, _mm256_loadu_ps(acc.data() + h * hd + d));
      }
    }
  });
}

// One query row per session over its slot's first L entries: q_s scores the session's sink entries,
// q_w the rest; bias masks empty entries. Returns [B, H * hd] in `out_dtype` (bf16 feeds a quantized o).
at::Tensor attend(const at::Tensor& q_w, const c10::optional<at::Tensor>& q_sink, const at::Tensor& pool_k,
                  const at::Tensor& pool_v, const at::Tensor& slots, const at::Tensor& sinks,
                  const at::Tensor& bias, int64_t L, bool out_bf16) {
  TORCH_CHECK(q_w.is_contiguous() && pool_k.is_contiguous() && pool_v.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(bias.is_contiguous() && bias.size(1) == L && bias.scalar_type() == at::kFloat, "bias [B, L]");
  TORCH_CHECK(L <= pool_k.size(2), "L within the slot");
  const at::Tensor q_s = q_sink.has_value() ? *q_sink : at::Tensor();
  TORCH_CHECK(!q_s.defined() || (q_s.is_contiguous() && q_s.sizes() == q_w.sizes()), "q_s matches q_w");
  TORCH_CHECK(q_w.size(2) % 8 == 0 && q_w.size(1) % pool_k.size(1) == 0, "head_dim a multiple of 8, GQA groups");
  TORCH_CHECK(q_w.size(1) / pool_k.size(1) <= kMaxGroup, "query heads per KV head");
  const int64_t B = q_w.size(0), H = q_w.size(1), hd = q_w.size(2);
  at::Tensor out = at::empty({B, H * hd}, q_w.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  const bool kv_bf16 = pool_k.scalar_type() == at::kBFloat16;
  TORCH_CHECK(kv_bf16 || pool_k.scalar_type() == at::kFloat, "the pool is fp32 or bf16");
  if (kv_bf16 && out_bf16) {
    attend_impl<c10::BFloat16, c10::BFloat16>(q_w, q_s, pool_k, pool_v, slots, sinks, bias, L, out);
  } else if (kv_bf16) {
    attend_impl<c10::BFloat16, float>(q_w, q_s, pool_k, pool_v, slots, sinks, bias, L, out);
  } else if (out_bf16) {
    attend_impl<float, c10::BFloat16>(q_w, q_s, pool_k, pool_v, slots, sinks, bias, L, out);
  } else {
    attend_impl<float, float>(q_w, q_s, pool_k, pool_v, slots, sinks, bias, L, out);
  }
  return out;
}

template <typename Y>
void add_rms_norm_impl(at::Tensor& x, const at::Tensor& y, const at::Tensor& w, double eps, at::Tensor& out) {
  const int64_t N = x.size(0), D = x.size(1);
  float* res = x.data_ptr<float>();
  const Y* add = y.defined() ? y.data_ptr<Y>() : nullptr;
  const float* gain = w.data_ptr<float>();
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* r = res + n * D;
      if (add != nullptr) {
        for (int64_t d = 0; d < D; ++d) r[d] += to_f(add[n * D + d]);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) ss += r[d] * r[d];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      if (bf16) {
        c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + n * D;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
          store8(o + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + d), _mm256_set1_ps(inv)), _mm256_loadu_ps(gain + d)));
        for (; d < D; ++d) o[d] = c10::BFloat16(r[d] * inv * gain[d]);
      } else {
        float* o = out.data_ptr<float>() + n * D;
        for (int64_t d = 0; d < D; ++d) o[d] = r[d] * inv * gain[d];
      }
    }
  });
}

// The residual add and the next RMSNorm in one pass: x += y (in place; y fp32 or bf16, or None), then
// returns rms_norm(x) * w computed in fp32, written in fp32 or bf16 (the next quantized kernel's input).
at::Tensor add_rms_norm_(at::Tensor x, const c10::optional<at::Tensor>& y, const at::Tensor& w, double eps,
                         bool out_bf16) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "fp32");
  at::Tensor out = at::empty_like(x, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  if (!y.has_value()) {
    add_rms_norm_impl<float>(x, at::Tensor(), w, eps, out);
    return out;
  }
  const at::Tensor& add = *y;
  TORCH_CHECK(add.is_contiguous() && add.sizes() == x.sizes(), "y matches x");
  if (add.scalar_type() == at::kBFloat16) {
    add_rms_norm_impl<c10::BFloat16>(x, add, w, eps, out);
  } else {
    TORCH_CHECK(add.scalar_type() == at::kFloat, "y is fp32 or bf16");
    add_rms_norm_impl<float>(x, add, w, eps, out);
  }
  return out;
}

template <typename T>
void silu_mul_impl(const at::Tensor& gu, at::Tensor& out) {
  const int64_t N = gu.size(0), F = gu.size(1) / 2;
  const T* src = gu.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* g = src + n * 2 * F;
      const T* u = g + F;
      int64_t f = 0;
      for (; f + 8 <= F; f += 8) {
        const __m256 x = load8(g + f);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        store8(dst + n * F + f, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)), load8(u + f)));
      }
      for (; f < F; ++f) {
        const float x = to_f(g[f]);
        dst[n * F + f] = from_f<T>(x / (1.f + std::exp(-x)) * to_f(u[f]));
      }
    }
  });
}

// silu(gate) * up for gate|up [N, 2F] -> [N, F], in the input's dtype, computed in fp32.
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.is_contiguous() && gu.size(1) % 2 == 0, "gate|up [N, 2F]");
  at::Tensor out = at::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  if (gu.scalar_type() == at::kBFloat16) {
    silu_mul_impl<c10::BFloat16>(gu, out);
  } else {
    TORCH_CHECK(gu.scalar_type() == at::kFloat, "gate|up is fp32 or bf16");
    silu_mul_impl<float>(gu, out);
  }
  return out;
}

// -- matmuls over int8-quantized activations --------------------------------------------------------
// At a few rows a quantized matmul is bound by how fast its weights are unpacked and multiplied, not by
// memory: torch's int4 kernel converts every code to float. These multiply integer codes by activations
// quantized to int8 per group of 32 inputs (scale max|x| / 127, as GGUF's Q8_0), with AVX2's u8 x s8
// multiply-add, in a layout that interleaves 8 output rows so that each vector lane holds one row's sum
// and no horizontal reduction is needed. The weights are exactly the quantized weights; only the
// activations are rounded (about 0.4% of each group's largest value). streaming_core/linear.py packs
// the weights (`pack_rows8_*`) and offers these as kernels where the tuner measures them winning.

// x [M, K] fp32 -> xq [M, K] int8, and per group of 32: dx = max|x| / 127 (xq * dx ~ x), the exact sum
// of x and the sum of xq.
void quantize_groups(const float* X, int64_t M, int64_t K, int8_t* XQ, float* DX, float* XS, float* QS) {
  const int64_t G = K / 32;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  for (int64_t mg = 0; mg < M * G; ++mg) {
    const float* x = X + mg * 32;  // group g of row m starts at m * K + g * 32 = mg * 32
    __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], absmask));
      sum = _mm256_add_ps(sum, v[i]);
    }
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    a = _mm_max_ss(a, _mm_movehdup_ps(a));
    const float d = _mm_cvtss_f32(a) / 127.f;
    const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
    __m256i r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round to nearest
    const __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(XQ + mg * 32), _mm256_permutevar8x32_epi32(q, order));
    const __m256i r01 = _mm256_add_epi32(r[0], r[1]), r23 = _mm256_add_epi32(r[2], r[3]);
    DX[mg] = d;
    XS[mg] = hsum(sum);
    QS[mg] = hsum(_mm256_cvtepi32_ps(_mm256_add_epi32(r01, r23)));  // |sum| <= 4064: exact in fp32
  }
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// How 8 vectors of u8 x s8 products are summed, exactly, into int32 lanes (4 products each per step):
// AVX2's maddubs (pairs into int16), an add and madd, or AVX-VNNI's dot product in one instruction on
// CPUs that have it. The integers are the same either way.
#define STREAMLLM_VNNI __attribute__((target("avx2,fma,avxvnni")))

struct Avx2Dot {
  // int4 codes (u8 0..15) against xq: 15 * 127 * 2 per pair, 8 pairs summed: 30,480 fits int16
  static inline __m256i int4(const __m256i* w, const int8_t* xq) {
    __m256i p16 = _mm256_maddubs_epi16(w[0], broadcast4(xq));
    for (int t = 1; t < 8; ++t) p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(w[t], broadcast4(xq + 4 * t)));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
  }
  // |w| (u8) against x carrying w's sign: up to 2 * 127 * 127 per pair, so to int32 at every step
  static inline __m256i int8_step(__m256i sum, __m256i wabs, __m256i xs) {
    return _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), _mm256_set1_epi16(1)));
  }
};

struct VnniDot {
  STREAMLLM_VNNI static inline __m256i int4(const __m256i* w, const int8_t* xq) {
    __m256i sum = _mm256_setzero_si256();
    for (int t = 0; t < 8; ++t) sum = _mm256_dpbusd_avx_epi32(sum, w[t], broadcast4(xq + 4 * t));
    return sum;
  }
  STREAMLLM_VNNI static inline __m256i int8_step(__m256i sum, __m256i wabs, __m256i xs) {
    return _mm256_dpbusd_avx_epi32(sum, wabs, xs);
  }
};

// int4 codes of 8 interleaved rows: [N/8, G, 4, 32] bytes. Within group g of block nb, byte 4l + b of
// vector t holds row 8nb + l's code at k = 4t + b (low nibble) and at k = 4(t + 4) + b (high nibble).
// scale and zero [N/8, G, 8]: w = (code - 8) * scale + zero. The sums run over (code - 8) * xq, as
// code * xq - 8 * sum(xq): a centred code keeps x's rounding error proportional to w - zero, not to w's
// distance from its group's minimum. M <= 4 rows of x per call.
// How far ahead of the codes being multiplied the loops below ask for more (bytes): the weights stream
// from memory once per step, and requests a few KB ahead keep that stream going (past the end of the
// weights a prefetch is harmless).
constexpr int64_t kAhead = 2048;

struct Int4Args {
  const int8_t* XQ;
  const float *DX, *XS, *QS;
  int64_t K;
  const uint8_t* codes;
  const float *scale, *zero;
  float* out;
  int64_t N;
};

template <int M, class Dot>
__attribute__((always_inline)) inline void int4_rows8(const Int4Args& a, int64_t b0, int64_t b1) {
  const int64_t G = a.K / 32;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t nb = b0; nb < b1; ++nb) {
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    const uint8_t* c = a.codes + nb * G * 128;
    const float* s = a.scale + nb * G * 8;
    const float* z = a.zero + nb * G * 8;
    for (int64_t g = 0; g < G; ++g, c += 128) {
      _mm_prefetch(reinterpret_cast<const char*>(c + kAhead), _MM_HINT_T0);  // see kAhead
      _mm_prefetch(reinterpret_cast<const char*>(c + kAhead + 64), _MM_HINT_T0);
      __m256i w[8];
      for (int t = 0; t < 4; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * t));
        w[t] = _mm256_and_si256(v, low);
        w[t + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
      const __m256 sc = _mm256_loadu_ps(s + g * 8), zv = _mm256_loadu_ps(z + g * 8);
      for (int m = 0; m < M; ++m) {
        const int64_t mg = m * G + g;
        const __m256 dot = _mm256_sub_ps(_mm256_cvtepi32_ps(Dot::int4(w, a.XQ + m * a.K + g * 32)),
                                         _mm256_set1_ps(8.f * a.QS[mg]));
        acc[m] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sc, _mm256_set1_ps(a.DX[mg])), acc[m]);
        acc[m] = _mm256_fmadd_ps(zv, _mm256_set1_ps(a.XS[mg]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(a.out + m * a.N + nb * 8, acc[m]);
  }
}

// int8 codes of 8 interleaved rows: [N/8, G, 8, 32]; vector t of group g holds, in lane l, row 8nb + l's
// codes at k = 4t..4t+3. scale [N]: w = code * scale.
struct Int8Args {
  const int8_t* XQ;
  const float* DX;
  int64_t K;
  const int8_t* codes;
  const float* scale;
  float* out;
  int64_t N;
};

template <int M, class Dot>
__attribute__((always_inline)) inline void int8_rows8(const Int8Args& a, int64_t b0, int64_t b1) {
  const int64_t G = a.K / 32;
  for (int64_t nb = b0; nb < b1; ++nb) {
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    const int8_t* w = a.codes + nb * G * 256;
    for (int64_t g = 0; g < G; ++g, w += 256) {
      for (int l = 0; l < 256; l += 64) _mm_prefetch(reinterpret_cast<const char*>(w + kAhead + l), _MM_HINT_T0);
      __m256i sum[M];
      for (int m = 0; m < M; ++m) sum[m] = _mm256_setzero_si256();
      for (int t = 0; t < 8; ++t) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * t));
        const __m256i wabs = _mm256_sign_epi8(wv, wv);  // u8 x s8 multiply: move w's sign onto x
        for (int m = 0; m < M; ++m)
          sum[m] = Dot::int8_step(sum[m], wabs, _mm256_sign_epi8(broadcast4(a.XQ + m * a.K + g * 32 + 4 * t), wv));
      }
      for (int m = 0; m < M; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m]), _mm256_set1_ps(a.DX[m * G + g]), acc[m]);
    }
    const __m256 sc = _mm256_loadu_ps(a.scale + nb * 8);
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(a.out + m * a.N + nb * 8, _mm256_mul_ps(acc[m], sc));
  }
}

// The loops for 1..4 rows of x, compiled once for AVX2 and once with VNNI enabled.
template <class Args, void (*R1)(const Args&, int64_t, int64_t), void (*R2)(const Args&, int64_t, int64_t),
          void (*R3)(const Args&, int64_t, int64_t), void (*R4)(const Args&, int64_t, int64_t)>
inline void by_rows(int64_t rows, const Args& a, int64_t b0, int64_t b1) {
  switch (rows) {
    case 1: R1(a, b0, b1); break;
    case 2: R2(a, b0, b1); break;
    case 3: R3(a, b0, b1); break;
    default: R4(a, b0, b1); break;
  }
}

template <int M> void int4_avx2(const Int4Args& a, int64_t b0, int64_t b1) { int4_rows8<M, Avx2Dot>(a, b0, b1); }
template <int M> STREAMLLM_VNNI void int4_vnni(const Int4Args& a, int64_t b0, int64_t b1) {
  int4_rows8<M, VnniDot>(a, b0, b1);
}
template <int M> void int8_avx2(const Int8Args& a, int64_t b0, int64_t b1) { int8_rows8<M, Avx2Dot>(a, b0, b1); }
template <int M> STREAMLLM_VNNI void int8_vnni(const Int8Args& a, int64_t b0, int64_t b1) {
  int8_rows8<M, VnniDot>(a, b0, b1);
}

void int4_rows(bool vnni, int64_t rows, const Int4Args& a, int64_t b0, int64_t b1) {
  if (vnni) {
    by_rows<Int4Args, int4_vnni<1>, int4_vnni<2>, int4_vnni<3>, int4_vnni<4>>(rows, a, b0, b1);
  } else {
    by_rows<Int4Args, int4_avx2<1>, int4_avx2<2>, int4_avx2<3>, int4_avx2<4>>(rows, a, b0, b1);
  }
}

void int8_rows(bool vnni, int64_t rows, const Int8Args& a, int64_t b0, int64_t b1) {
  if (vnni) {
    by_rows<Int8Args, int8_vnni<1>, int8_vnni<2>, int8_vnni<3>, int8_vnni<4>>(rows, a, b0, b1);
  } else {
    by_rows<Int8Args, int8_avx2<1>, int8_avx2<2>, int8_avx2<3>, int8_avx2<4>>(rows, a, b0, b1);
  }
}

// Whether the int8-activation matmuls use AVX-VNNI: where the CPU has it, unless a test turns it off.
bool use_vnni = __builtin_cpu_supports("avxvnni");

// Runs f(first row of x, rows (<= 4), first block, end block) over blocks of 8 output rows in parallel.
template <typename F>
void over_row_blocks(int64_t M, int64_t blocks, int64_t grain, const F& f) {
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) f(m0, std::min<int64_t>(4, M - m0), b0, b1);
  });
}

struct QuantizedX {
  at::Tensor q, d, s, qs;  // [M, K] int8; [M, G] scales, sums of x, sums of q
};

QuantizedX quantize_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x [M, K] fp32");
  TORCH_CHECK(x.size(1) % 32 == 0, "K a multiple of 32");
  const int64_t M = x.size(0), G = x.size(1) / 32;
  QuantizedX r{at::empty(x.sizes(), x.options().dtype(at::kChar)), at::empty({M, G}, x.options()),
               at::empty({M, G}, x.options()), at::empty({M, G}, x.options())};
  quantize_groups(x.data_ptr<float>(), M, x.size(1), r.q.data_ptr<int8_t>(), r.d.data_ptr<float>(),
                  r.s.data_ptr<float>(), r.qs.data_ptr<float>());
  return r;
}

// x [M, K] fp32 @ int4 weights (8-row interleaved, see int4_rows8) -> [M, N] fp32
at::Tensor int4_q8act_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                         const at::Tensor& zero) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0) * 8, G = K / 32;
  TORCH_CHECK(codes.is_contiguous() && codes.scalar_type() == at::kByte && codes.numel() == N * K / 2,
              "int4 codes [N/8, K/32, 4, 32] uint8");
  TORCH_CHECK(scale.numel() == N * G && zero.numel() == N * G && scale.is_contiguous() && zero.is_contiguous(),
              "scale, zero [N/8, K/32, 8] fp32");
  const QuantizedX xq = quantize_x(x);
  at::Tensor out = at::empty({M, N}, x.options());
  const Int4Args all{xq.q.data_ptr<int8_t>(), xq.d.data_ptr<float>(), xq.s.data_ptr<float>(),
                     xq.qs.data_ptr<float>(),  K, codes.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                     zero.data_ptr<float>(),   out.data_ptr<float>(), N};
  const bool vnni = use_vnni;
  over_row_blocks(M, N / 8, 4, [&](int64_t m0, int64_t rows, int64_t b0, int64_t b1) {
    Int4Args a = all;
    a.XQ += m0 * K, a.DX += m0 * G, a.XS += m0 * G, a.QS += m0 * G, a.out += m0 * N;
    int4_rows(vnni, rows, a, b0, b1);
  });
  return out;
}

// x [M, K] fp32 @ int8 weights (8-row interleaved, see int8_rows8) -> [M, N] fp32
at::Tensor int8_q8act_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0) * 8, G = K / 32;
  TORCH_CHECK(codes.is_contiguous() && codes.scalar_type() == at::kChar && codes.numel() == N * K,
              "int8 codes [N/8, K/32, 8, 32] int8");
  TORCH_CHECK(scale.numel() == N && scale.is_contiguous() && scale.scalar_type() == at::kFloat, "scale [N] fp32");
  const QuantizedX xq = quantize_x(x);
  at::Tensor out = at::empty({M, N}, x.options());
  const Int8Args all{xq.q.data_ptr<int8_t>(), xq.d.data_ptr<float>(), K, codes.data_ptr<int8_t>(),
                     scale.data_ptr<float>(), out.data_ptr<float>(), N};
  const bool vnni = use_vnni;
  over_row_blocks(M, N / 8, 16, [&](int64_t m0, int64_t rows, int64_t b0, int64_t b1) {
    Int8Args a = all;
    a.XQ += m0 * K, a.DX += m0 * G, a.out += m0 * N;
    int8_rows(vnni, rows, a, b0, b1);
  });
  return out;
}

// Which instruction set the int8-activation matmuls run; `allow_vnni(false)` pins AVX2 (for tests on a
// VNNI machine), `allow_vnni(true)` takes VNNI where the CPU has it. Returns the set now in use.
std::string int8_dot_isa(c10::optional<bool> allow_vnni) {
  if (allow_vnni.has_value()) use_vnni = *allow_vnni && __builtin_cpu_supports("avxvnni");
  return use_vnni ? "avxvnni" : "avx2";
}


// -- the same matmuls on AMX tiles -----------------------------------------------------------------
// On CPUs with AMX (Sapphire Rapids and later) one tile instruction multiplies a 16 x 32 block of int8
// activations by a 32 x 16 block of int8 weights into 16 x 16 int32 sums: 8,192 multiply-adds, where an
// AVX2 instruction does 32. Every group of 32 inputs has its own scales, so each product covers one
// group, and its sums are scaled into fp32 accumulators with AVX-512, in exactly the order the AVX2
// loops above use: the two give the same bits. The weights are in the tiles' layout: per output tile of
// 16 rows and group of 32 inputs, 8 rows of 64 bytes where row r holds, for each output row j, its inputs
// 4r..4r+3 at bytes 4j..4j+3. int8 weights are stored so; int4 codes two a byte (tile rows r and r + 4
// share a 64-byte row, low and high nibbles), widened to int8 and centred (code - 8) one output tile at
// a time, which halves the bytes a step streams from memory. The tiles need the kernel's permission to
// use their register state (arch_prctl), asked for once per process.
#define STREAMLLM_AMX __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,amx-tile,amx-int8")))

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("amx-int8") || !__builtin_cpu_supports("amx-tile")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // linux/arch/x86/include/uapi/asm/prctl.h
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

struct AmxArgs {
  const int8_t* XQ;  // [Mp, K] (whole tiles), rows past M zero
  const float *DX, *XS;  // [Mp, G], rows past M zero
  int64_t M, K;
  const void* codes;  // int8: [N/16, G, 8, 64] int8; int4: [N/16, G, 4, 64] uint8, two codes a byte
  const float *scale, *zero;  // int4: [N/16, G, 16] each; int8: scale [N], zero null
  float* out;
  int64_t N;
};

// One tile of outputs: 16 rows from m0 by 16 columns from tile n0. The products of a chunk of groups go
// to memory first, then each output row folds them into its fp32 accumulator group by group, in the AVX2
// loops' order. The tile products are software-pipelined over two sets of tiles (activations 0 and 1,
// weights 2 and 3, sums 4 and 5): group i + 1's product runs while group i's sums are stored.
template <bool Int4>
STREAMLLM_AMX void amx_block(const AmxArgs& a, const int8_t* w, int64_t m0, int64_t n0, const uint8_t* ahead) {
  constexpr int64_t kChunk = 8;  // groups whose sums are held at once: 8 KB
  constexpr int kRows = 8;       // output rows folded together: 8 independent chains of fmas
  const int64_t G = a.K / 32, rows = std::min<int64_t>(16, a.M - m0);
  alignas(64) int32_t sums[kChunk][16 * 16];
  alignas(64) float acc[16][16];
  for (int r = 0; r < 16; ++r) _mm512_store_ps(acc[r], _mm512_setzero_ps());
  const int8_t* x = a.XQ + m0 * a.K;
  for (int64_t g0 = 0; g0 < G; g0 += kChunk) {
    const int64_t gn = std::min(kChunk, G - g0);
    _tile_zero(4);
    _tile_loadd(0, x + g0 * 32, a.K);
    _tile_loadd(2, w + g0 * 512, 64);
    _tile_dpbssd(4, 0, 2);
    for (int64_t i = 0; i < gn; i += 2) {  // set 0 holds group g0 + i, set 1 group g0 + i + 1
      const int64_t g = g0 + i;
      if constexpr (!Int4) prefetch_rows(w + (g + kChunk) * 512, 1024);  // 2 groups on (past the end: harmless)
      if (ahead != nullptr) prefetch_rows(ahead + g * 256, 512);  // int4: the next tile's packed codes
      if (i + 1 < gn) {
        _tile_zero(5);
        _tile_loadd(1, x + (g + 1) * 32, a.K);
        _tile_loadd(3, w + (g + 1) * 512, 64);
        _tile_dpbssd(5, 1, 3);
      }
      _tile_stored(4, sums[i], 64);
      if (i + 2 < gn) {
        _tile_zero(4);
        _tile_loadd(0, x + (g + 2) * 32, a.K);
        _tile_loadd(2, w + (g + 2) * 512, 64);
        _tile_dpbssd(4, 0, 2);
      }
      if (i + 1 < gn) _tile_stored(5, sums[i + 1], 64);
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      __m512 v[kRows];
      for (int r = 0; r < kRows; ++r) v[r] = _mm512_load_ps(acc[r0 + r]);
      for (int64_t i = 0; i < gn; ++i) {
        const int64_t blk = (n0 * G + g0 + i) * 16;
        const __m512 sc = Int4 ? _mm512_loadu_ps(a.scale + blk) : _mm512_setzero_ps();
        const __m512 zv = Int4 ? _mm512_loadu_ps(a.zero + blk) : _mm512_setzero_ps();
        for (int r = 0; r < kRows; ++r) {
          const int64_t mg = (m0 + r0 + r) * G + g0 + i;
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(sums[i] + 16 * (r0 + r)));
          if constexpr (Int4) {  // as int4_rows8: acc += dot * (scale * dx), then acc += zero * sum(x)
            v[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sc, _mm512_set1_ps(a.DX[mg])), v[r]);
            v[r] = _mm512_fmadd_ps(zv, _mm512_set1_ps(a.XS[mg]), v[r]);
          } else {  // as int8_rows8: acc += dot * dx, scaled per output row at the end
            v[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(a.DX[mg]), v[r]);
          }
        }
      }
      for (int r = 0; r < kRows; ++r) _mm512_store_ps(acc[r0 + r], v[r]);
    }
  }
  const __m512 sc = Int4 ? _mm512_set1_ps(1.f) : _mm512_loadu_ps(a.scale + n0 * 16);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 v = _mm512_load_ps(acc[r]);
    _mm512_storeu_ps(a.out + (m0 + r) * a.N + n0 * 16, Int4 ? v : _mm512_mul_ps(v, sc));
  }
}

// int4 codes of one output tile, two a byte (row q of a group's 4 x 64 bytes: tile row q in the low
// nibbles, row q + 4 in the high ones), to the tiles' int8 layout, centred (code - 8).
STREAMLLM_AMX void unpack_int4_tile(const uint8_t* src, int64_t G, int8_t* dst) {
  const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int64_t q = 0; q < 4 * G; ++q) {  // (group, row q) pairs in order
    const __m512i v = _mm512_loadu_si512(src + q * 64);
    int8_t* d = dst + (q / 4) * 512 + (q % 4) * 64;
    _mm512_storeu_si512(d, _mm512_sub_epi8(_mm512_and_si512(v, low), eight));
    _mm512_storeu_si512(d + 256, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), eight));
  }
}

template <bool Int4>
STREAMLLM_AMX void amx_tiles(const AmxArgs& a, int64_t n0, int64_t n1) {
  TileConfig cfg;
  for (int t = 0; t < 2; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 32;
  for (int t = 2; t < 4; ++t) cfg.rows[t] = 8, cfg.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  const int64_t G = a.K / 32;
  std::vector<int8_t> unpacked(Int4 ? G * 512 : 0);  // int4: one output tile's codes as int8, for every row tile
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w;
    const uint8_t* ahead = nullptr;
    if constexpr (Int4) {
      const uint8_t* packed = static_cast<const uint8_t*>(a.codes) + n * G * 256;
      unpack_int4_tile(packed, G, unpacked.data());
      w = unpacked.data();
      ahead = n + 1 < n1 ? packed + G * 256 : nullptr;  // fetched along the first row tile's groups
    } else {
      w = static_cast<const int8_t*>(a.codes) + n * G * 512;
    }
    for (int64_t m0 = 0; m0 < a.M; m0 += 16) amx_block<Int4>(a, w, m0, n, m0 == 0 ? ahead : nullptr);
  }
  _tile_release();
}

// x [M, K] fp32 @ int8 weights in the tile layout -> [M, N] fp32; int4 (centred codes, zero given) or
// int8 (per-row scale, no zero)
at::Tensor q8act_amx_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& zero) {
  TORCH_CHECK(amx_permitted(), "AMX int8 tiles are not available on this CPU or kernel");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x [M, K] fp32");
  const int64_t M = x.size(0), K = x.size(1), G = K / 32;
  TORCH_CHECK(K % 32 == 0, "K a multiple of 32");
  const bool int4 = zero.has_value();
  TORCH_CHECK(codes.dim() == 4 && codes.is_contiguous() && codes.scalar_type() == (int4 ? at::kByte : at::kChar) &&
                  codes.size(1) == G && codes.size(2) == (int4 ? 4 : 8) && codes.size(3) == 64,
              "codes [N/16, K/32, 4, 64] uint8 (int4) or [N/16, K/32, 8, 64] int8 (int8)");
  const int64_t N = codes.size(0) * 16;
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == (int4 ? N * G : N),
              "scale [N/16, K/32, 16] (int4) or [N] (int8) fp32");
  TORCH_CHECK(!int4 || (zero->is_contiguous() && zero->scalar_type() == at::kFloat && zero->numel() == N * G),
              "zero [N/16, K/32, 16] fp32");
  const int64_t Mp = (M + 15) / 16 * 16;  // whole tiles of activations: the padding rows are zero
  at::Tensor xq = at::zeros({Mp, K}, x.options().dtype(at::kChar));
  at::Tensor dx = at::zeros({Mp, G}, x.options()), xs = at::zeros({Mp, G}, x.options()), qs = at::empty({M, G}, x.options());
  quantize_groups(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), xs.data_ptr<float>(),
                  qs.data_ptr<float>());
  at::Tensor out = at::empty({M, N}, x.options());
  const AmxArgs a{xq.data_ptr<int8_t>(), dx.data_ptr<float>(), xs.data_ptr<float>(), M, K,
                  codes.data_ptr(), scale.data_ptr<float>(), int4 ? zero->data_ptr<float>() : nullptr,
                  out.data_ptr<float>(), N};
  at::parallel_for(0, N / 16, 8, [&](int64_t n0, int64_t n1) {
    if (int4) amx_tiles<true>(a, n0, n1);
    else amx_tiles<false>(a, n0, n1);
  });
  return out;
}


// -- the same matmuls with AVX-512 VNNI --------------------------------------------------------------
// On CPUs with AVX-512 VNNI but no AMX (Ice Lake and Sapphire Rapids servers where the tiles are not
// granted, AMD Zen 4 and later) a 512-bit dot product covers 16 output rows at once, where AVX2 covers 8:
// the integer work of `int4_rows8` / `int8_rows8` in half the instructions, up to 8 rows of activations
// per load of a group's weights. The weights are in the AMX tiles' layout (one output tile = 16 lanes,
// vector t holding inputs 4t..4t+3 of each); each lane runs the AVX2 loops' operations in their order,
// so the outputs are theirs bit for bit.
#define STREAMLLM_ZMM __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

bool zmm_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
}

struct ZmmArgs {
  const int8_t* XQ;  // [M, K]
  const float *DX, *XS, *QS;  // [M, G]
  int64_t K;
  const void* codes;  // as AmxArgs: int4 [N/16, G, 4, 64] uint8 (codes 0..15), int8 [N/16, G, 8, 64]
  const float *scale, *zero;  // int4: [N/16, G, 16] each; int8: scale [N], zero null
  float* out;
  int64_t N;
};

// Rows m0..m0+R of x against output tile n.
template <int R>
STREAMLLM_ZMM void int4_zmm_block(const ZmmArgs& a, int64_t n, int64_t m0) {
  const int64_t G = a.K / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* c = static_cast<const uint8_t*>(a.codes) + n * G * 256;
  const float* s = a.scale + n * G * 16;
  const float* z = a.zero + n * G * 16;
  const int8_t* x = a.XQ + m0 * a.K;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g, c += 256) {
    if (m0 == 0) prefetch_rows(c + G * 256, 256);  // the next tile's codes, along the first rows' pass
    __m512i w[8];
    for (int t = 0; t < 4; ++t) {
      const __m512i v = _mm512_loadu_si512(c + 64 * t);
      w[t] = _mm512_and_si512(v, low);
      w[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    __m512i sum[R];  // one chain of dot products per row, interleaved: each waits on the one before
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t v;
        std::memcpy(&v, x + r * a.K + g * 32 + 4 * t, 4);
        sum[r] = _mm512_dpbusd_epi32(sum[r], w[t], _mm512_set1_epi32(v));
      }
    }
    const __m512 sc = _mm512_loadu_ps(s + g * 16), zv = _mm512_loadu_ps(z + g * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t mg = (m0 + r) * G + g;
      const __m512 dot = _mm512_sub_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(8.f * a.QS[mg]));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sc, _mm512_set1_ps(a.DX[mg])), acc[r]);
      acc[r] = _mm512_fmadd_ps(zv, _mm512_set1_ps(a.XS[mg]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(a.out + (m0 + r) * a.N + n * 16, acc[r]);
}

// int8 weights are signed, so the activations go in as unsigned bytes, xq + 128 (`XQ` holds those here),
// and 128 * sum(w) comes off each group's integer sum: the same integers as int8_rows8's sign trick.
template <int R>
STREAMLLM_ZMM void int8_zmm_block(const ZmmArgs& a, int64_t n, int64_t m0) {
  const int64_t G = a.K / 32;
  const int8_t* w = static_cast<const int8_t*>(a.codes) + n * G * 512;
  const int8_t* x = a.XQ + m0 * a.K;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g, w += 512) {
    if (m0 == 0) prefetch_rows(w + G * 512, 512);
    __m512i sum[R], wsum = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const __m512i wv = _mm512_loadu_si512(w + 64 * t);
      wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t v;
        std::memcpy(&v, x + r * a.K + g * 32 + 4 * t, 4);
        sum[r] = _mm512_dpbusd_epi32(sum[r], _mm512_set1_epi32(v), wv);
      }
    }
    const __m512i bias = _mm512_slli_epi32(wsum, 7);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum[r], bias));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(a.DX[(m0 + r) * G + g]), acc[r]);
    }
  }
  const __m512 sc = _mm512_loadu_ps(a.scale + n * 16);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(a.out + (m0 + r) * a.N + n * 16, _mm512_mul_ps(acc[r], sc));
}

template <bool Int4>
void zmm_block(int64_t rows, const ZmmArgs& a, int64_t n, int64_t m0) {
  using Block = void (*)(const ZmmArgs&, int64_t, int64_t);
  static constexpr Block int4[8] = {int4_zmm_block<1>, int4_zmm_block<2>, int4_zmm_block<3>, int4_zmm_block<4>,
                                    int4_zmm_block<5>, int4_zmm_block<6>, int4_zmm_block<7>, int4_zmm_block<8>};
  static constexpr Block int8[8] = {int8_zmm_block<1>, int8_zmm_block<2>, int8_zmm_block<3>, int8_zmm_block<4>,
                                    int8_zmm_block<5>, int8_zmm_block<6>, int8_zmm_block<7>, int8_zmm_block<8>};
  (Int4 ? int4 : int8)[rows - 1](a, n, m0);
}

// x [M, K] fp32 @ int4 (zero given) or int8 weights in the tile layout (as q8act_amx_mm) -> [M, N] fp32
at::Tensor q8act_zmm_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& zero) {
  TORCH_CHECK(zmm_supported(), "this CPU lacks AVX-512 VNNI");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x [M, K] fp32");
  const int64_t M = x.size(0), K = x.size(1), G = K / 32;
  TORCH_CHECK(K % 32 == 0, "K a multiple of 32");
  const bool int4 = zero.has_value();
  TORCH_CHECK(codes.dim() == 4 && codes.is_contiguous() && codes.scalar_type() == (int4 ? at::kByte : at::kChar) &&
                  codes.size(1) == G && codes.size(2) == (int4 ? 4 : 8) && codes.size(3) == 64,
              "codes [N/16, K/32, 4, 64] uint8 (int4) or [N/16, K/32, 8, 64] int8 (int8)");
  const int64_t N = codes.size(0) * 16;
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == (int4 ? N * G : N),
              "scale [N/16, K/32, 16] (int4) or [N] (int8) fp32");
  TORCH_CHECK(!int4 || (zero->is_contiguous() && zero->scalar_type() == at::kFloat && zero->numel() == N * G),
              "zero [N/16, K/32, 16] fp32");
  const QuantizedX xq = quantize_x(x);
  if (!int4) {  // int8 weights take the activations as unsigned bytes, xq + 128 (int8_zmm_block)
    uint8_t* q = reinterpret_cast<uint8_t*>(xq.q.data_ptr<int8_t>());
    for (int64_t i = 0; i < M * K; ++i) q[i] ^= 0x80;
  }
  at::Tensor out = at::empty({M, N}, x.options());
  const ZmmArgs a{xq.q.data_ptr<int8_t>(), xq.d.data_ptr<float>(), xq.s.data_ptr<float>(), xq.qs.data_ptr<float>(),
                  K, codes.data_ptr(), scale.data_ptr<float>(), int4 ? zero->data_ptr<float>() : nullptr,
                  out.data_ptr<float>(), N};
  at::parallel_for(0, N / 16, int4 ? 2 : 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        if (int4) zmm_block<true>(std::min<int64_t>(8, M - m0), a, n, m0);
        else zmm_block<false>(std::min<int64_t>(8, M - m0), a, n, m0);
      }
    }
  });
  return out;
}


// -- greedy sampling ------------------------------------------------------------------------------------
// The index of each row's largest value, as torch.argmax(dim=-1): the first of equal maxima, and the
// first NaN where a row has one. torch's CPU reduction does ~0.75 G values/s (2 ms for 32 rows of a
// 49K vocabulary); this one reads 8 lanes at a time, rows in parallel.
int64_t argmax_row(const float* x, int64_t V) {
  int64_t j = 0, best_i = 0;
  float best = -INFINITY;
  if (V >= 8) {
    __m256 bv = _mm256_loadu_ps(x);
    __m256i bi = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i idx = bi;
    const __m256i step = _mm256_set1_epi32(8);
    __m256 nan = _mm256_cmp_ps(bv, bv, _CMP_UNORD_Q);
    for (j = 8; j + 8 <= V; j += 8) {
      idx = _mm256_add_epi32(idx, step);
      const __m256 v = _mm256_loadu_ps(x + j);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256 gt = _mm256_cmp_ps(v, bv, _CMP_GT_OQ);  // strictly greater: a lane keeps its first maximum
      bv = _mm256_blendv_ps(bv, v, gt);
      bi = _mm256_blendv_epi8(bi, idx, _mm256_castps_si256(gt));
    }
    if (_mm256_movemask_ps(nan) != 0) {  // a NaN wins, the first one
      for (int64_t k = 0; k < V; ++k)
        if (std::isnan(x[k])) return k;
    }
    alignas(32) float vals[8];
    alignas(32) int32_t ids[8];
    _mm256_store_ps(vals, bv);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ids), bi);
    best = vals[0], best_i = ids[0];
    for (int l = 1; l < 8; ++l) {
      if (vals[l] > best || (vals[l] == best && ids[l] < best_i)) best = vals[l], best_i = ids[l];
    }
  }
  for (; j < V; ++j) {  // the tail (or a row shorter than 8)
    if (std::isnan(x[j])) return j;
    if (x[j] > best || (j == 0 && !(x[j] < best))) best = x[j], best_i = j;
  }
  return best_i;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x [B, V] fp32");
  TORCH_CHECK(x.size(1) > 0 && x.size(1) < (int64_t{1} << 31), "0 < V < 2^31");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  const float* src = x.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) dst[b] = argmax_row(src + b * V, V);
  });
  return out;
}
}  // namespace

// The kernels keep the GIL (microseconds each at one row): releasing it around every call, as torch's own
// ops do, measured slower over HTTP (one stream, 63 -> 54 and 54 -> 43 tok/s, interleaved runs), each
// release being one more chance for the event loop to take the GIL and make the step wait for it back.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rope_write", &rope_write, "rotate q twice and k, scale q, write k/v into the pool rows");
  m.def("attend", &attend, "one-row-per-session attention over sink+window slots");
  m.def("add_rms_norm_", &add_rms_norm_, "x += y in place, then RMSNorm in fp32, output fp32 or bf16");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("int4_q8act_mm", &int4_q8act_mm, "x @ int4 weights (8-row interleaved), x quantized to int8 per 32");
  m.def("int8_dot_isa", &int8_dot_isa, "the int8-activation matmuls' instruction set; optionally allow VNNI or not",
        py::arg("allow_vnni") = py::none());
  m.def("int8_q8act_mm", &int8_q8act_mm, "x @ int8 weights (8-row interleaved), x quantized to int8 per 32");
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, dim=-1) for x [B, V] fp32, rows in parallel");
  m.def("zmm_available", &zmm_supported, "whether this CPU has AVX-512 VNNI for q8act_zmm_mm");
  m.def("q8act_zmm_mm", &q8act_zmm_mm, "q8act_amx_mm's matmuls with AVX-512 VNNI, 16 output rows per vector",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("zero") = py::none());
  m.def("amx_available", &amx_permitted, "whether this CPU and kernel let the AMX int8 tiles run");
  m.def("q8act_amx_mm", &q8act_amx_mm, "x @ int4 (zero given) or int8 weights in the AMX tile layout, x quantized to int8 per 32",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("zero") = py::none());
}
