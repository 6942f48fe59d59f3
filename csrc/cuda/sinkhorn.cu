// Batched log-domain Sinkhorn on CUDA: forward and the replayed backward (math: ../sinkhorn.cpp).
//
// Design. One problem per thread-block cluster. Each CTA of the cluster keeps a slab of rows of the (dustbin-
// augmented) score matrix in shared memory for all iterations, so the matrix is read from HBM once and the plan
// written once. Row log-sum-exps are local to a CTA (a warp per row); column log-sum-exps combine the CTAs' partial
// maxima and sums through distributed shared memory (sm_90 clusters, up to 8 CTAs: 321 x 321 fp32 = 412 KB spans
// 2 CTAs). When even 8 CTAs cannot hold the matrix (or before sm_90, beyond one CTA), one CTA per problem streams
// the matrix from global memory at every half-iteration (L2 catches much of it).
//
// Backward: pass 1 replays the half-steps in reverse, in reductions only, and records the adjoint consumed by each
// (du_t, dv_t); pass 2 forms every dS_ij = G_ij - sum_t (du_t,i A_t,ij + dv_t,j B_t,ij) once, so dS is written once.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "sinkhorn.h"

namespace cg = cooperative_groups;

namespace tlv_fast {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCluster = 8;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> __device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

// ---- exp2 on the FMA pipe (tests/ops/test_sinkhorn_cuda_math.py reads this block: keep one constant a line) ----
// 2^x = 2^floor(x) * p(x - floor(x)), p(f) = 1 + f (c1 + f (c2 + f (c3 + f (c4 + f c5)))): minimax relative error
// on [0, 1] with p(0) = 1 exactly (a Remez fit, coefficients rounded to fp32): 1.5e-7 relative as evaluated in fp32,
// the accuracy of MUFU.EX2. x is clamped to [kExp2Lo, kExp2Hi] (-inf -> 2^-127 * p(0) -> exactly +0; x > 127: the
// one-pass sum leaves its range and is recomputed exactly); floor(x) + kExp2Magic by an add rounded toward -inf.
// NaN in, NaN out (as MUFU.EX2): a NaN score poisons its sums whichever unit its column's exponential runs on.
constexpr float kExp2C1 = 0.6931512951850891f;
constexpr float kExp2C2 = 0.24016444385051727f;
constexpr float kExp2C3 = 0.05579991266131401f;
constexpr float kExp2C4 = 0.009017030708491802f;
constexpr float kExp2C5 = 0.0018671300495043397f;
constexpr float kExp2Lo = -127.0f;
constexpr float kExp2Hi = 127.0f;
constexpr float kExp2Magic = 12582912.0f;  // 1.5 * 2^23: floor(x) sits in the low mantissa bits
// ---- end of the exp2 constants ----

// 2^x, none on the special-function unit: the clamp (2 compare-selects that keep a NaN: fmaxf would turn it into
// kExp2Lo, a 0 term), FADD.RM, 2 FADD, 5 FFMA, one LEA that adds floor(x) to the exponent field (the low 9 bits of
// t's mantissa hold floor(x) in two's complement; << 23 moves them onto the exponent; unsigned, modulo 2^32) and a
// last FFMA f * 0 + y: exactly y for f in [0, 1], NaN for a NaN x (the integer add alone would not keep the NaN). A
// select on x != x instead keeps x live to the end: ptxas then spilled in the resident NCH = 8 kernels.
// x in (-127, -126) gives a value below 2^-126 (a subnormal pattern, 0 for flush-to-zero math).
__device__ __forceinline__ float exp2_poly(float x) {
  float xc = x < kExp2Lo ? kExp2Lo : x;  // NaN stays NaN
  xc = xc > kExp2Hi ? kExp2Hi : xc;
  const float t = __fadd_rd(xc, kExp2Magic);
  const float f = xc - (t - kExp2Magic);  // exact: xc - floor(xc) in [0, 1] (NaN for NaN)
  float q = fmaf(f, kExp2C5, kExp2C4);
  q = fmaf(f, q, kExp2C3);
  q = fmaf(f, q, kExp2C2);
  q = fmaf(f, q, kExp2C1);
  q = fmaf(f, q, 1.0f);
  const float y = __uint_as_float(__float_as_uint(q) + (__float_as_uint(t) << 23));
  return fmaf(f, 0.0f, y);
}
// 2^x on the special-function unit: MUFU.EX2 alone (flush-to-zero: no range fix-up instructions); 2^-inf = 0
__device__ __forceinline__ float exp2_mufu(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
template <bool POLY> __device__ __forceinline__ float exp2_(float x) { return POLY ? exp2_poly(x) : exp2_mufu(x); }
template <bool POLY> __device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float log2_(float x) { return __log2f(x); }
__device__ __forceinline__ double log2_(double x) { return log2(x); }
template <typename A> constexpr A kLog2e = A(1.4426950408889634);
template <typename A> constexpr A kLn2 = A(0.6931471805599453);

// natural exponentials (the backward and the output): e^x = 2^(x log2 e), one FMUL and MUFU.EX2
__device__ __forceinline__ float exp_(float x) { return exp2_mufu(x * kLog2e<float>); }  // exp(-inf) = 0
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return __logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
template <typename A> __device__ __forceinline__ A neg_inf() { return -INFINITY; }

template <typename A> __device__ __forceinline__ A warp_max(A x) {
  for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <typename A> __device__ __forceinline__ A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// cluster helpers: a plain launch is a cluster of one CTA
__device__ __forceinline__ unsigned cluster_size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cg::this_cluster().num_blocks();
#else
  return 1;
#endif
}
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cg::this_cluster().block_rank();
#else
  return 0;
#endif
}
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::this_cluster().sync();
#else
  __syncthreads();
#endif
}
template <typename A> __device__ __forceinline__ const A* peer(const A* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cg::this_cluster().map_shared_rank(const_cast<A*>(p), rank);
#else
  return p;
#endif
}
// barrier over the CTAs that share a problem (the cluster when RESIDENT, else the CTA)
template <bool RESIDENT> __device__ __forceinline__ void problem_sync() {
  if (RESIDENT) {
    cluster_sync();
  } else {
    __syncthreads();
  }
}

