// Building blocks of the C++ CPU attention kernels (csrc/attention.cpp, csrc/relpos.cpp): row-major GEMM through
// the BLAS torch links, input rows as fp32 blocks, dynamic longest-first scheduling over ATen's thread pool.
// Include from .cpp files only (needs ATen).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <limits>
#include <vector>

// Fortran BLAS single-precision GEMM (MKL or OpenBLAS inside libtorch_cpu). Weak: a torch build without it loads
// this library anyway and uses the portable loop below.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace tlv_fast {
namespace cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// TLV_FAST_CPU_GEMM=portable (read once) selects the portable loop even when BLAS is there: how the tests check it
inline bool have_blas() {
  static const bool use = [] {
    const char* choice = std::getenv("TLV_FAST_CPU_GEMM");
    return sgemm_ != nullptr && !(choice != nullptr && std::string(choice) == "portable");
  }();
  return use;
}

// Row-major C (M x N) = alpha * op(A) op(B) + beta * C, op(X) = X or X^T; lda/ldb/ldc are row strides.
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (have_blas() && K > 0) {
    // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.0f) {
      std::fill(c, c + N, 0.0f);
    } else if (beta != 1.0f) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
    for (int64_t p = 0; p < K; ++p) {
      const float a = alpha * (ta ? A[p * lda + i] : A[i * lda + p]);
      if (!tb) {
        const float* b = B + p * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      } else {
        for (int64_t j = 0; j < N; ++j) c[j] += a * B[j * ldb + p];
      }
    }
  }
}

// Rows [i0, i0 + m) of (b, h) of a (B, H, N, width) input as an fp32 row-major block {p, ld}: the input's own memory
// when it is fp32 with contiguous rows (no copy), else converted into the caller's buffer (16-bit inputs convert
// block by block inside the tasks: no whole-tensor fp32 copy, and no fresh pages to fault in on every call).
struct Block {
  const float* p;
  int64_t ld;
};

struct Rows {
  at::Tensor t;
  int64_t sb, sh, si, sd, width;
  bool direct;
  explicit Rows(const at::Tensor& x) : t(x), sb(x.stride(0)), sh(x.stride(1)), si(x.stride(2)), sd(x.stride(3)),
                                       width(x.size(3)) {
    direct = x.scalar_type() == at::kFloat && (width <= 1 || sd == 1) && (x.size(2) <= 1 || si >= width);
  }
  // bfloat16 rows of unit stride: the upper half of a float, widened by a shift (vectorises)
  void convert(const at::BFloat16* src, int64_t m, float* dst) const {
    if (sd != 1) return convert_any(src, m, dst);
    for (int64_t r = 0; r < m; ++r) {
      const uint16_t* row = reinterpret_cast<const uint16_t*>(src + r * si);
      uint32_t* out = reinterpret_cast<uint32_t*>(dst + r * width);
      for (int64_t d = 0; d < width; ++d) out[d] = static_cast<uint32_t>(row[d]) << 16;
    }
  }
  template <typename T>
  void convert(const T* src, int64_t m, float* dst) const { convert_any(src, m, dst); }
  template <typename T>
  void convert_any(const T* src, int64_t m, float* dst) const {
    for (int64_t r = 0; r < m; ++r) {
      const T* row = src + r * si;
      float* out = dst + r * width;
      if (sd == 1) {
        for (int64_t d = 0; d < width; ++d) out[d] = static_cast<float>(row[d]);
      } else {
        for (int64_t d = 0; d < width; ++d) out[d] = static_cast<float>(row[d * sd]);
      }
    }
  }
  Block block(int64_t b, int64_t h, int64_t i0, int64_t m, std::vector<float>& buf) const {
    const int64_t off = b * sb + h * sh + i0 * si;
    if (direct) return {t.data_ptr<float>() + off, std::max<int64_t>(m > 1 ? si : width, 1)};
    if (static_cast<int64_t>(buf.size()) < m * width) buf.resize(m * width);
    switch (t.scalar_type()) {
      case at::kFloat: convert(t.data_ptr<float>() + off, m, buf.data()); break;
      case at::kHalf: convert(t.data_ptr<at::Half>() + off, m, buf.data()); break;
      case at::kBFloat16: convert(t.data_ptr<at::BFloat16>() + off, m, buf.data()); break;
      default: TORCH_CHECK(false, "native attention: unsupported dtype ", t.scalar_type());
    }
    return {buf.data(), std::max<int64_t>(width, 1)};
  }
};

// Runs worker(next) on every thread; next() hands out 0, 1, ..., n - 1 once each, then -1: threads that finish
// early take more (no thread waits on a fixed share of uneven tasks).
template <typename F>
void parallel_dynamic(int64_t n, const F& worker) {
  std::atomic<int64_t> counter{0};
  const auto next = [&]() -> int64_t {
    const int64_t i = counter.fetch_add(1, std::memory_order_relaxed);
    return i < n ? i : -1;
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) worker(next);
  });
}

// the tasks' indices by decreasing cost (longest first: the last tasks to start are the short ones)
inline std::vector<int64_t> heaviest_first(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// the key range [0, kend) of every (b, h, query block)
}  // namespace cpu
}  // namespace tlv_fast
