// Fused CPU kernels for the "torch" backend (float32; the decode also reads bfloat16 / float16 caches), forward
// and backward of each NSA branch: compressed attention (Eq. 7) with its top-n block selection in the same pass
// (Eq. 8-11), selected-block attention (Eq. 12) and sliding-window attention. Each call handles one query chunk on
// the calling thread (the Python side spreads chunks over worker threads and the GIL is released here). Matrix
// products go to the BLAS that libtorch_cpu exports (sgemm_); masking, exp and the row statistics run in
// cache-sized tiles in between, so no score tensor of the whole chunk is ever materialised. Every call has a
// pure-PyTorch twin in torch_backend.py (the _*_chunk functions), against which tests/test_cpu_kernels.py checks it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#ifndef NSA_TILE_ROWS
#define NSA_TILE_ROWS 64
#endif
constexpr int64_t kSlcRows = NSA_TILE_ROWS;  // score rows (queries x G) per selected-branch tile
constexpr int64_t kCmpRows = NSA_TILE_ROWS;  // per compressed-branch tile

// Row-major C[M, N] = op(A) op(B) (+ C when accumulate); op(X) = X^T when the flag is set.
void gemm(bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
          int ldc, bool accumulate = false) {
  if (M <= 0 || N <= 0) return;
  const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  if (K <= 0) {
    if (!accumulate)
      for (int i = 0; i < M; ++i) std::fill(C + (int64_t)i * ldc, C + (int64_t)i * ldc + N, 0.0f);
    return;
  }
  // column-major view: C^T = op(B)^T op(A)^T
  const char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
  sgemm_(&opb, &opa, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

// exp(x) with -inf -> 0 and NaN kept: Cephes-style range reduction and degree-6 polynomial (relative error
// < 1e-7, measured max 8.3e-8 over [-87, 88)), 16 or 8 lanes at a time where AVX-512 / AVX2+FMA exist (the build
// uses -march=native).
constexpr float kLog2e = 1.44269504088896341f, kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_scalar(float x) {
  if (std::isnan(x)) return x;
  if (x < -87.0f) return 0.0f;
  const float xc = std::min(x, 88.0f);
  const float k = std::floor(xc * kLog2e + 0.5f);
  const float r = xc - k * kC1 - k * kC2;
  float p = kP[0];
  for (int i = 1; i < 6; ++i) p = p * r + kP[i];
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// Per-ISA primitives; vexp below is written once in terms of them.
#if defined(__AVX512F__)
using VecF = __m512;
constexpr int kLanes = 16;
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF vset(float x) { return _mm512_set1_ps(x); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm512_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }    // a*b + c
inline VecF vfnma(VecF a, VecF b, VecF c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a*b
inline VecF vmax(VecF a, VecF b) { return _mm512_max_ps(a, b); }
inline VecF vmin(VecF a, VecF b) { return _mm512_min_ps(a, b); }
inline VecF vfloor(VecF a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline VecF vpow2i(VecF k) {  // 2^k for integral k in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(k), _mm512_set1_epi32(127)), 23));
}
// e where x >= lo, 0 where x < lo, x where x is NaN
inline VecF vfix(VecF x, VecF e, float lo) {
  const __mmask16 under = _mm512_cmp_ps_mask(x, vset(lo), _CMP_LT_OQ);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(_mm512_maskz_mov_ps(static_cast<__mmask16>(~under), e), nan, x);
}
inline float hsum(VecF v) { return _mm512_reduce_add_ps(v); }
inline float hmax(VecF v) { return _mm512_reduce_max_ps(v); }
#define NSA_HAVE_VEC 1
#elif defined(__AVX2__) && defined(__FMA__)
using VecF = __m256;
constexpr int kLanes = 8;
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF vset(float x) { return _mm256_set1_ps(x); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm256_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vfnma(VecF a, VecF b, VecF c) { return _mm256_fnmadd_ps(a, b, c); }
inline VecF vmax(VecF a, VecF b) { return _mm256_max_ps(a, b); }
inline VecF vmin(VecF a, VecF b) { return _mm256_min_ps(a, b); }
inline VecF vfloor(VecF a) { return _mm256_floor_ps(a); }
inline VecF vpow2i(VecF k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127)), 23));
}
inline VecF vfix(VecF x, VecF e, float lo) {
  const VecF under = _mm256_cmp_ps(x, vset(lo), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_andnot_ps(under, e), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline float hsum(VecF v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}
inline float hmax(VecF v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  float m = t[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, t[i]);
  return m;
}
#define NSA_HAVE_VEC 1
#endif

#ifdef NSA_HAVE_VEC
// exp_scalar, lane by lane
inline VecF vexp(VecF x) {
  const VecF xc = vmin(vmax(x, vset(-87.0f)), vset(88.0f));
  const VecF k = vfloor(vfma(xc, vset(kLog2e), vset(0.5f)));
  const VecF r = vfnma(k, vset(kC2), vfnma(k, vset(kC1), xc));
  VecF p = vset(kP[0]);
  for (int i = 1; i < 6; ++i) p = vfma(p, r, vset(kP[i]));
  p = vadd(vfma(vmul(p, r), r, r), vset(1.0f));
  return vfix(x, vmul(p, vpow2i(k)), -87.0f);
}
#endif

// In place over one row s[0, n): s <- exp(s - m); returns the row sum. m = 0 for shift-free rows.
inline float exp_row(float* s, int n, float m) {
  int i = 0;
  float sum = 0.0f;
#ifdef NSA_HAVE_VEC
  VecF acc = vset(0.0f);
  const VecF mv = vset(m);
  for (; i + kLanes <= n; i += kLanes) {
    const VecF e = vexp(vsub(vload(s + i), mv));
    vstore(s + i, e);
    acc = vadd(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    s[i] = exp_scalar(s[i] - m);
    sum += s[i];
  }
  return sum;
}

// Largest finite-or-inf entry of s[0, n) (NaNs are skipped here; exp_row keeps them).
inline float row_max(const float* s, int n) {
  int i = 0;
  float m = kNegInf;
#ifdef NSA_HAVE_VEC
  VecF acc = vset(kNegInf);
  for (; i + kLanes <= n; i += kLanes) acc = vmax(acc, vload(s + i));
  m = hmax(acc);
#endif
  for (; i < n; ++i) m = std::max(m, s[i]);
  return m;
}


void check_f32(const at::Tensor& x, const char* name, int dim) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == dim && x.device().is_cpu(), name,
              " must be a contiguous float32 CPU tensor of dim ", dim);
}

// The chunk's valid (query, KV head, block) pairs bucketed by (head, block): the queries c of bucket h*NB + j are
// list[start[h*NB + j] .. start[h*NB + j + 1]), ascending. Skipped: -1, blocks past the query's own or the sequence,
// repeats.
struct BlockQueries {
  std::vector<int64_t> start;
  std::vector<int32_t> list;
  BlockQueries(const int64_t* idx, int64_t C, int64_t HKV, int64_t n, int64_t t0, int64_t lp, int64_t NB)
      : start(HKV * NB + 1, 0) {
    std::vector<int64_t> sel(n), key;
    std::vector<int32_t> qry;
    key.reserve(C * HKV * n);
    qry.reserve(C * HKV * n);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t own = (t0 + c) / lp;
      for (int64_t h = 0; h < HKV; ++h) {
        std::copy(idx + (c * HKV + h) * n, idx + (c * HKV + h + 1) * n, sel.begin());
        std::sort(sel.begin(), sel.end());
        for (int64_t s = 0; s < n; ++s) {
          const int64_t j = sel[s];
          if (j < 0 || j > own || j >= NB || (s > 0 && sel[s - 1] == j)) continue;
          start[h * NB + j + 1]++;
          key.push_back(h * NB + j);
          qry.push_back(static_cast<int32_t>(c));
        }
      }
    }
    for (int64_t i = 0; i < HKV * NB; ++i) start[i + 1] += start[i];
    list.resize(qry.size());
    std::vector<int64_t> fill(start.begin(), start.end() - 1);  // counting sort: stable, so queries stay ascending
    for (size_t i = 0; i < qry.size(); ++i) list[fill[key[i]]++] = qry[i];
  }
};

}  // namespace

// Selected attention of one chunk (Eq. 12).
//   q    [C*HKV(+1), G*Dk]  scaled queries, row c*HKV + h for query t0 + c (a trailing dummy row is ignored)
//   k, v [L*HKV, Dk|Dv]     the sequence's selection keys/values, row t*HKV + h
//   idx  [C, HKV, n] int64  selected block indices (any order; -1, blocks past the query's own, repeats: skipped)
// Returns o [C, HKV, G, Dv] and lse [C, HKV, G] (rows without a block: o = 0, lse = -inf). With shift_free the
// caller guarantees |score| is small enough for exp without max subtraction.
std::vector<at::Tensor> slc_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& idx, int64_t t0, int64_t lp, int64_t G, bool shift_free) {
  check_f32(q, "q", 2);
  check_f32(k, "k", 2);
  check_f32(v, "v", 2);
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.dim() == 3, "idx must be int64 [C, HKV, n]");
  const int64_t C = idx.size(0), HKV = idx.size(1), n = idx.size(2);
  const int64_t Dk = k.size(1), Dv = v.size(1), L = k.size(0) / HKV;
  TORCH_CHECK(q.size(0) >= C * HKV && q.size(1) == G * Dk, "q shape does not match idx/k");
  const int64_t NB = (L + lp - 1) / lp;
  auto o = at::zeros({C, HKV, G, Dv}, q.options());
  auto lse = at::empty({C, HKV, G}, q.options());
  {
    pybind11::gil_scoped_release no_gil;
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    float *op = o.data_ptr<float>(), *lp_out = lse.data_ptr<float>();
    const BlockQueries bq(ip, C, HKV, n, t0, lp, NB);
    const std::vector<int64_t>& start = bq.start;
    const std::vector<int32_t>& list = bq.list;
    // running softmax state per output row (c, h, g); o accumulates unnormalised
    std::vector<float> m_run(C * HKV * G, shift_free ? 0.0f : kNegInf), l_run(C * HKV * G, 0.0f);
    const int64_t PM = std::max<int64_t>(1, kSlcRows / G);  // queries per tile
    std::vector<float> qbuf(PM * G * Dk), sbuf(PM * G * lp), obuf(PM * G * Dv);
    const int ldk = static_cast<int>(HKV * Dk), ldv = static_cast<int>(HKV * Dv);
    for (int64_t h = 0; h < HKV; ++h) {
      for (int64_t j = 0; j < NB; ++j) {
        const int64_t b0 = start[h * NB + j], b1 = start[h * NB + j + 1];
        if (b0 == b1) continue;
        const int64_t k0 = j * lp;
        const int nk = static_cast<int>(std::min(lp, L - k0));
        const float* kb = kp + (k0 * HKV + h) * Dk;
        const float* vb = vp + (k0 * HKV + h) * Dv;
        for (int64_t p0 = b0; p0 < b1; p0 += PM) {
          const int64_t P = std::min(PM, b1 - p0);
          const int M = static_cast<int>(P * G);
          for (int64_t p = 0; p < P; ++p)
            std::memcpy(qbuf.data() + p * G * Dk, qp + (list[p0 + p] * HKV + h) * G * Dk, sizeof(float) * G * Dk);
          gemm(false, true, M, nk, static_cast<int>(Dk), qbuf.data(), static_cast<int>(Dk), kb, ldk, sbuf.data(),
               nk);
          for (int64_t p = 0; p < P; ++p) {
            const int64_t c = list[p0 + p];
            const int64_t nvis = std::min<int64_t>(nk, t0 + c - k0 + 1);  // keys k0 .. t visible (causal)
            for (int64_t g = 0; g < G; ++g) {
              float* s = sbuf.data() + (p * G + g) * nk;
              for (int64_t i = nvis; i < nk; ++i) s[i] = kNegInf;
              const float mrow = shift_free ? 0.0f : row_max(s, static_cast<int>(nvis));
              const float lrow = exp_row(s, nk, mrow);
              const int64_t r = (c * HKV + h) * G + g;
              if (!shift_free) {  // online merge with the row's earlier blocks
                const float mn = std::max(m_run[r], mrow);
                const float a = exp_scalar(m_run[r] - mn), b = exp_scalar(mrow - mn);
                if (a != 1.0f) {
                  float* orow = op + r * Dv;
                  for (int64_t d = 0; d < Dv; ++d) orow[d] *= a;
                }
                l_run[r] = l_run[r] * a + lrow * b;
                m_run[r] = mn;
                if (b != 1.0f)
                  for (int i = 0; i < nk; ++i) s[i] *= b;
              } else {
                l_run[r] += lrow;
              }
            }
          }
          gemm(false, false, M, static_cast<int>(Dv), nk, sbuf.data(), nk, vb, ldv, obuf.data(),
               static_cast<int>(Dv));
          for (int64_t p = 0; p < P; ++p) {
            float* orow = op + (list[p0 + p] * HKV + h) * G * Dv;
            const float* src = obuf.data() + p * G * Dv;
            for (int64_t e = 0; e < G * Dv; ++e) orow[e] += src[e];
          }
        }
      }
    }
    for (int64_t r = 0; r < C * HKV * G; ++r) {
      const float l = l_run[r];
      float* orow = op + r * Dv;
      if (l > 0.0f) {
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < Dv; ++d) orow[d] *= inv;
        lp_out[r] = m_run[r] + std::log(l);
      } else {
        lp_out[r] = kNegInf;
      }
    }
  }
  return {o, lse};
}