// The slab of rows [r0, r0 + nr) of the augmented matrix: in shared memory (RESIDENT) or read from global memory.
template <typename T, bool RESIDENT>
struct Scores {
  using A = typename AccOf<T>::type;
  const T* smem;         // nr x Na
  const T* global;       // problem b
  int64_t s1, s2;
  A bin;
  int r0, M, N, Na;
  __device__ __forceinline__ A operator()(int i_local, int j) const {
    if (RESIDENT) return to_acc(smem[static_cast<int64_t>(i_local) * Na + j]);
    const int i = r0 + i_local;
    return (i < M && j < N) ? to_acc(global[i * s1 + j * s2]) : bin;
  }
};

template <typename T>
__device__ void load_slab(T* dst, const T* src, int64_t s1, int64_t s2, int r0, int nr, int M, int N, int Na,
                          T bin) {
  const int64_t total = static_cast<int64_t>(nr) * Na;
  for (int64_t idx = threadIdx.x; idx < total; idx += kThreads) {
    const int il = static_cast<int>(idx / Na), j = static_cast<int>(idx % Na), i = r0 + il;
    dst[idx] = (i < M && j < N) ? src[i * s1 + j * s2] : bin;
  }
}

__host__ __device__ inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }

struct Geometry {  // per-CTA row slab: the cluster splits the Ma rows into `cluster` slabs of `rows` rows
  int Ma, Na, rows;
  int nch;  // forward: 32-column chunks a lane keeps in registers (a column group is 32 * nch columns)
};

// ------------------------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------------------------
// Thread layout, the same in both half-steps: warp w owns the slab rows w, w + 16, ...; lane l owns the columns
// jg + l + 32 c (c < NCH) of each column group jg (one group when Na <= 32 NCH). A row update sums along a warp's
// row (column potentials in registers, one warp reduction per row); a column update sums down the warp's rows into
// per-lane registers (column shifts in registers, the row potential loaded once per row), then across the 16 warps
// through shared memory and across the cluster through distributed shared memory. All 512 threads work in both.
//
// One pass per half-step, in base 2 (x2 = S log2 e + potential2): the log-sum-exp shift is the same LSE's value of
// the previous iteration (as ../sinkhorn.cpp); a sum outside [kSumLo, kSumHi] (the shift drifted by more than 64 bits,
// or the first iteration) is recomputed exactly (maximum pass, then sum). Every kPolyPeriod-th chunk's exponential
// runs on the FMA pipe (exp2_poly), the others on MUFU.EX2, so that the special-function unit is not the floor.
constexpr int kHalfWarps = kWarps / 2;
constexpr int kPolyPeriod = 4;
template <typename A> constexpr A kSumLo = A(5.421010862427522e-20);   // 2^-64
template <typename A> constexpr A kSumHi = A(1.8446744073709552e19);   // 2^64
template <typename A> __device__ __forceinline__ A pos_inf() { return INFINITY; }
// f(std::integral_constant<int, C>) for C = B .. E - 1: a compile-time chunk index (which exponential unit it uses)
template <int B, int E, typename F> __device__ __forceinline__ void static_for(F&& f) {
  if constexpr (B < E) {
    f(std::integral_constant<int, B>{});
    static_for<B + 1, E>(f);
  }
}

template <typename A>
struct FwdShared {  // layout of the dynamic shared memory (accumulation-type arrays, then the slab when resident)
  // per column: potential v, shift (log2 LSE of the last column update; +inf before the first, -inf for a column
  // without a finite score), this CTA's partial (sum or max, read by the peers), exact maximum (log2); log nu
  A *v, *csh, *cpart, *gmax, *lnu;
  A *u, *lmu, *rsh;  // per row: potential u, log mu, shift (as csh)
  A *part;           // kHalfWarps x (32 nch): the cross-warp combine of column partials
  // streaming (not resident), one CTA holds every row: log mu and log nu are read from their inputs and the row shift
  // of iteration t - 1 waits in u_t's slot of the output us until row update t replaces it (lnu, lmu, rsh: null), so
  // that shared memory holds 4 Na + Ma + 256 nch values (the slab, its tail and those 2 Ma + Na stay out)
  __device__ FwdShared(unsigned char* base, const Geometry& g, bool resident) {
    A* p = reinterpret_cast<A*>(base);
    const int na = resident ? g.Na : 0, nr = resident ? g.rows : 0;
    v = p; csh = v + g.Na; cpart = csh + g.Na; gmax = cpart + g.Na; u = gmax + g.Na; part = u + g.rows;
    lnu = part + kHalfWarps * 32 * g.nch; lmu = lnu + na; rsh = lmu + nr;
    if (!resident) lnu = lmu = rsh = nullptr;
  }
  static __host__ __device__ size_t bytes(const Geometry& g, bool resident) {
    const size_t n = 4 * static_cast<size_t>(g.Na) + g.rows + static_cast<size_t>(kHalfWarps) * 32 * g.nch;
    return align16((n + (resident ? g.Na + 2 * static_cast<size_t>(g.rows) : 0)) * sizeof(A));
  }
  // after a resident slab of T: room for the reads of the last row's lanes past column Na - 1 (< 32 nch elements)
  template <typename T> static __host__ __device__ size_t tail_bytes(const Geometry& g, bool resident) {
    return resident ? align16(32 * static_cast<size_t>(g.nch) * sizeof(T)) : 0;
  }
};

