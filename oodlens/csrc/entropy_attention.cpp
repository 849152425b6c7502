// Attention forward on the CPU that also returns, for every query, the log-sum-exp of its logits and the
// expected logit E_p[logit] (so entropy = lse - E_p[logit]) in the same pass over the keys.
//
// PyTorch's CPU flash kernel returns the log-sum-exp but not E_p[logit]; getting it from that kernel means
// attending with the keys appended to the values, which on the CPU (equal head sizes only) doubles the work.
// Here the softmax of each block of logits is done by hand, so E_p[logit] costs one multiply-add per logit.
//
// Layout: q [B, Hq, R, D], k and v [B, Hkv, S, D] (GQA: query head h reads key head h / (Hq / Hkv)), any
// strides as long as each row's D floats are contiguous (transformers' [B, T, H, D] -> [B, H, T, D]
// transposes are read in place); mask: none, causal (R == S, query i sees keys j <= i) or a bool [R, S]
// (true = attend). Outputs (float32): out [B, Hq, R, D], lse [B, Hq, R], mean_logit [B, Hq, R]. Rows that
// see no key get out 0, lse -inf, mean_logit 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
// MKL's per-thread thread count (the kernel links only against PyTorch's MKL; elsewhere the build fails and
// oodlens keeps its portable path). Each worker below calls BLAS on small blocks; letting MKL start its own
// threads inside it oversubscribes the cores (measured: 2.2x slower).
extern "C" int MKL_Set_Num_Threads_Local(int threads);