// Sliding-window attention of one chunk: query t sees keys max(0, t-w+1) .. t.
//   q [C*HKV(+1), G*Dk] scaled queries (row c*HKV + h, position t0 + c); k, v [L*HKV, Dk|Dv] (row t*HKV + h).
// Returns o [C, HKV, G, Dv] and lse [C, HKV, G].
std::vector<at::Tensor> win_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t C,
                                int64_t HKV, int64_t t0, int64_t w, int64_t G, bool shift_free) {
  check_f32(q, "q", 2);
  check_f32(k, "k", 2);
  check_f32(v, "v", 2);
  const int64_t Dk = k.size(1), Dv = v.size(1);
  TORCH_CHECK(q.size(0) >= C * HKV && q.size(1) == G * Dk, "q shape does not match k");
  auto o = at::empty({C, HKV, G, Dv}, q.options());
  auto lse = at::empty({C, HKV, G}, q.options());
  {
    pybind11::gil_scoped_release no_gil;
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    float *op = o.data_ptr<float>(), *lp_out = lse.data_ptr<float>();
    const int64_t Wt = std::min<int64_t>(std::max<int64_t>(8, 128 / G), 64);  // queries per tile
    const int64_t NK = w + Wt - 1;
    std::vector<float> qbuf(Wt * G * Dk), sbuf(Wt * G * NK), obuf(Wt * G * Dv);
    const int ldk = static_cast<int>(HKV * Dk), ldv = static_cast<int>(HKV * Dv);
    for (int64_t h = 0; h < HKV; ++h) {
      for (int64_t a = 0; a < C; a += Wt) {
        const int64_t nq = std::min(Wt, C - a);
        const int64_t klo = std::max<int64_t>(0, t0 + a - w + 1), khi = t0 + a + nq;  // keys [klo, khi)
        const int nk = static_cast<int>(khi - klo);
        const int M = static_cast<int>(nq * G);
        for (int64_t i = 0; i < nq; ++i)
          std::memcpy(qbuf.data() + i * G * Dk, qp + ((a + i) * HKV + h) * G * Dk, sizeof(float) * G * Dk);
        gemm(false, true, M, nk, static_cast<int>(Dk), qbuf.data(), static_cast<int>(Dk), kp + (klo * HKV + h) * Dk,
             ldk, sbuf.data(), nk);
        std::vector<float> inv(M);
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t t = t0 + a + i;
          const int64_t lo = std::max<int64_t>(0, t - w + 1) - klo, hi = t - klo + 1;  // visible columns [lo, hi)
          for (int64_t g = 0; g < G; ++g) {
            float* s = sbuf.data() + (i * G + g) * nk;
            for (int64_t x = 0; x < lo; ++x) s[x] = 0.0f;
            for (int64_t x = hi; x < nk; ++x) s[x] = 0.0f;
            const float mrow = shift_free ? 0.0f : row_max(s + lo, static_cast<int>(hi - lo));
            const float l = exp_row(s + lo, static_cast<int>(hi - lo), mrow);
            inv[i * G + g] = 1.0f / l;
            lp_out[((a + i) * HKV + h) * G + g] = mrow + std::log(l);
          }
        }
        gemm(false, false, M, static_cast<int>(Dv), nk, sbuf.data(), nk, vp + (klo * HKV + h) * Dv, ldv,
             obuf.data(), static_cast<int>(Dv));
        for (int64_t i = 0; i < nq; ++i)
          for (int64_t g = 0; g < G; ++g) {
            float* dst = op + (((a + i) * HKV + h) * G + g) * Dv;
            const float* src = obuf.data() + (i * G + g) * Dv;
            const float s = inv[i * G + g];
            for (int64_t d = 0; d < Dv; ++d) dst[d] = src[d] * s;
          }
      }
    }
  }
  return {o, lse};
}