template <typename T, bool RESIDENT, int NCH>
__global__ void __launch_bounds__(kThreads) sinkhorn_fwd_kernel(SinkhornProblem p, Geometry g, T* out, void* us_,
                                                                void* vs_) {
  using A = typename AccOf<T>::type;
  constexpr A L = kLog2e<A>, LN2 = kLn2<A>;
  extern __shared__ __align__(16) unsigned char smem[];
  const unsigned csize = RESIDENT ? cluster_size() : 1, rank = RESIDENT ? cluster_rank() : 0;
  const int64_t b = blockIdx.x / csize;
  const int Ma = g.Ma, Na = g.Na, M = static_cast<int>(p.M), N = static_cast<int>(p.N);
  const int r0 = min(Ma, static_cast<int>(rank) * g.rows), nr = min(Ma, r0 + g.rows) - r0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int GW = 32 * NCH;  // columns per group
  const int ngroups = (Na + GW - 1) / GW;
  FwdShared<A> sh(smem, g, RESIDENT);
  T* slab = reinterpret_cast<T*>(smem + FwdShared<A>::bytes(g, RESIDENT));
  const T* src = static_cast<const T*>(p.scores) + b * p.s0;
  const A bin = p.bin ? *static_cast<const A*>(p.bin) : A(0);
  if (RESIDENT) {
    load_slab<T>(slab, src, p.s1, p.s2, r0, nr, M, N, Na, from_acc<T>(bin));
    for (int k = threadIdx.x; k < GW; k += kThreads) slab[static_cast<int64_t>(nr) * Na + k] = from_acc<T>(A(0));
  }
  // S(il, j) for j < Na + GW - 1 (RESIDENT: past Na - 1 it reads the next row or the zeroed tail; those lanes carry
  // a -inf potential in row sums and are never stored in column sums)
  const Scores<T, RESIDENT> S{slab, src, p.s1, p.s2, bin, r0, M, N, Na};
  const A* log_mu = static_cast<const A*>(p.log_mu) + b * p.mu0;
  const A* log_nu = static_cast<const A*>(p.log_nu) + b * p.nu0;
  A* us = static_cast<A*>(us_) + b * (p.iters + 1) * Ma;
  A* vs = static_cast<A*>(vs_) + b * (p.iters + 1) * Na;
  for (int j = threadIdx.x; j < Na; j += kThreads) {
    sh.v[j] = 0;
    sh.csh[j] = pos_inf<A>();
    if (RESIDENT) sh.lnu[j] = log_nu[j * p.nu1];
  }
  for (int i = threadIdx.x; i < nr; i += kThreads) {
    sh.u[i] = 0;
    if (RESIDENT) {
      sh.lmu[i] = log_mu[(r0 + i) * p.mu1];
      sh.rsh[i] = pos_inf<A>();
    }
  }
  __syncthreads();
  // log mu, log nu of the slab's row il, column j (streaming: from the inputs; r0 = 0)
  auto lmu_at = [&](int il) -> A { return RESIDENT ? sh.lmu[il] : log_mu[(r0 + il) * p.mu1]; };
  auto lnu_at = [&](int j) -> A { return RESIDENT ? sh.lnu[j] : log_nu[j * p.nu1]; };

  // ---- row update: u_i = log_mu_i - LSE_j(S_ij + v_j); a warp per row, lane l: columns jg + l + 32 c ----------
  A vr[NCH];  // log2 e * v_j of the lane's columns in the current group (-inf past Na - 1)
  auto load_v = [&](int jg) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int j = jg + lane + 32 * c;
      vr[c] = j < Na ? L * sh.v[j] : neg_inf<A>();
    }
  };
  auto row_sum = [&](int il, A shift) {  // sum_j 2^(S_ij log2 e + v2_j - shift), all lanes get it
    A s0 = 0, s1 = 0;
    for (int gi = 0; gi < ngroups; ++gi) {
      if (ngroups > 1) load_v(gi * GW);
      const int jb = gi * GW + lane;
      static_for<0, NCH>([&](auto cc) {
        constexpr int c = decltype(cc)::value;
        const A e = exp2_<c % kPolyPeriod == kPolyPeriod - 1>(fma(S(il, jb + 32 * c), L, vr[c]) - shift);
        if (c % 2 == 0) {
          s0 += e;
        } else {
          s1 += e;
        }
      });
    }
    return warp_sum(s0 + s1);
  };
  auto row_max = [&](int il) {
    A m = neg_inf<A>();
    for (int gi = 0; gi < ngroups; ++gi) {
      if (ngroups > 1) load_v(gi * GW);
      const int jb = gi * GW + lane;
#pragma unroll
      for (int c = 0; c < NCH; ++c) m = fmax(m, fma(S(il, jb + 32 * c), L, vr[c]));
    }
    return warp_max(m);
  };
  auto row_update = [&](int t) {
    if (ngroups == 1) load_v(0);
    for (int il = warp; il < nr; il += kWarps) {
      // warp-uniform; streaming: u_t's slot holds the shift of iteration t - 1 (written below by this warp)
      A shift = RESIDENT ? sh.rsh[il] : (t == 1 ? pos_inf<A>() : us[t * Ma + r0 + il]);
      A ui = 0;
      if (shift != neg_inf<A>()) {  // -inf: a row without a finite score keeps u = 0
        A s = 0;
        bool ok = false;
        if (shift != pos_inf<A>()) {  // one pass with the previous LSE as the shift
          s = row_sum(il, shift);
          ok = !(s < kSumLo<A> || s > kSumHi<A>);  // NaN (a NaN score or potential): kept, as the reference
        }
        if (!ok) {  // first iteration, or the shift drifted: exact maximum, then the sum
          shift = row_max(il);
          if (shift != neg_inf<A>()) s = row_sum(il, shift);
        }
        if (shift != neg_inf<A>()) {
          shift += log2_(s);  // log2 LSE: the next iteration's shift
          ui = lmu_at(il) - LN2 * shift;
        }
      }
      __syncwarp();
      if (lane == 0) {
        sh.u[il] = ui;
        us[t * Ma + r0 + il] = ui;
        if (RESIDENT) {
          sh.rsh[il] = shift;
        } else if (t < p.iters) {
          us[(t + 1) * Ma + r0 + il] = shift;  // read back (then overwritten by u_{t+1}) by row update t + 1
        }
      }
    }
    __syncthreads();
  };

  // ---- column update: v_j = log_nu_j - LSE_i(S_ij + u_i) -------------------------------------------------------
  // sum (or max) of the 16 warps' per-lane partials of group jg into sh.cpart (this CTA's partial), in a fixed order
  auto combine = [&](A (&acc)[NCH], int jg, bool is_max) {
    if (warp >= kHalfWarps) {
#pragma unroll
      for (int c = 0; c < NCH; ++c) sh.part[(warp - kHalfWarps) * GW + lane + 32 * c] = acc[c];
    }
    __syncthreads();
    if (warp < kHalfWarps) {
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        A* q = &sh.part[warp * GW + lane + 32 * c];
        *q = is_max ? fmax(acc[c], *q) : acc[c] + *q;
      }
    }
    __syncthreads();
    for (int jj = threadIdx.x; jj < GW && jg + jj < Na; jj += kThreads) {
      A a = sh.part[jj];
      for (int k = 1; k < kHalfWarps; ++k) a = is_max ? fmax(a, sh.part[k * GW + jj]) : a + sh.part[k * GW + jj];
      sh.cpart[jg + jj] = a;
    }
    __syncthreads();  // part is reused by the next group
  };
  // per-lane partial sums sum_i 2^(S_ij log2 e + u2_i - shift_j) of group jg over the warp's rows, into sh.cpart
  auto col_sums = [&](int jg, const A* shift) {
    A ns[NCH], cs[NCH];
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int j = jg + lane + 32 * c;
      const A m = j < Na ? shift[j] : A(0);
      ns[c] = (m == neg_inf<A>() || m == pos_inf<A>()) ? A(0) : -m;  // an empty column sums 0 whatever its shift
      cs[c] = 0;
    }
    for (int il = warp; il < nr; il += kWarps) {
      const A u2 = L * sh.u[il];
      const int jb = jg + lane;
      static_for<0, NCH>([&](auto cc) {
        constexpr int c = decltype(cc)::value;
        cs[c] += exp2_<c % kPolyPeriod == kPolyPeriod - 1>(fma(S(il, jb + 32 * c), L, ns[c]) + u2);
      });
    }
    combine(cs, jg, false);
  };
  auto col_maxima = [&](int jg) {
    A cm[NCH];
#pragma unroll
    for (int c = 0; c < NCH; ++c) cm[c] = neg_inf<A>();
    for (int il = warp; il < nr; il += kWarps) {
      const A u2 = L * sh.u[il];
      const int jb = jg + lane;
#pragma unroll
      for (int c = 0; c < NCH; ++c) cm[c] = fmax(cm[c], fma(S(il, jb + 32 * c), L, u2));
    }
    combine(cm, jg, true);
  };
  auto set_v = [&](int t, int j, A shift, A s) {  // shift: log2 of the sum's scale (-inf: empty column)
    A vj = 0;
    if (shift != neg_inf<A>()) {
      shift += log2_(s);
      vj = lnu_at(j) - LN2 * shift;
    }
    sh.v[j] = vj;
    sh.csh[j] = shift;
    if (rank == 0) vs[t * Na + j] = vj;
  };
  auto col_update = [&](int t) {
    bool exact = t == 1;  // no previous shifts yet (every csh is +inf exactly then)
    if (!exact) {  // one pass with the previous LSEs as shifts
      for (int gi = 0; gi < ngroups; ++gi) col_sums(gi * GW, sh.csh);
      problem_sync<RESIDENT>();
      bool bad = false;
      for (int j = threadIdx.x; j < Na; j += kThreads) {
        A s = 0;
        for (unsigned r = 0; r < csize; ++r) s += peer(sh.cpart, r)[j];
        const A shift = sh.csh[j];
        if (shift == neg_inf<A>() || !(s < kSumLo<A> || s > kSumHi<A>)) {  // NaN: kept, as in the row update
          set_v(t, j, shift, s);  // overwritten below if another column needs the exact pass
        } else {
          bad = true;
        }
      }
      // the same sums in every CTA of the cluster (peers summed in rank order): the same decision everywhere
      exact = __syncthreads_or(bad) != 0;
      if (exact) problem_sync<RESIDENT>();  // the peers have read cpart
    }
    if (exact) {  // exact maxima, then the sums
      for (int gi = 0; gi < ngroups; ++gi) col_maxima(gi * GW);
      problem_sync<RESIDENT>();
      for (int j = threadIdx.x; j < Na; j += kThreads) {
        A m = neg_inf<A>();
        for (unsigned r = 0; r < csize; ++r) m = fmax(m, peer(sh.cpart, r)[j]);
        sh.gmax[j] = m;
      }
      problem_sync<RESIDENT>();  // gmax complete; the peers have read cpart
      for (int gi = 0; gi < ngroups; ++gi) col_sums(gi * GW, sh.gmax);
      problem_sync<RESIDENT>();
      for (int j = threadIdx.x; j < Na; j += kThreads) {
        A s = 0;
        for (unsigned r = 0; r < csize; ++r) s += peer(sh.cpart, r)[j];
        set_v(t, j, sh.gmax[j], s);
      }
    }
    problem_sync<RESIDENT>();  // v visible to the row update; the peers have read cpart before it is rewritten
  };
  for (int t = 1; t <= p.iters; ++t) {
    if (p.col_first) {
      col_update(t);
      row_update(t);
    } else {
      row_update(t);
      col_update(t);
    }
  }
  T* o = out + (b * Ma + r0) * Na;
  const A c = static_cast<A>(p.log_scale);
  for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(nr) * Na; idx += kThreads) {
    const int il = static_cast<int>(idx / Na), j = static_cast<int>(idx % Na);
    const A x = S(il, j) + sh.u[il] + sh.v[j];
    o[idx] = from_acc<T>(p.exp_out ? exp_(x + c) : x);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------------------------------
template <typename A>
struct BwdShared {
  A *dv, *cpart, *dnu, *cj, *lnu, *colfree;  // Na each (colfree: 1 if the column has a finite score)
  A *du, *dmu, *lmu, *rowfree;               // rows each
  A *uh, *vh, *duh, *dvh;                    // histories (RESIDENT): (iters+1) x rows, (iters+1) x Na, iters x ...
  __device__ BwdShared(unsigned char* base, const Geometry& g, int iters, bool resident) {
    A* p = reinterpret_cast<A*>(base);
    dv = p; cpart = dv + g.Na; dnu = cpart + g.Na; cj = dnu + g.Na; lnu = cj + g.Na; colfree = lnu + g.Na;
    du = colfree + g.Na; dmu = du + g.rows; lmu = dmu + g.rows; rowfree = lmu + g.rows;
    uh = rowfree + g.rows;
    vh = uh + (resident ? (iters + 1) * g.rows : 0);
    duh = vh + (resident ? (iters + 1) * g.Na : 0);
    dvh = duh + (resident ? iters * g.rows : 0);
  }
  static __host__ __device__ size_t bytes(const Geometry& g, int iters, bool resident) {
    size_t n = 6 * g.Na + 4 * g.rows;
    if (resident) n += (2 * iters + 1) * static_cast<size_t>(g.rows + g.Na);
    return align16(n * sizeof(A));
  }
};

template <typename T, bool RESIDENT>
__global__ void __launch_bounds__(kThreads) sinkhorn_bwd_kernel(
    SinkhornProblem p, Geometry g, const T* grad, int64_t g0, int64_t g1, int64_t g2, const T* out, const void* us_,
    const void* vs_, T* d_scores, void* d_mu_, void* d_nu_, void* d_bin_, void* scratch_) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  const unsigned csize = RESIDENT ? cluster_size() : 1, rank = RESIDENT ? cluster_rank() : 0;
  const int64_t b = blockIdx.x / csize;
  const int Ma = g.Ma, Na = g.Na, M = static_cast<int>(p.M), N = static_cast<int>(p.N), iters = p.iters;
  const int r0 = min(Ma, static_cast<int>(rank) * g.rows), nr = min(Ma, r0 + g.rows) - r0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  BwdShared<A> sh(smem, g, iters, RESIDENT);
  T* slab = reinterpret_cast<T*>(smem + BwdShared<A>::bytes(g, iters, RESIDENT));
  const T* src = static_cast<const T*>(p.scores) + b * p.s0;
  const A bin = p.bin ? *static_cast<const A*>(p.bin) : A(0);
  if (RESIDENT) load_slab<T>(slab, src, p.s1, p.s2, r0, nr, M, N, Na, from_acc<T>(bin));
  const Scores<T, RESIDENT> S{slab, src, p.s1, p.s2, bin, r0, M, N, Na};
  const A* log_mu = static_cast<const A*>(p.log_mu) + b * p.mu0;
  const A* log_nu = static_cast<const A*>(p.log_nu) + b * p.nu0;
  const A* us = static_cast<const A*>(us_) + b * (iters + 1) * Ma;
  const A* vs = static_cast<const A*>(vs_) + b * (iters + 1) * Na;
  // potential histories: u_t for the slab's rows (row stride ur), v_t (stride Na), adjoints du_t, dv_t
  const A* uh;
  const A* vh;
  A* duh;
  A* dvh;
  int ur;
  if (RESIDENT) {
    ur = g.rows;
    for (int k = threadIdx.x; nr > 0 && k < (iters + 1) * nr; k += kThreads) {
      sh.uh[(k / nr) * ur + k % nr] = us[(k / nr) * Ma + r0 + k % nr];
    }
    for (int k = threadIdx.x; k < (iters + 1) * Na; k += kThreads) sh.vh[k] = vs[k];
    uh = sh.uh; vh = sh.vh; duh = sh.duh; dvh = sh.dvh;
  } else {
    ur = Ma;
    A* scratch = static_cast<A*>(scratch_) + b * iters * (Ma + Na);
    uh = us; vh = vs; duh = scratch; dvh = scratch + iters * Ma;
  }
  const A* uhr = uh + (RESIDENT ? 0 : r0);  // row il of the slab: uhr[t * ur + il]
  __syncthreads();  // slab and histories loaded

  auto gval = [&](int il, int j) -> A {  // dL/d(log plan)
    const int64_t i = r0 + il;
    A x = to_acc(grad[b * g0 + i * g1 + j * g2]);
    if (p.exp_out) x *= to_acc(out[(b * Ma + i) * Na + j]);
    return x;
  };
  // column sums over the cluster of the per-CTA partials in sh.cpart, in rank order (identical in every CTA)
  auto cluster_col_sum = [&](int j) -> A {
    A s = 0;
    for (unsigned r = 0; r < csize; ++r) s += peer(sh.cpart, r)[j];
    return s;
  };

  // setup: marginals, empty rows and columns, adjoints reaching u_T and v_T from the output
  for (int j = threadIdx.x; j < Na; j += kThreads) {
    sh.lnu[j] = log_nu[j * p.nu1];
    sh.dnu[j] = 0;
    A any = 0, cs = 0;
    for (int il = 0; il < nr; ++il) {
      any = fmax(any, S(il, j) != neg_inf<A>() ? A(1) : A(0));
      cs += gval(il, j);
    }
    sh.colfree[j] = any;  // temporarily the local flag
    sh.cpart[j] = cs;
  }
  for (int il = warp; il < nr; il += kWarps) {
    A any = 0, rs = 0;
    for (int j = lane; j < Na; j += 32) {
      any = fmax(any, S(il, j) != neg_inf<A>() ? A(1) : A(0));
      rs += gval(il, j);
    }
    any = warp_max(any);
    rs = warp_sum(rs);
    if (lane == 0) {
      sh.rowfree[il] = any;
      sh.du[il] = rs;
      sh.dmu[il] = 0;
      sh.lmu[il] = log_mu[(r0 + il) * p.mu1];
    }
  }
  problem_sync<RESIDENT>();
  for (int j = threadIdx.x; j < Na; j += kThreads) sh.dv[j] = cluster_col_sum(j);
  problem_sync<RESIDENT>();
  for (int j = threadIdx.x; j < Na; j += kThreads) sh.cpart[j] = sh.colfree[j];
  problem_sync<RESIDENT>();
  for (int j = threadIdx.x; j < Na; j += kThreads) {
    A any = 0;
    for (unsigned r = 0; r < csize; ++r) any = fmax(any, peer(sh.cpart, r)[j]);
    sh.colfree[j] = any;
  }
  problem_sync<RESIDENT>();

  // pass 1: reverse half-steps, reductions only; record the adjoint each consumes
  auto row_bwd = [&](int t, int s) {  // forward: u_t = row(v_s); consumes du, adds to dv
    for (int il = threadIdx.x; il < nr; il += kThreads) {
      const A d = sh.rowfree[il] != 0 ? sh.du[il] : A(0);
      sh.du[il] = d;
      sh.dmu[il] += d;
      duh[(t - 1) * ur + (RESIDENT ? 0 : r0) + il] = d;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < Na; j += kThreads) {
      A acc = 0;
      const A vj = vh[s * Na + j];
      for (int il = 0; il < nr; ++il) {
        acc += sh.du[il] * exp_(S(il, j) + vj + uhr[t * ur + il] - sh.lmu[il]);  // du_i A_ij
      }
      sh.cpart[j] = acc;
    }
    problem_sync<RESIDENT>();
    for (int j = threadIdx.x; j < Na; j += kThreads) sh.dv[j] -= cluster_col_sum(j);
    for (int il = threadIdx.x; il < nr; il += kThreads) sh.du[il] = 0;
    problem_sync<RESIDENT>();
  };
  auto col_bwd = [&](int t, int s) {  // forward: v_t = col(u_s); consumes dv, adds to du
    for (int j = threadIdx.x; j < Na; j += kThreads) {
      const A d = sh.colfree[j] != 0 ? sh.dv[j] : A(0);
      sh.dv[j] = d;
      sh.dnu[j] += d;
      sh.cj[j] = vh[t * Na + j] - sh.lnu[j];
      dvh[(t - 1) * Na + j] = d;
    }
    __syncthreads();
    for (int il = warp; il < nr; il += kWarps) {
      A acc = 0;
      const A ui = uhr[s * ur + il];
      for (int j = lane; j < Na; j += 32) acc += sh.dv[j] * exp_(S(il, j) + ui + sh.cj[j]);  // dv_j B_ij
      acc = warp_sum(acc);
      if (lane == 0) sh.du[il] -= acc;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < Na; j += kThreads) sh.dv[j] = 0;
    __syncthreads();
  };
  for (int t = iters; t >= 1; --t) {
    if (p.col_first) {  // v_t = col(u_{t-1}), u_t = row(v_t)
      row_bwd(t, t);
      col_bwd(t, t - 1);
    } else {  // u_t = row(v_{t-1}), v_t = col(u_t)
      col_bwd(t, t);
      row_bwd(t, t - 1);
    }
  }
  __syncthreads();

  // pass 2: dS_ij = G_ij - sum_t (du_t,i A_t,ij + dv_t,j B_t,ij), written once
  const int sa = p.col_first ? 0 : -1;  // v index of the row step t: t + sa; u index of the column step: t - 1 - sa
  A bin_acc = 0;
  T* ds = d_scores + b * p.M * p.N;
  for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(nr) * Na; idx += kThreads) {
    const int il = static_cast<int>(idx / Na), j = static_cast<int>(idx % Na), i = r0 + il;
    const A x = S(il, j);
    A d = gval(il, j);
    if (x != neg_inf<A>()) {
      for (int t = 1; t <= iters; ++t) {
        const A a = exp_(x + vh[(t + sa) * Na + j] + uhr[t * ur + il] - sh.lmu[il]);
        const A bb = exp_(x + uhr[(t - 1 - sa) * ur + il] + vh[t * Na + j] - sh.lnu[j]);
        d -= duh[(t - 1) * ur + (RESIDENT ? 0 : r0) + il] * a + dvh[(t - 1) * Na + j] * bb;
      }
    }
    if (i < M && j < N) {
      ds[static_cast<int64_t>(i) * N + j] = from_acc<T>(d);
    } else {
      bin_acc += d;
    }
  }
  // dustbin gradient: block reduction, one partial per CTA (summed in order by the caller)
  __shared__ A warp_part[kWarps];
  bin_acc = warp_sum(bin_acc);
  if (lane == 0) warp_part[warp] = bin_acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    A tot = 0;
    for (int w = 0; w < kWarps; ++w) tot += warp_part[w];
    static_cast<A*>(d_bin_)[b * kMaxCluster + rank] = tot;
  }
  A* d_mu = static_cast<A*>(d_mu_) + b * Ma;
  A* d_nu = static_cast<A*>(d_nu_) + b * Na;
  for (int il = threadIdx.x; il < nr; il += kThreads) d_mu[r0 + il] = sh.dmu[il];
  if (rank == 0) {
    for (int j = threadIdx.x; j < Na; j += kThreads) d_nu[j] = sh.dnu[j];
  }
  problem_sync<RESIDENT>();  // keep shared memory alive until the cluster's peers are done with it
}