namespace {

constexpr int kBlockRows = 64;
constexpr int kBlockKeys = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major C[m x n] = A[m x k] * B[n x k]^T + beta * C (BLAS is column-major: computes C^T = B A^T).
void gemm_nt(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
             int ldc) {
  const float one = 1.0f;
  sgemm_("T", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Row-major C[m x n] = A[m x k] * B[k x n] + beta * C.
void gemm_nn(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
             int ldc) {
  const float one = 1.0f;
  sgemm_("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

// BLAS leading dimension for rows `stride` floats apart (at least the row length, even for a single row).
inline int ld(int64_t stride, int dim) { return static_cast<int>(std::max<int64_t>(stride, dim)); }

// exp(x) for 8 floats (Cephes polynomial, ~2 ulp); inputs below -88.4 give 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Online softmax over one block of a row: turns the logits s[0, n) (-inf = masked) into exp(s - m_new),
// updates the running max m, sum l and sum of p * s (e); returns the factor the row's output must be scaled
// by (exp(m_old - m_new)).
inline float softmax_block(float* s, int n, float& m, double& l, double& e) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  __m256 vmax = neg_inf;
  int j = 0;
  for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  float block_max = max8(vmax);
  for (; j < n; ++j) block_max = std::max(block_max, s[j]);
  if (block_max == kNegInf) {  // nothing visible in this block
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  const float m_new = std::max(m, block_max);
  const float alpha = m == kNegInf ? 0.0f : std::exp(m - m_new);
  const __m256 vm = _mm256_set1_ps(m_new);
  __m256 vsum = _mm256_setzero_ps(), vdot = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    const __m256 visible = _mm256_cmp_ps(x, neg_inf, _CMP_NEQ_OQ);
    const __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(x, vm)), visible);
    _mm256_storeu_ps(s + j, p);
    vsum = _mm256_add_ps(vsum, p);
    vdot = _mm256_add_ps(vdot, _mm256_and_ps(_mm256_mul_ps(p, x), visible));
  }
  double sum = sum8(vsum), dot = sum8(vdot);
  for (; j < n; ++j) {
    const float p = s[j] == kNegInf ? 0.0f : std::exp(s[j] - m_new);
    if (p > 0.0f) dot += static_cast<double>(p) * s[j];
    sum += p;
    s[j] = p;
  }
  l = l * alpha + sum;
  e = e * alpha + dot;
  m = m_new;
  return alpha;
}

std::vector<torch::Tensor> entropy_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                             const c10::optional<torch::Tensor>& mask, bool causal,
                                             double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "entropy_attention: float32 only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "entropy_attention: 4-d q, k, v");
  const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2);
  TORCH_CHECK(heads % kv_heads == 0 && v.size(1) == kv_heads && v.size(2) == keys && k.size(3) == dim &&
                  v.size(3) == dim,
              "entropy_attention: shapes do not match");
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->stride(3) == 1 || dim == 1, "entropy_attention: the last dimension must be contiguous");
  }
  // A dimension of size 1 may carry any stride; only its first row is ever read.
  const int64_t q_row = q.stride(2), k_row = k.stride(2), v_row = v.stride(2);
  TORCH_CHECK(!causal || rows == keys, "entropy_attention: causal needs as many keys as queries");
  const uint8_t* mask_data = nullptr;
  torch::Tensor mask_bytes;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dtype() == torch::kBool && mask->dim() == 2 && mask->size(0) == rows &&
                    mask->size(1) == keys,
                "entropy_attention: mask must be bool [queries, keys]");
    mask_bytes = mask->contiguous();
    mask_data = reinterpret_cast<const uint8_t*>(mask_bytes.data_ptr<bool>());
  }
  auto out = torch::empty({batch, heads, rows, dim}, q.options());
  auto lse = torch::empty({batch, heads, rows}, q.options());
  auto mean = torch::empty({batch, heads, rows}, q.options());
  const int64_t group = heads / kv_heads;
  const int64_t row_blocks = (rows + kBlockRows - 1) / kBlockRows;
  const float* q_data = q.data_ptr<float>();
  const float* k_data = k.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  float* lse_data = lse.data_ptr<float>();
  float* mean_data = mean.data_ptr<float>();
  const int d = static_cast<int>(dim);

  at::parallel_for(0, batch * heads * row_blocks, 1, [&](int64_t begin, int64_t end) {
    const int blas_threads = MKL_Set_Num_Threads_Local(1);
    std::vector<float> q_block(kBlockRows * dim), acc(kBlockRows * dim), logits(kBlockRows * kBlockKeys);
    std::vector<float> m(kBlockRows);
    std::vector<double> l(kBlockRows), e(kBlockRows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * row_blocks), h = (item / row_blocks) % heads;
      const int64_t r0 = (item % row_blocks) * kBlockRows, r1 = std::min(rows, r0 + kBlockRows);
      const int nr = static_cast<int>(r1 - r0);
      const float* q_rows = q_data + b * q.stride(0) + h * q.stride(1) + r0 * q_row;
      const int64_t kvh = h / group;
      const float* k_head = k_data + b * k.stride(0) + kvh * k.stride(1);
      const float* v_head = v_data + b * v.stride(0) + kvh * v.stride(1);
      for (int i = 0; i < nr; ++i) {
        for (int64_t c = 0; c < dim; ++c) {
          q_block[i * dim + c] = q_rows[i * q_row + c] * static_cast<float>(scale);
        }
      }
      std::fill(acc.begin(), acc.begin() + nr * dim, 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0);
      std::fill(e.begin(), e.end(), 0.0);
      const int64_t key_end = causal ? r1 : keys;
      for (int64_t k0 = 0; k0 < key_end; k0 += kBlockKeys) {
        const int nk = static_cast<int>(std::min<int64_t>(kBlockKeys, key_end - k0));
        gemm_nt(nr, nk, d, q_block.data(), d, k_head + k0 * k_row, ld(k_row, d), 0.0f, logits.data(),
                kBlockKeys);
        for (int i = 0; i < nr; ++i) {
          float* s = logits.data() + i * kBlockKeys;
          const int64_t row = r0 + i;
          if (causal) {
            const int64_t visible = std::max<int64_t>(0, std::min<int64_t>(nk, row - k0 + 1));
            std::fill(s + visible, s + nk, kNegInf);
          }
          if (mask_data != nullptr) {
            const uint8_t* allowed = mask_data + row * keys + k0;
            for (int j = 0; j < nk; ++j) {
              if (!allowed[j]) s[j] = kNegInf;
            }
          }
          const float alpha = softmax_block(s, nk, m[i], l[i], e[i]);
          if (alpha != 1.0f) {
            float* a = acc.data() + i * dim;
            for (int64_t c = 0; c < dim; ++c) a[c] *= alpha;
          }
        }
        gemm_nn(nr, d, nk, logits.data(), kBlockKeys, v_head + k0 * v_row, ld(v_row, d), 1.0f, acc.data(),
                d);
      }
      for (int i = 0; i < nr; ++i) {
        const int64_t index = (b * heads + h) * rows + r0 + i;
        float* o = out_data + index * dim;
        const float* a = acc.data() + i * dim;
        if (l[i] > 0.0) {
          const float inverse = static_cast<float>(1.0 / l[i]);
          for (int64_t c = 0; c < dim; ++c) o[c] = a[c] * inverse;
          lse_data[index] = m[i] + static_cast<float>(std::log(l[i]));
          mean_data[index] = static_cast<float>(e[i] / l[i]);
        } else {
          std::fill(o, o + dim, 0.0f);
          lse_data[index] = kNegInf;
          mean_data[index] = 0.0f;
        }
      }
    }
    MKL_Set_Num_Threads_Local(blas_threads);
  });
  return {out, lse, mean};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("entropy_attention", &entropy_attention,
             "attention with log-sum-exp and expected logit per query (CPU, float32)");
}