// Eq. 9: blk[j] += the group-summed probabilities ps[0, nv) of the compressed tokens overlapping selection block
// j, weighted by W [r, 2] (own block, next block) by a token's offset inside its block (l' = r*d).
inline void add_block_scores(const float* ps, int64_t nv, int64_t r, const float* wp, float* blk) {
  for (int64_t j = 0, x0 = 0; x0 < nv; ++j, x0 += r) {  // token x0 + o lies in block j at offset o
    const int64_t ne = std::min(r, nv - x0);
    float own_part = 0.0f, next_part = 0.0f;
    for (int64_t o = 0; o < ne; ++o) {
      own_part += ps[x0 + o] * wp[o * 2];
      next_part += ps[x0 + o] * wp[o * 2 + 1];
    }
    blk[j] += own_part;
    blk[j + 1] += next_part;
  }
}

// Top-n of one query's block scores blk[0, nb) (Eq. 11): forced blocks (j < n_init or j > nb - 1 - n_local) first,
// then the highest scores, ties to the lower index (NaN ranks lowest); writes n ascending indices, -1 padded.
// The best candidates are kept in a small sorted list: most blocks are rejected with one comparison.
void topn_row(const float* blk, int64_t nb, int64_t n, int64_t n_init, int64_t n_local, int64_t* out,
              std::vector<std::pair<float, int64_t>>& best) {
  const int64_t own = nb - 1;
  if (nb <= n) {
    for (int64_t j = 0; j < n; ++j) out[j] = j < nb ? j : -1;
    return;
  }
  int64_t f = 0;
  for (int64_t j = 0; j < nb && f < n; ++j)
    if (j < n_init || j > own - n_local) out[f++] = j;
  const int64_t want = n - f;
  best.clear();
  if (want > 0) {
    // candidates in ascending j: a later block enters only with a strictly higher score (ties keep the lower j)
    for (int64_t j = std::min(n_init, nb); j <= own - n_local; ++j) {
      const float v = std::isnan(blk[j]) ? kNegInf : blk[j];
      if (static_cast<int64_t>(best.size()) == want && !(v > best.back().first)) continue;
      auto pos = std::upper_bound(best.begin(), best.end(), v,
                                  [](float x, const std::pair<float, int64_t>& e) { return x > e.first; });
      best.insert(pos, {v, j});
      if (static_cast<int64_t>(best.size()) > want) best.pop_back();
    }
  }
  for (const auto& e : best) out[f++] = e.second;
  std::sort(out, out + f);
  for (int64_t j = f; j < n; ++j) out[j] = -1;
}