// ------------------------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------------------------
struct DeviceLimits {
  int smem_optin = 0, major = 0;
};

// queried once per device (an attribute query per launch costs microseconds of host time)
DeviceLimits limits() {
  constexpr int kMaxDevices = 64;
  static DeviceLimits cache[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= kMaxDevices) dev = 0;
  std::call_once(once[dev], [dev] {
    cudaDeviceGetAttribute(&cache[dev].smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&cache[dev].major, cudaDevAttrComputeCapabilityMajor, dev);
  });
  return cache[dev];
}

// the one switch from the runtime dtype to the element type: f(T{}) with T = __half, __nv_bfloat16, float, double
template <typename F>
cudaError_t dispatch_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat16: return f(__half{});
    case Dtype::kBFloat16: return f(__nv_bfloat16{});
    case Dtype::kFloat32: return f(float{});
    default: return f(double{});
  }
}

size_t elt_size(Dtype d) {
  switch (d) {
    case Dtype::kFloat16:
    case Dtype::kBFloat16: return 2;
    case Dtype::kFloat32: return 4;
    default: return 8;
  }
}

// forward: the 32-column chunks per lane (a template parameter: registers) for Na columns; wider rows loop over
// column groups of 32 * 16
constexpr int kChunkChoices[] = {4, 8, 11, 16};
int chunks_for(int Na) {
  for (int c : kChunkChoices) {
    if (32 * c >= Na) return c;
  }
  return 16;
}