// Compressed attention of one chunk (Eq. 7) and, with n_sel > 0, its top-n selected blocks (Eq. 8-11).
//   q  [C*HKV(+1), G*Dk] scaled queries (row c*HKV + h, position t0 + c)
//   kc [HKV, Tcp, Dk], vc [HKV, Tcp, Dv] compressed tokens (head-major; only the first Tc are read)
//   W  [r, 2] Eq. 9 weights of a compressed token by its offset inside a selection block (own, next); r = l'/d
// Query t sees compressed tokens i with i*d + l - 1 <= t. Returns o [C, HKV, G, Dv], lse [C, HKV, G] and, with
// n_sel > 0, idx [C, HKV, n_sel] int64 (else an empty tensor).
std::vector<at::Tensor> cmp_fwd(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& W,
                                int64_t C, int64_t t0, int64_t l, int64_t d, int64_t Tc, int64_t n_sel,
                                int64_t n_init, int64_t n_local, bool shift_free) {
  check_f32(q, "q", 2);
  check_f32(kc, "kc", 3);
  check_f32(vc, "vc", 3);
  check_f32(W, "W", 2);
  const int64_t HKV = kc.size(0), Tcp = kc.size(1), Dk = kc.size(2), Dv = vc.size(2), r = W.size(0);
  TORCH_CHECK(q.size(1) % Dk == 0 && q.size(0) >= C * HKV && Tc <= Tcp, "cmp_fwd: shapes do not match");
  const int64_t G = q.size(1) / Dk;
  const int64_t lp = r * d;
  auto o = at::empty({C, HKV, G, Dv}, q.options());
  auto lse = at::empty({C, HKV, G}, q.options());
  auto idx = n_sel > 0 ? at::empty({C, HKV, n_sel}, q.options().dtype(at::kLong)) : at::empty({0}, q.options());
  {
    pybind11::gil_scoped_release no_gil;
    const float *qp = q.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
    const float* wp = W.data_ptr<float>();
    float *op = o.data_ptr<float>(), *lsp = lse.data_ptr<float>();
    int64_t* ip = n_sel > 0 ? idx.data_ptr<int64_t>() : nullptr;
    auto nvis = [&](int64_t t) -> int64_t { return t < l - 1 ? 0 : std::min(Tc, (t - l + 1) / d + 1); };
    const int64_t MQ = std::max<int64_t>(1, kCmpRows / G);  // queries per tile
    const int64_t hmax = nvis(t0 + C - 1);
    std::vector<float> qbuf(MQ * G * Dk), sbuf(MQ * G * std::max<int64_t>(hmax, 1)), obuf(MQ * G * Dv);
    std::vector<float> inv(MQ * G), ps(std::max<int64_t>(hmax, 1)), blk((t0 + C - 1) / lp + 2);
    std::vector<std::pair<float, int64_t>> cand;
    for (int64_t h = 0; h < HKV; ++h) {
      const float* kh = kp + h * Tcp * Dk;
      const float* vh = vp + h * Tcp * Dv;
      for (int64_t a = 0; a < C; a += MQ) {
        const int64_t nq = std::min(MQ, C - a);
        const int hi = static_cast<int>(nvis(t0 + a + nq - 1));
        const int M = static_cast<int>(nq * G);
        for (int64_t i = 0; i < nq; ++i)
          std::memcpy(qbuf.data() + i * G * Dk, qp + ((a + i) * HKV + h) * G * Dk, sizeof(float) * G * Dk);
        gemm(false, true, M, hi, static_cast<int>(Dk), qbuf.data(), static_cast<int>(Dk), kh, static_cast<int>(Dk),
             sbuf.data(), std::max(hi, 1));
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t nv = nvis(t0 + a + i);
          for (int64_t g = 0; g < G; ++g) {
            float* srow = sbuf.data() + (i * G + g) * hi;
            for (int64_t x = nv; x < hi; ++x) srow[x] = 0.0f;
            const int64_t row = ((a + i) * HKV + h) * G + g;
            if (nv == 0) {
              inv[i * G + g] = 0.0f;
              lsp[row] = kNegInf;
              continue;
            }
            const float m = shift_free ? 0.0f : row_max(srow, static_cast<int>(nv));
            const float sum = exp_row(srow, static_cast<int>(nv), m);
            inv[i * G + g] = 1.0f / sum;
            lsp[row] = m + std::log(sum);
          }
        }
        gemm(false, false, M, static_cast<int>(Dv), hi, sbuf.data(), std::max(hi, 1), vh, static_cast<int>(Dv),
             obuf.data(), static_cast<int>(Dv));
        for (int64_t i = 0; i < nq; ++i)
          for (int64_t g = 0; g < G; ++g) {
            float* dst = op + (((a + i) * HKV + h) * G + g) * Dv;
            const float* src = obuf.data() + (i * G + g) * Dv;
            const float sc = inv[i * G + g];
            for (int64_t e = 0; e < Dv; ++e) dst[e] = src[e] * sc;
          }
        if (n_sel <= 0) continue;
        for (int64_t i = 0; i < nq; ++i) {  // Eq. 8 (normalise), Eq. 10 (group sum), Eq. 9 (overlap) -> top-n
          const int64_t t = t0 + a + i, nv = nvis(t), nb = t / lp + 1;
          std::fill(ps.begin(), ps.begin() + std::max<int64_t>(nv, 0), 0.0f);
          for (int64_t g = 0; g < G; ++g) {
            const float* srow = sbuf.data() + (i * G + g) * hi;
            const float sc = inv[i * G + g];
            for (int64_t x = 0; x < nv; ++x) ps[x] += srow[x] * sc;
          }
          std::fill(blk.begin(), blk.begin() + nb + 1, 0.0f);
          add_block_scores(ps.data(), nv, r, wp, blk.data());
          topn_row(blk.data(), nb, n_sel, n_init, n_local, ip + ((a + i) * HKV + h) * n_sel, cand);
        }
      }
    }
  }
  return {o, lse, idx};
}

// ------------------------------------------------------------------------------------------------ backward
namespace {

// One tile of a branch's backward. Q [M, Dk], dO [M, Dv] (contiguous), keys K / values V (row stride ldk / ldv,
// nk rows); row i sees columns [lo[i], hi[i]) (hi <= lo: no key), has log-sum-exp lse[i] and
// delta[i] = rowsum(dO * o) (- dlse). With P = exp(Q K^T - lse) on the visible columns and dS = P (dO V^T - delta):
// dV += P^T dO and dK += dS^T Q (accumulated in place, row strides ldv / ldk), dQ = dS K (written, [M, Dk]).
struct BwdScratch {
  std::vector<float> s, dp;
};

void attn_bwd_tile(int M, int nk, int Dk, int Dv, const float* Q, const float* dO, const float* K, int ldk,
                   const float* V, int ldv, const int64_t* lo, const int64_t* hi, const float* lse,
                   const float* delta, float* dK, int lddk, float* dV, int lddv, float* dQ, BwdScratch& ws) {
  if (M <= 0 || nk <= 0) {
    for (int64_t e = 0; e < static_cast<int64_t>(M) * Dk; ++e) dQ[e] = 0.0f;
    return;
  }
  ws.s.resize(static_cast<size_t>(M) * nk);
  ws.dp.resize(static_cast<size_t>(M) * nk);
  float *S = ws.s.data(), *dP = ws.dp.data();
  gemm(false, true, M, nk, Dk, Q, Dk, K, ldk, S, nk);
  for (int i = 0; i < M; ++i) {
    float* row = S + static_cast<int64_t>(i) * nk;
    const int64_t a = std::max<int64_t>(lo[i], 0), b = std::min<int64_t>(hi[i], nk);
    if (b <= a) {
      std::fill(row, row + nk, 0.0f);
      continue;
    }
    std::fill(row, row + a, 0.0f);
    std::fill(row + b, row + nk, 0.0f);
    exp_row(row + a, static_cast<int>(b - a), lse[i]);
  }
  gemm(true, false, nk, Dv, M, S, nk, dO, Dv, dV, lddv, true);     // dV += P^T dO
  gemm(false, true, M, nk, Dv, dO, Dv, V, ldv, dP, nk);            // dP = dO V^T
  for (int i = 0; i < M; ++i) {
    float* ds = dP + static_cast<int64_t>(i) * nk;
    const float* p = S + static_cast<int64_t>(i) * nk;
    const float dl = delta[i];
    for (int x = 0; x < nk; ++x) ds[x] = p[x] * (ds[x] - dl);
  }
  gemm(false, false, M, Dk, nk, dP, nk, K, ldk, dQ, Dk);           // dQ = dS K
  gemm(true, false, nk, Dk, M, dP, nk, Q, Dk, dK, lddk, true);     // dK += dS^T Q
}

// Gathers the G rows of query (c, h): q rows, dO rows times the branch's gate (Eq. 5; no gate: 1), lse, delta.
struct RowGather {
  int64_t HKV, G, Dk, Dv;
  const float *q, *dO, *lse, *delta, *gate;
  int64_t branch;  // gate[row * 3 + branch]
  void operator()(int64_t c, int64_t h, int64_t slot, float* qb, float* db, float* lb, float* eb) const {
    const int64_t r = c * HKV + h;
    std::memcpy(qb + slot * G * Dk, q + r * G * Dk, sizeof(float) * G * Dk);
    if (gate == nullptr) {
      std::memcpy(db + slot * G * Dv, dO + r * G * Dv, sizeof(float) * G * Dv);
    } else {
      for (int64_t g = 0; g < G; ++g) {
        const float gs = gate[(r * G + g) * 3 + branch];
        const float* src = dO + (r * G + g) * Dv;
        float* dst = db + (slot * G + g) * Dv;
        for (int64_t e = 0; e < Dv; ++e) dst[e] = src[e] * gs;
      }
    }
    std::memcpy(lb + slot * G, lse + r * G, sizeof(float) * G);
    std::memcpy(eb + slot * G, delta + r * G, sizeof(float) * G);
  }
};

// Checks the backward's per-row inputs and returns the gate pointer (nullptr for an empty gates tensor).
const float* check_bwd(const at::Tensor& dO, const at::Tensor& gates, const at::Tensor& delta, const at::Tensor& lse,
                       const at::Tensor& dq, int64_t C, int64_t HKV, int64_t G, int64_t Dk, int64_t Dv) {
  check_f32(dO, "dO", 4);
  check_f32(delta, "delta", 3);
  check_f32(lse, "lse", 3);
  check_f32(dq, "dq", 4);
  TORCH_CHECK(dO.size(0) == C && dO.size(1) == HKV && dO.size(2) == G && dO.size(3) == Dv, "dO shape");
  TORCH_CHECK(delta.numel() == C * HKV * G && lse.numel() == C * HKV * G, "delta / lse shape");
  TORCH_CHECK(dq.size(0) == C && dq.size(1) == HKV && dq.size(2) == G && dq.size(3) == Dk, "dq shape");
  if (gates.numel() == 0) return nullptr;
  check_f32(gates, "gates", 4);
  TORCH_CHECK(gates.numel() == C * HKV * G * 3, "gates must be [C, HKV, G, 3]");
  return gates.data_ptr<float>();
}

}  // namespace