// the error for a problem whose streaming layout (the smallest) exceeds the opt-in shared memory: an exception, so
// that the message can name the shape (the binding, ./sinkhorn_cuda.cpp, turns a cudaError_t into a bare
// "invalid argument"); std::runtime_error reaches Python as RuntimeError, as a TORCH_CHECK would
[[noreturn]] void too_large(const SinkhornProblem& p, const char* pass, size_t need, int optin) {
  throw std::runtime_error(
      std::string("sinkhorn (CUDA) ") + pass + ": scores of shape (" + std::to_string(p.B) + ", " +
      std::to_string(p.M) + ", " + std::to_string(p.N) + ")" + (p.bin ? " plus dustbins" : "") + " need " +
      std::to_string(need) + " bytes of shared memory per block even when streamed from global memory (row and " +
      "column potentials), over this device's limit of " + std::to_string(optin) +
      " bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin); use the reference backend for a problem this large");
}

// Smallest cluster whose slabs fit in shared memory; cluster 0: stream from global memory. *nch: the forward's chunk
// count (0 for the backward), the one the resident layouts use; streaming tries it, then the smaller kChunkChoices
// (any count works for any width: column groups), and sets *nch to the one that fits. None fits: too_large.
// Streaming sizes checked by hand against the 232,448 B opt-in of sm_90 (forward 4 Na + Ma + 256 nch values,
// FwdShared::bytes; previously 5 Na + 2 Ma): fp32 7000 x 7000: 156,384 B; fp32 20000 x 64: 85,120 B; fp64 9000 x 200:
// 86,592 B; fp32/fp16/bf16 square: up to 10803 (nch 16; 11417 with nch 4; 8301 before); fp32 1 x N up to 14271
// (nch 4); M x 1 up to 57084; fp64 square up to 5606 (4150 before). Every shape the previous layout fitted
// ((5 Na + 2 Ma) sizeof(A) <= limit) still fits: the new count is smaller once Na + Ma >= 1024 (nch 4) and tiny
// below. The backward (6 Na + 4 Ma values when streaming) is unchanged: square fp32 up to 5811.
template <typename Bytes>
LaunchInfo plan(const SinkhornProblem& p, const DeviceLimits& d, int* nch, const char* pass, Bytes aux_bytes) {
  const int Ma = static_cast<int>(p.M) + (p.bin != nullptr), Na = static_cast<int>(p.N) + (p.bin != nullptr);
  const int max_cluster = d.major >= 9 ? kMaxCluster : 1;
  const size_t optin = static_cast<size_t>(std::max(d.smem_optin, 0));
  for (int c = 1; c <= max_cluster; c *= 2) {
    const int rows = (Ma + c - 1) / c;
    if (c > 1 && rows * (c - 1) >= Ma) break;  // a CTA would hold no row
    const size_t bytes =
        aux_bytes(Geometry{Ma, Na, rows, *nch}, true) + static_cast<size_t>(rows) * Na * elt_size(p.dtype);
    if (bytes <= optin) return {c, bytes};
  }
  size_t bytes = aux_bytes(Geometry{Ma, Na, Ma, *nch}, false);
  for (int i = static_cast<int>(std::size(kChunkChoices)) - 1; i >= 0 && bytes > optin; --i) {
    if (kChunkChoices[i] >= *nch) continue;  // only narrower than the preferred count (none for the backward)
    const size_t b = aux_bytes(Geometry{Ma, Na, Ma, kChunkChoices[i]}, false);
    if (b < bytes) {
      bytes = b;
      *nch = kChunkChoices[i];
    }
  }
  if (bytes > optin) too_large(p, pass, bytes, d.smem_optin);
  return {0, bytes};
}

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, const LaunchInfo& info, int64_t B, cudaStream_t stream, Args... args) {
  const int cluster = std::max(info.cluster, 1);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(info.smem));
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(B * cluster));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = info.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if (cluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename T>
cudaError_t forward_t(const SinkhornProblem& p, void* out, void* us, void* vs, cudaStream_t stream, LaunchInfo* info) {
  using A = typename AccOf<T>::type;
  const int Ma = static_cast<int>(p.M) + (p.bin != nullptr), Na = static_cast<int>(p.N) + (p.bin != nullptr);
  int nch = std::is_same<T, double>::value ? 4 : chunks_for(Na);  // plan may lower it (streaming)
  const auto aux = [](const Geometry& g, bool resident) {
    return FwdShared<A>::bytes(g, resident) + FwdShared<A>::template tail_bytes<T>(g, resident);
  };
  const LaunchInfo li = plan(p, limits(), &nch, "forward", aux);
  if (info) *info = li;
  const int c = std::max(li.cluster, 1);
  const Geometry g{Ma, Na, li.cluster ? (Ma + c - 1) / c : Ma, nch};
  // the kernel's NCH, the layout's g.nch and the planned size must agree (the shared arrays are sized by g.nch, the
  // kernel indexes them by NCH): checked on the host at every launch
  const size_t need = aux(g, li.cluster != 0) + (li.cluster ? static_cast<size_t>(g.rows) * Na * sizeof(T) : 0);
  auto run = [&](auto nch_tag) -> cudaError_t {
    constexpr int K = decltype(nch_tag)::value;
    if (K != g.nch || need != li.smem) {
      throw std::logic_error("sinkhorn (CUDA) forward: internal error: kernel NCH " + std::to_string(K) +
                             ", planned NCH " + std::to_string(g.nch) + ", planned " + std::to_string(li.smem) +
                             " bytes of shared memory, layout " + std::to_string(need));
    }
    return li.cluster ? launch(sinkhorn_fwd_kernel<T, true, K>, li, p.B, stream, p, g, static_cast<T*>(out), us, vs)
                      : launch(sinkhorn_fwd_kernel<T, false, K>, li, p.B, stream, p, g, static_cast<T*>(out), us, vs);
  };
  if constexpr (std::is_same<T, double>::value) {  // the float64 path: one width (column groups beyond 128)
    return run(std::integral_constant<int, 4>{});
  } else {
    switch (nch) {
      case 4: return run(std::integral_constant<int, 4>{});
      case 8: return run(std::integral_constant<int, 8>{});
      case 11: return run(std::integral_constant<int, 11>{});
      default: return run(std::integral_constant<int, 16>{});  // another count fails the check in run
    }
  }
}

template <typename T>
cudaError_t backward_t(const SinkhornProblem& p, const void* grad, int64_t g0, int64_t g1, int64_t g2,
                       const void* out, const void* us, const void* vs, void* d_scores, void* d_mu, void* d_nu,
                       void* d_bin, void* scratch, cudaStream_t stream, LaunchInfo* info) {
  using A = typename AccOf<T>::type;
  const int iters = p.iters;
  int nch = 0;  // no register chunks in the backward
  const LaunchInfo li = plan(p, limits(), &nch, "backward", [iters](const Geometry& g, bool resident) {
    return BwdShared<A>::bytes(g, iters, resident);
  });
  if (info) *info = li;
  const int Ma = static_cast<int>(p.M) + (p.bin != nullptr), Na = static_cast<int>(p.N) + (p.bin != nullptr);
  const int c = std::max(li.cluster, 1);
  const Geometry g{Ma, Na, li.cluster ? (Ma + c - 1) / c : Ma, 0};
  auto args = [&](auto kernel) {
    return launch(kernel, li, p.B, stream, p, g, static_cast<const T*>(grad), g0, g1, g2, static_cast<const T*>(out),
                  us, vs, static_cast<T*>(d_scores), d_mu, d_nu, d_bin, scratch);
  };
  if (li.cluster) return args(sinkhorn_bwd_kernel<T, true>);
  return args(sinkhorn_bwd_kernel<T, false>);
}

}  // namespace

cudaError_t sinkhorn_forward(const SinkhornProblem& p, void* out, void* us, void* vs, cudaStream_t stream,
                             LaunchInfo* info) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return forward_t<decltype(tag)>(p, out, us, vs, stream, info);
  });
}

cudaError_t sinkhorn_backward(const SinkhornProblem& p, const void* grad, int64_t g0, int64_t g1, int64_t g2,
                              const void* out, const void* us, const void* vs, void* d_scores, void* d_mu,
                              void* d_nu, void* d_bin_partial, void* scratch, cudaStream_t stream,
                              LaunchInfo* info) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return backward_t<decltype(tag)>(p, grad, g0, g1, g2, out, us, vs, d_scores, d_mu, d_nu, d_bin_partial, scratch,
                                     stream, info);
  });
}

}  // namespace cuda
}  // namespace tlv_fast