// Selected attention backward of one chunk. Arguments as slc_fwd, plus dO [C, HKV, G, Dv] (the gradient of the
// gated sum; the branch's own output gradient is dO times its gate, gates [C, HKV, G, 3] or empty: no gates),
// delta and lse [C, HKV, G]. dk / dv [L*HKV, Dk|Dv] accumulate the key / value gradients and dq [C, HKV, G, Dk]
// the gradient with respect to the scaled queries.
void slc_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
             const at::Tensor& dO, const at::Tensor& gates, const at::Tensor& delta, const at::Tensor& lse,
             at::Tensor dk, at::Tensor dv, at::Tensor dq, int64_t t0, int64_t lp, int64_t G) {
  check_f32(q, "q", 2);
  check_f32(k, "k", 2);
  check_f32(v, "v", 2);
  check_f32(dk, "dk", 2);
  check_f32(dv, "dv", 2);
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.dim() == 3, "idx must be int64 [C, HKV, n]");
  const int64_t C = idx.size(0), HKV = idx.size(1), n = idx.size(2);
  const int64_t Dk = k.size(1), Dv = v.size(1), L = k.size(0) / HKV;
  const float* gp = check_bwd(dO, gates, delta, lse, dq, C, HKV, G, Dk, Dv);
  const int64_t branch = 1;
  TORCH_CHECK(dk.sizes() == k.sizes() && dv.sizes() == v.sizes(), "dk / dv must match k / v");
  const int64_t NB = (L + lp - 1) / lp;
  {
    pybind11::gil_scoped_release no_gil;
    const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    float *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>(), *dqp = dq.data_ptr<float>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const RowGather gather{HKV, G, Dk, Dv, q.data_ptr<float>(), dO.data_ptr<float>(), lse.data_ptr<float>(),
                           delta.data_ptr<float>(), gp, branch};
    const BlockQueries bq(ip, C, HKV, n, t0, lp, NB);
    const std::vector<int64_t>& start = bq.start;
    const std::vector<int32_t>& list = bq.list;
    const int64_t PM = std::max<int64_t>(1, kSlcRows / G);
    std::vector<float> qb(PM * G * Dk), db(PM * G * Dv), lb(PM * G), eb(PM * G), dqb(PM * G * Dk);
    std::vector<int64_t> lo(PM * G, 0), hi(PM * G);
    BwdScratch ws;
    for (int64_t h = 0; h < HKV; ++h)
      for (int64_t j = 0; j < NB; ++j) {
        const int64_t b0 = start[h * NB + j], b1 = start[h * NB + j + 1];
        if (b0 == b1) continue;
        const int64_t k0 = j * lp;
        const int nk = static_cast<int>(std::min(lp, L - k0));
        const int64_t off_k = (k0 * HKV + h) * Dk, off_v = (k0 * HKV + h) * Dv;
        for (int64_t p0 = b0; p0 < b1; p0 += PM) {
          const int64_t P = std::min(PM, b1 - p0);
          for (int64_t p = 0; p < P; ++p) {
            const int64_t c = list[p0 + p];
            gather(c, h, p, qb.data(), db.data(), lb.data(), eb.data());
            for (int64_t g = 0; g < G; ++g) hi[p * G + g] = std::min<int64_t>(nk, t0 + c - k0 + 1);
          }
          attn_bwd_tile(static_cast<int>(P * G), nk, static_cast<int>(Dk), static_cast<int>(Dv), qb.data(),
                        db.data(), kp + off_k, static_cast<int>(HKV * Dk), vp + off_v, static_cast<int>(HKV * Dv),
                        lo.data(), hi.data(), lb.data(), eb.data(), dkp + off_k, static_cast<int>(HKV * Dk),
                        dvp + off_v, static_cast<int>(HKV * Dv), dqb.data(), ws);
          for (int64_t p = 0; p < P; ++p) {
            float* dst = dqp + (list[p0 + p] * HKV + h) * G * Dk;
            const float* src = dqb.data() + p * G * Dk;
            for (int64_t e = 0; e < G * Dk; ++e) dst[e] += src[e];
          }
        }
      }
  }
}

// Sliding-window backward of one chunk (arguments as win_fwd plus dO, delta, lse, dk, dv as slc_bwd).
void win_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dO,
             const at::Tensor& gates, const at::Tensor& delta, const at::Tensor& lse, at::Tensor dk, at::Tensor dv,
             at::Tensor dq, int64_t C, int64_t HKV, int64_t t0, int64_t w, int64_t G) {
  check_f32(q, "q", 2);
  check_f32(k, "k", 2);
  check_f32(v, "v", 2);
  check_f32(dk, "dk", 2);
  check_f32(dv, "dv", 2);
  const int64_t Dk = k.size(1), Dv = v.size(1);
  const float* gp = check_bwd(dO, gates, delta, lse, dq, C, HKV, G, Dk, Dv);
  const int64_t branch = 2;
  TORCH_CHECK(dk.sizes() == k.sizes() && dv.sizes() == v.sizes(), "dk / dv must match k / v");
  {
    pybind11::gil_scoped_release no_gil;
    const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    float *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>(), *dqp = dq.data_ptr<float>();
    const RowGather gather{HKV, G, Dk, Dv, q.data_ptr<float>(), dO.data_ptr<float>(), lse.data_ptr<float>(),
                           delta.data_ptr<float>(), gp, branch};
    const int64_t Wt = std::min<int64_t>(std::max<int64_t>(8, 128 / G), 64);
    std::vector<float> qb(Wt * G * Dk), db(Wt * G * Dv), lb(Wt * G), eb(Wt * G), dqb(Wt * G * Dk);
    std::vector<int64_t> lo(Wt * G), hi(Wt * G);
    BwdScratch ws;
    for (int64_t h = 0; h < HKV; ++h)
      for (int64_t a = 0; a < C; a += Wt) {
        const int64_t nq = std::min(Wt, C - a);
        const int64_t klo = std::max<int64_t>(0, t0 + a - w + 1), khi = t0 + a + nq;
        for (int64_t i = 0; i < nq; ++i) {
          gather(a + i, h, i, qb.data(), db.data(), lb.data(), eb.data());
          const int64_t t = t0 + a + i;
          for (int64_t g = 0; g < G; ++g) {
            lo[i * G + g] = std::max<int64_t>(0, t - w + 1) - klo;
            hi[i * G + g] = t - klo + 1;
          }
        }
        const int64_t off_k = klo * HKV * Dk + h * Dk, off_v = klo * HKV * Dv + h * Dv;
        attn_bwd_tile(static_cast<int>(nq * G), static_cast<int>(khi - klo), static_cast<int>(Dk),
                      static_cast<int>(Dv), qb.data(), db.data(), kp + off_k, static_cast<int>(HKV * Dk), vp + off_v,
                      static_cast<int>(HKV * Dv), lo.data(), hi.data(), lb.data(), eb.data(), dkp + off_k,
                      static_cast<int>(HKV * Dk), dvp + off_v, static_cast<int>(HKV * Dv), dqb.data(), ws);
        for (int64_t i = 0; i < nq; ++i) {
          float* dst = dqp + ((a + i) * HKV + h) * G * Dk;
          const float* src = dqb.data() + i * G * Dk;
          for (int64_t e = 0; e < G * Dk; ++e) dst[e] += src[e];
        }
      }
  }
}

// Compressed-attention backward of one chunk (arguments as cmp_fwd plus dO, delta, lse; dkc / dvc [HKV, Tcp, D]
// accumulate). Rows with no visible compressed token get no gradient.
void cmp_bwd(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& dO,
             const at::Tensor& gates, const at::Tensor& delta, const at::Tensor& lse, at::Tensor dkc,
             at::Tensor dvc, at::Tensor dq, int64_t C, int64_t t0, int64_t l, int64_t d, int64_t Tc) {
  check_f32(q, "q", 2);
  check_f32(kc, "kc", 3);
  check_f32(vc, "vc", 3);
  check_f32(dkc, "dkc", 3);
  check_f32(dvc, "dvc", 3);
  const int64_t HKV = kc.size(0), Tcp = kc.size(1), Dk = kc.size(2), Dv = vc.size(2);
  const int64_t G = q.size(1) / Dk;
  const float* gp = check_bwd(dO, gates, delta, lse, dq, C, HKV, G, Dk, Dv);
  const int64_t branch = 0;
  TORCH_CHECK(dkc.sizes() == kc.sizes() && dvc.sizes() == vc.sizes() && Tc <= Tcp, "dkc / dvc must match kc / vc");
  {
    pybind11::gil_scoped_release no_gil;
    const float *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
    float *dkp = dkc.data_ptr<float>(), *dvp = dvc.data_ptr<float>(), *dqp = dq.data_ptr<float>();
    const RowGather gather{HKV, G, Dk, Dv, q.data_ptr<float>(), dO.data_ptr<float>(), lse.data_ptr<float>(),
                           delta.data_ptr<float>(), gp, branch};
    auto nvis = [&](int64_t t) -> int64_t { return t < l - 1 ? 0 : std::min(Tc, (t - l + 1) / d + 1); };
    const int64_t MQ = std::max<int64_t>(1, kCmpRows / G);
    std::vector<float> qb(MQ * G * Dk), db(MQ * G * Dv), lb(MQ * G), eb(MQ * G), dqb(MQ * G * Dk);
    std::vector<int64_t> lo(MQ * G, 0), hi(MQ * G);
    BwdScratch ws;
    for (int64_t h = 0; h < HKV; ++h)
      for (int64_t a = 0; a < C; a += MQ) {
        const int64_t nq = std::min(MQ, C - a);
        for (int64_t i = 0; i < nq; ++i) {
          gather(a + i, h, i, qb.data(), db.data(), lb.data(), eb.data());
          for (int64_t g = 0; g < G; ++g) hi[i * G + g] = nvis(t0 + a + i);
        }
        attn_bwd_tile(static_cast<int>(nq * G), static_cast<int>(nvis(t0 + a + nq - 1)), static_cast<int>(Dk),
                      static_cast<int>(Dv), qb.data(), db.data(), kp + h * Tcp * Dk, static_cast<int>(Dk),
                      vp + h * Tcp * Dv, static_cast<int>(Dv), lo.data(), hi.data(), lb.data(), eb.data(),
                      dkp + h * Tcp * Dk, static_cast<int>(Dk), dvp + h * Tcp * Dv, static_cast<int>(Dv), dqb.data(),
                      ws);
        for (int64_t i = 0; i < nq; ++i) {
          float* dst = dqp + ((a + i) * HKV + h) * G * Dk;
          const float* src = dqb.data() + i * G * Dk;
          for (int64_t e = 0; e < G * Dk; ++e) dst[e] += src[e];
        }
      }
  }
}

// ------------------------------------------------------------------------------------------------ decode
namespace {

// A cache [B, S, HKV, D] of element type T (float, bfloat16 or half) read in place: row (b, s, h) at
// p + b*sb + s*ss + h*sh (last dim contiguous, ss >= D so that a run of positions is a BLAS matrix with leading
// dimension ss; 16-bit caches are converted to float in tiles of kCvtRows positions on their way to the BLAS).
template <typename T>
struct CacheView {
  const T* p;
  int64_t B, S, H, D, sb, ss, sh;
  int ld;  // the BLAS leading dimension of a run of positions
  CacheView(const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.scalar_type() == c10::CppTypeToScalarType<T>::value && x.dim() == 4 && x.device().is_cpu() &&
                    (x.size(3) <= 1 || x.stride(3) == 1) && (x.size(1) <= 1 || x.stride(1) >= x.size(3)),
                name, " must be a CPU tensor [B, S, HKV, D] of the caches' dtype, last dim contiguous, position "
                "stride >= D");
    p = x.data_ptr<T>();
    B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), sb = x.stride(0), ss = x.stride(1), sh = x.stride(2);
    const int64_t lead = S <= 1 ? std::max<int64_t>(D, 1) : ss;  // one position: its stride is never stepped
    TORCH_CHECK(lead <= std::numeric_limits<int>::max() && S <= std::numeric_limits<int>::max() &&
                    D <= std::numeric_limits<int>::max(),
                name, ": sizes and the position stride must fit a BLAS int");
    ld = static_cast<int>(lead);
  }
  const T* at(int64_t b, int64_t s, int64_t h) const { return p + b * sb + s * ss + h * sh; }
};

#ifndef NSA_CVT_ROWS
#define NSA_CVT_ROWS 512
#endif
// positions of a 16-bit cache converted to float per BLAS call: fewer calls beat a smaller buffer (2-core AMD
// EPYC, bf16, 64k and 128k: 32 rows 2x, 128 rows 1.1-1.8x, 512 and 2048 rows 1.0x the float32 step's time)
constexpr int kCvtRows = NSA_CVT_ROWS;

inline void to_float(const at::BFloat16* x, float* y, int n) {  // bf16 is the top half of a float
  const uint16_t* u = reinterpret_cast<const uint16_t*>(x);
  int i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i)));
    _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
#endif
  for (; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(u[i]) << 16;
    std::memcpy(y + i, &bits, sizeof(float));
  }
}

inline void to_float(const at::Half* x, float* y, int n) {
  int i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
#endif
  for (; i < n; ++i) y[i] = static_cast<float>(x[i]);
}

// rows [cnt, D] (row stride ld) -> buf [cnt, D] float, contiguous
template <typename T>
void rows_to_float(const T* x, int ld, int cnt, int D, float* buf) {
  for (int r = 0; r < cnt; ++r) to_float(x + static_cast<int64_t>(r) * ld, buf + static_cast<int64_t>(r) * D, D);
}

// C[g, cnt] (row stride ldc) = Q[g, dk] K^T, K = cnt cache rows from k (stride ldk).
inline void gemm_qk(int g, int cnt, int dk, const float* q, const float* k, int ldk, float* c, int ldc, float*) {
  gemm(false, true, g, cnt, dk, q, dk, k, ldk, c, ldc);
}
template <typename T>
void gemm_qk(int g, int cnt, int dk, const float* q, const T* k, int ldk, float* c, int ldc, float* buf) {
  for (int x = 0; x < cnt; x += kCvtRows) {
    const int m = std::min(kCvtRows, cnt - x);
    rows_to_float(k + static_cast<int64_t>(x) * ldk, ldk, m, dk, buf);
    gemm(false, true, g, m, dk, q, dk, buf, dk, c + x, ldc);
  }
}

// O[g, dv] (+)= P[g, cnt] (row stride ldp) V, V = cnt cache rows from v (stride ldv).
inline void gemm_pv(int g, int dv, int cnt, const float* p, int ldp, const float* v, int ldv, float* o, bool acc,
                    float*) {
  gemm(false, false, g, dv, cnt, p, ldp, v, ldv, o, dv, acc);
}
template <typename T>
void gemm_pv(int g, int dv, int cnt, const float* p, int ldp, const T* v, int ldv, float* o, bool acc,
             float* buf) {
  if (cnt <= 0) gemm(false, false, g, dv, 0, p, ldp, buf, dv, o, dv, acc);  // zero-fills unless accumulating
  for (int x = 0; x < cnt; x += kCvtRows) {
    const int m = std::min(kCvtRows, cnt - x);
    rows_to_float(v + static_cast<int64_t>(x) * ldv, ldv, m, dv, buf);
    gemm(false, false, g, dv, m, p + x, ldp, buf, dv, o, dv, acc || x > 0);
  }
}

// Rows of s [G, n] (row stride lds) in place: s <- softmax(s), normalised before the products with V (their sums
// then stay in range wherever the output does); inv[g] = 1, the factor left for the output (0 for an empty row, so
// that a NaN gate still gives NaN).
void softmax_rows(float* s, int64_t G, int64_t n, int64_t lds, float* inv) {
  for (int64_t g = 0; g < G; ++g) {
    float* row = s + g * lds;
    if (n == 0) {
      inv[g] = 0.0f;
      continue;
    }
    const float m = row_max(row, static_cast<int>(n));
    const float sum = exp_row(row, static_cast<int>(n), std::isinf(m) ? 0.0f : m);
    const float r = 1.0f / sum;  // the row max contributes exp(0) = 1, so sum >= 1 (NaN stays NaN)
    for (int64_t x = 0; x < n; ++x) row[x] *= r;
    inv[g] = 1.0f;
  }
}

// out[g] += gate[g] * inv[g] * o[g] over the G rows of o [G, Dv].
void add_branch(float* out, const float* o, const float* inv, const float* gate, int64_t G, int64_t Dv) {
  for (int64_t g = 0; g < G; ++g) {
    const float c = gate[g * 3] * inv[g];
    for (int64_t e = 0; e < Dv; ++e) out[g * Dv + e] += c * o[g * Dv + e];
  }
}

}  // namespace

// NSA decode (Eq. 5, 7-12): R query rows, each one position of its own cached sequence, all three branches and
// their gates for the G heads of every KV head; the caches are read in place. Row r reads cache row rb[r] at
// position t = pos[r]: compressed tokens i with i*d + l - 1 <= t, its top-n selection blocks (ties to the lower
// block), causal inside a block, and positions max(0, t - w + 1) .. t of the window at slot position - ws[rb[r]].
//   q     [R, HKV, G, Dk] scaled queries        gates [R, HKV, G, 3] (cmp, slc, win)
//   kc/vc [B, Sc, HKV, Dk|Dv]  ks/vs [B, S, HKV, Dk|Dv]  kw/vw [B, W, HKV, Dk|Dv]  (CacheView layouts)
//   W     [r, 2] Eq. 9 weights, as in cmp_fwd (l' = r*d)
// The six caches share one dtype: float32, or bfloat16 / float16 converted to float32 on the way (the
// arithmetic is float32 throughout).
// Returns o [R, HKV, G, Dv] float32 and idx [R, HKV, n] int64 (ascending, -1 padded).
template <typename T>
std::vector<at::Tensor> decode_rows(const at::Tensor& q, const at::Tensor& gates, const at::Tensor& kc,
                                    const at::Tensor& vc, const at::Tensor& ks, const at::Tensor& vs,
                                    const at::Tensor& kw, const at::Tensor& vw, const at::Tensor& pos,
                                    const at::Tensor& rb, const at::Tensor& ws, const at::Tensor& W, int64_t l,
                                    int64_t d, int64_t n, int64_t n_init, int64_t n_local, int64_t w) {
  check_f32(q, "q", 4);
  check_f32(gates, "gates", 4);
  check_f32(W, "W", 2);
  const CacheView<T> KC(kc, "k_cmp"), VC(vc, "v_cmp"), KS(ks, "k_slc"), VS(vs, "v_slc"), KW(kw, "k_win"),
      VW(vw, "v_win");
  const int64_t R = q.size(0), HKV = q.size(1), G = q.size(2), Dk = q.size(3), Dv = VS.D, r = W.size(0);
  const int64_t lp = r * d;
  for (const at::Tensor* x : {&pos, &rb, &ws})
    TORCH_CHECK(x->scalar_type() == at::kLong && x->is_contiguous() && x->dim() == 1 && x->device().is_cpu(),
                "decode_fwd: pos, rb and ws must be contiguous int64 CPU vectors");
  TORCH_CHECK(pos.size(0) == R && rb.size(0) == R && ws.size(0) == KS.B && gates.size(0) == R &&
                  gates.size(1) == HKV && gates.size(2) == G && gates.size(3) == 3 && KC.D == Dk && KS.D == Dk &&
                  KW.D == Dk && VC.D == Dv && VW.D == Dv && n >= 1 && w >= 1 && l >= 1 && d >= 1 && r >= 1,
              "decode_fwd: shapes do not match");
  for (const CacheView<T>* c : {&KC, &VC, &KS, &VS, &KW, &VW})  // every cache as wide as its K twin, HKV heads
    TORCH_CHECK(c->H == HKV && c->B == KS.B, "decode_fwd: caches must share B and HKV");
  TORCH_CHECK(VC.S >= KC.S && VS.S >= KS.S && VW.S >= KW.S && KC.B == KS.B && KW.B == KS.B,
              "decode_fwd: value caches shorter than their key caches");
  const int64_t *pp = pos.data_ptr<int64_t>(), *bp = rb.data_ptr<int64_t>(), *wsp = ws.data_ptr<int64_t>();
  auto nvis = [&](int64_t t) -> int64_t { return t < l - 1 ? 0 : (t - l + 1) / d + 1; };
  int64_t most = 1;
  for (int64_t i = 0; i < R; ++i) {  // nothing below reads outside the caches
    const int64_t t = pp[i], b = bp[i];
    TORCH_CHECK(b >= 0 && b < KS.B && t >= 0 && t < KS.S && nvis(t) <= KC.S,
                "decode_fwd: row ", i, " (cache row ", b, ", position ", t, ") outside the caches");
    const int64_t lo = std::max<int64_t>(0, t - w + 1);
    TORCH_CHECK(lo - wsp[b] >= 0 && t - wsp[b] < KW.S, "decode_fwd: row ", i, "'s window is outside k_win");
    const int64_t nb = t / lp + 1;  // selected tokens: at most t + 1 (every block), else n whole blocks <= t
    most = std::max({most, nvis(t), n >= nb ? t + 1 : n * lp, t - lo + 1});
  }
  auto o = at::zeros({R, HKV, G, Dv}, q.options());
  auto idx = at::empty({R, HKV, n}, q.options().dtype(at::kLong));
  {
    pybind11::gil_scoped_release no_gil;
    const float *qp = q.data_ptr<float>(), *gp = gates.data_ptr<float>(), *wp = W.data_ptr<float>();
    float* op = o.data_ptr<float>();
    int64_t* ip = idx.data_ptr<int64_t>();
    at::parallel_for(0, R * HKV, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> s(G * most), ob(G * Dv), inv(G), ps(most), blk,
          buf(std::is_same<T, float>::value ? 0 : kCvtRows * std::max(Dk, Dv));
      std::vector<std::pair<float, int64_t>> cand;
      for (int64_t u = begin; u < end; ++u) {
        const int64_t i = u / HKV, h = u % HKV, t = pp[i], b = bp[i];
        const float* qu = qp + u * G * Dk;
        const float* gu = gp + u * G * 3;
        float* out = op + u * G * Dv;
        int64_t* sel = ip + u * n;
        const int dk = static_cast<int>(Dk), dv = static_cast<int>(Dv), g = static_cast<int>(G);
        // compression branch (Eq. 7) and the selection scores (Eq. 8-10, 9 as in cmp_fwd)
        const int64_t nv = nvis(t), nb = t / lp + 1;
        blk.assign(nb + 1, 0.0f);
        if (nv > 0) {
          const int nvi = static_cast<int>(nv);
          gemm_qk(g, nvi, dk, qu, KC.at(b, 0, h), KC.ld, s.data(), nvi, buf.data());
          softmax_rows(s.data(), G, nv, nv, inv.data());
          gemm_pv(g, dv, nvi, s.data(), nvi, VC.at(b, 0, h), VC.ld, ob.data(), false, buf.data());
          add_branch(out, ob.data(), inv.data(), gu, G, Dv);
          std::fill(ps.begin(), ps.begin() + nv, 0.0f);
          for (int64_t gg = 0; gg < G; ++gg)
            for (int64_t x = 0; x < nv; ++x) ps[x] += s[gg * nv + x] * inv[gg];
          add_block_scores(ps.data(), nv, r, wp, blk.data());
        }
        if (nv == 0)  // o_cmp = 0: its gate still multiplies it (a NaN or inf gate gives NaN, as g * 0 does)
          for (int64_t gg = 0; gg < G; ++gg)
            for (int64_t e = 0; e < Dv; ++e) out[gg * Dv + e] += gu[gg * 3] * 0.0f;
        topn_row(blk.data(), nb, n, n_init, n_local, sel, cand);  // Eq. 11
        // selected blocks (Eq. 12), causal inside the query's own block
        int64_t total = 0;
        for (int64_t k = 0; k < n; ++k)
          if (sel[k] >= 0) total += std::min(lp, t + 1 - sel[k] * lp);
        if (total > 0) {
          const int tot = static_cast<int>(total);
          for (int64_t k = 0, off = 0; k < n; ++k) {
            if (sel[k] < 0) continue;
            const int cnt = static_cast<int>(std::min(lp, t + 1 - sel[k] * lp));
            gemm_qk(g, cnt, dk, qu, KS.at(b, sel[k] * lp, h), KS.ld, s.data() + off, tot, buf.data());
            off += cnt;
          }
          softmax_rows(s.data(), G, total, total, inv.data());
          for (int64_t k = 0, off = 0; k < n; ++k) {
            if (sel[k] < 0) continue;
            const int cnt = static_cast<int>(std::min(lp, t + 1 - sel[k] * lp));
            gemm_pv(g, dv, cnt, s.data() + off, tot, VS.at(b, sel[k] * lp, h), VS.ld, ob.data(), off > 0,
                    buf.data());
            off += cnt;
          }
          add_branch(out, ob.data(), inv.data(), gu + 1, G, Dv);
        }
        // sliding window: positions lo .. t
        const int64_t lo = std::max<int64_t>(0, t - w + 1);
        const int cnt = static_cast<int>(t - lo + 1);
        gemm_qk(g, cnt, dk, qu, KW.at(b, lo - wsp[b], h), KW.ld, s.data(), cnt, buf.data());
        softmax_rows(s.data(), G, cnt, cnt, inv.data());
        gemm_pv(g, dv, cnt, s.data(), cnt, VW.at(b, lo - wsp[b], h), VW.ld, ob.data(), false, buf.data());
        add_branch(out, ob.data(), inv.data(), gu + 2, G, Dv);
      }
    });
  }
  return {o, idx};
}

std::vector<at::Tensor> decode_fwd(const at::Tensor& q, const at::Tensor& gates, const at::Tensor& kc,
                                   const at::Tensor& vc, const at::Tensor& ks, const at::Tensor& vs,
                                   const at::Tensor& kw, const at::Tensor& vw, const at::Tensor& pos,
                                   const at::Tensor& rb, const at::Tensor& ws, const at::Tensor& W, int64_t l,
                                   int64_t d, int64_t n, int64_t n_init, int64_t n_local, int64_t w) {
  switch (ks.scalar_type()) {
    case at::kFloat:
      return decode_rows<float>(q, gates, kc, vc, ks, vs, kw, vw, pos, rb, ws, W, l, d, n, n_init, n_local, w);
    case at::kBFloat16:
      return decode_rows<at::BFloat16>(q, gates, kc, vc, ks, vs, kw, vw, pos, rb, ws, W, l, d, n, n_init, n_local,
                                       w);
    case at::kHalf:
      return decode_rows<at::Half>(q, gates, kc, vc, ks, vs, kw, vw, pos, rb, ws, W, l, d, n, n_init, n_local, w);
    default:
      TORCH_CHECK(false, "decode_fwd: the caches must be float32, bfloat16 or float16");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("slc_fwd", &slc_fwd, "selected attention forward of one chunk (float32)");
  m.def("cmp_fwd", &cmp_fwd, "compressed attention forward of one chunk, with its top-n blocks (float32)");
  m.def("slc_bwd", &slc_bwd, "selected attention backward of one chunk (float32)");
  m.def("win_bwd", &win_bwd, "sliding-window attention backward of one chunk (float32)");
  m.def("cmp_bwd", &cmp_bwd, "compressed attention backward of one chunk (float32)");
  m.def("win_fwd", &win_fwd, "sliding-window attention forward of one chunk (float32)");
  m.def("decode_fwd", &decode_fwd,
        "NSA decode of query rows over caches read in place, all branches (float32 / bfloat16 / float16 caches)");
}
