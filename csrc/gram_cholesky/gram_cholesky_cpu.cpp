// Batched Gram-Cholesky solve: schema-independent helpers and the CPU kernels.
#include "gram_cholesky.h"

#include <torch/library.h>

#include <cmath>
#include <limits>

namespace revgn {

double dtype_eps(at::ScalarType dtype) {
  return dtype == at::kDouble ? std::numeric_limits<double>::epsilon()
                              : static_cast<double>(std::numeric_limits<float>::epsilon());
}

std::vector<double> jitter_schedule(at::ScalarType dtype) {
  std::vector<double> out;
  for (double j = std::max(1e-10, 10.0 * kPivotFloor * dtype_eps(dtype)); j < 1.0; j *= 10.0) out.push_back(j);
  out.push_back(1.0);
  return out;
}

void check_gram_args(const at::Tensor& A, const at::Tensor& damping) {
  TORCH_CHECK(A.dim() == 3, "revgn: A must be (B, n, m)");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "revgn: A must be float32 or float64");
  TORCH_CHECK(damping.dim() == 1 && damping.size(0) == A.size(0), "revgn: damping must be (B,)");
  TORCH_CHECK(damping.scalar_type() == A.scalar_type() && damping.device() == A.device(),
              "revgn: damping must match A's dtype and device");
}

void check_from_gram_args(const at::Tensor& G, const at::Tensor& damping) {
  TORCH_CHECK(G.dim() == 3 && G.size(1) == G.size(2), "revgn: G must be (B, n, n)");
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble, "revgn: G must be float32 or float64");
  TORCH_CHECK(damping.dim() == 1 && damping.size(0) == G.size(0), "revgn: damping must be (B,)");
  TORCH_CHECK(damping.scalar_type() == G.scalar_type() && damping.device() == G.device(),
              "revgn: damping must match G's dtype and device");
}

void check_solve_args(const at::Tensor& A, const at::Tensor& L, const at::Tensor& R) {
  TORCH_CHECK(A.dim() == 3 && L.dim() == 3 && R.dim() == 3, "revgn: A, L, R must be 3-d");
  TORCH_CHECK(L.size(0) == A.size(0) && L.size(1) == A.size(1) && L.size(2) == A.size(1),
              "revgn: L must be (B, n, n) for A of shape (B, n, m)");
  TORCH_CHECK(R.size(0) == A.size(0) && R.size(1) == A.size(1), "revgn: R must be (B, n, k)");
  TORCH_CHECK(A.scalar_type() == L.scalar_type() && A.scalar_type() == R.scalar_type(),
              "revgn: A, L, R must share a dtype");
}

at::Tensor damped_gram(const at::Tensor& A, const at::Tensor& damping, bool append_ones) {
  const int64_t B = A.size(0), n = A.size(1);
  // beta * G + A A^T with G prefilled: the ones block and the diagonal ride along in one GEMM.
  at::Tensor G = append_ones ? at::ones({B, n, n}, A.options()) : at::zeros({B, n, n}, A.options());
  G.diagonal(0, -2, -1).add_(damping.unsqueeze(-1));
  G.baddbmm_(A, A.transpose(1, 2));
  return G;
}

at::Tensor gram_solve(const at::Tensor& A, const at::Tensor& L, const at::Tensor& R, bool append_ones) {
  check_solve_args(A, L, R);
  const int64_t B = A.size(0), m = A.size(2), k = R.size(2);
  // L^T viewed through mT is column-major when L is row-major: LAPACK and cuSOLVER read it uncopied.
  at::Tensor U = at::cholesky_solve(R, L.mT(), /*upper=*/true);
  at::Tensor out = at::empty({B, m + (append_ones ? 1 : 0), k}, R.options());
  if (append_ones) {
    out.narrow(1, 0, m).copy_(at::bmm(A.transpose(1, 2), U));
    out.narrow(1, m, 1).copy_(U.sum(1, /*keepdim=*/true));
  } else {
    at::bmm_out(out, A.transpose(1, 2), U);
  }
  return out;
}

namespace {

// Block width of the in-place factorisation (mirrors revgn_ext.ops.gram.IN_PLACE_BLOCK).
constexpr int64_t kInPlaceBlock = 256;

// Left-looking blocked Cholesky of the symmetric matrix in G's lower triangle (G: (n, n), row-major), in
// place: afterwards the lower triangle (with the diagonal) holds L and the strict upper one is untouched.
// false when a block fails or a pivot L_jj^2 is at or below floor. On the CPU it stops at the first
// failed block; on a GPU the verdict is read once at the end.
bool factor_lower_in_place(const at::Tensor& G, double floor) {
  const int64_t n = G.size(0);
  const bool host = G.is_cpu();
  at::Tensor verdict;
  for (int64_t j0 = 0; j0 < n; j0 += kInPlaceBlock) {
    const int64_t w = std::min(kInPlaceBlock, n - j0);
    at::Tensor D = G.narrow(0, j0, w).narrow(1, j0, w);
    const at::Tensor upper = D.triu(1);  // the update below also writes D's strict upper: restored after
    if (j0 > 0) {
      at::Tensor column = G.narrow(0, j0, n - j0).narrow(1, j0, w);
      column.addmm_(G.narrow(0, j0, n - j0).narrow(1, 0, j0), G.narrow(0, j0, w).narrow(1, 0, j0).t(), 1, -1);
    }
    auto [Lb, status] = at::linalg_cholesky_ex(D, /*upper=*/false, /*check_errors=*/false);  // reads D's lower
    const at::Tensor pivots = Lb.diagonal();
    const at::Tensor ok = status.eq(0).logical_and((pivots * pivots).gt(floor).logical_and(pivots.isfinite()).all());
    if (host) {
      if (!ok.item<bool>()) return false;
    } else {
      verdict = verdict.defined() ? verdict.logical_and(ok) : ok;
    }
    D.copy_(Lb + upper);
    if (j0 + w < n) {
      at::Tensor panel = G.narrow(0, j0 + w, n - j0 - w).narrow(1, j0, w);
      panel.copy_(at::linalg_solve_triangular(Lb.t(), panel, /*upper=*/true, /*left=*/false));
    }
  }
  return host || verdict.item<bool>();
}

// G's lower triangle rebuilt from its strict upper one, the diagonal from `diagonal`.
void lower_from_upper(const at::Tensor& G, const at::Tensor& diagonal) {
  const int64_t n = G.size(0);
  for (int64_t i0 = 0; i0 < n; i0 += kInPlaceBlock) {
    const int64_t w = std::min(kInPlaceBlock, n - i0);
    if (i0 > 0) G.narrow(0, i0, w).narrow(1, 0, i0).copy_(G.narrow(0, 0, i0).narrow(1, i0, w).t());
    at::Tensor D = G.narrow(0, i0, w).narrow(1, i0, w);
    const at::Tensor upper = D.triu(1);
    D.copy_(upper + upper.t());
    D.diagonal().copy_(diagonal.narrow(0, i0, w));
  }
}

// Below this many rows a single GEMM is as fast as the blocked form.
constexpr int64_t kBlockedGramMinRows = 192;
constexpr int64_t kGramRowBlocks = 4;

// damped_gram computing only the lower block triangle of A A^T and mirroring it: with k row blocks the
// GEMMs do (k + 1) / (2k) of the full product's work (5/8 for k = 4), as a symmetric rank-k update
// would. Each block GEMM writes straight into its strided block of G.
at::Tensor damped_gram_blocked(const at::Tensor& A, const at::Tensor& damping, bool append_ones) {
  const int64_t B = A.size(0), n = A.size(1);
  if (n < kBlockedGramMinRows) return damped_gram(A, damping, append_ones);
  at::Tensor G = append_ones ? at::ones({B, n, n}, A.options()) : at::zeros({B, n, n}, A.options());
  G.diagonal(0, -2, -1).add_(damping.unsqueeze(-1));
  const int64_t step = (n + kGramRowBlocks - 1) / kGramRowBlocks;
  for (int64_t i = 0; i < n; i += step) {
    const int64_t bi = std::min(step, n - i);
    const at::Tensor Ai = A.narrow(1, i, bi);
    for (int64_t j = 0; j <= i; j += step) {
      const int64_t bj = std::min(step, n - j);
      at::Tensor block = G.narrow(1, i, bi).narrow(2, j, bj);
      block.baddbmm_(Ai, A.narrow(1, j, bj).transpose(1, 2));
      if (j < i) G.narrow(1, j, bj).narrow(2, i, bi).copy_(block.transpose(1, 2));
    }
  }
  return G;
}

// Cholesky of one matrix; false when it fails or a pivot is at or below the floor (see kPivotFloor).
bool cholesky_ok(const at::Tensor& G, double floor, at::Tensor& L) {
  auto [Ub, status] = at::linalg_cholesky_ex(G, /*upper=*/true, /*check_errors=*/false);
  const at::Tensor Lb = Ub.mT();
  L = Lb;
  if (status.item<int>() != 0) return false;
  const at::Tensor pivots = Lb.diagonal();
  return (pivots * pivots).gt(floor).logical_and(pivots.isfinite()).all().item<bool>();
}

// Factor the damped Grams G (B, n, n) in place of a copy, with the jitter/pivot-floor policy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> factor_damped_gram(const at::Tensor& G) {
  const int64_t B = G.size(0), n = G.size(1);
  const at::TensorOptions options = G.options();
  at::Tensor scale = G.diagonal(0, -2, -1).mean(-1).abs().to(at::kDouble);
  // An all-zero Gram: any jitter works. A non-finite one (direct calls only) gets a finite scale.
  scale.masked_fill_(scale.le(0).logical_or(scale.isfinite().logical_not()), 1.0);
  const at::Tensor floor = scale * (kPivotFloor * dtype_eps(G.scalar_type()));
  // LAPACK returns column-major factors; the transpose of the upper factor is L, already row-major.
  auto [U, status] = at::linalg_cholesky_ex(G, /*upper=*/true, /*check_errors=*/false);
  at::Tensor L = U.mT();
  const at::Tensor pivots = L.diagonal(0, -2, -1);
  // A non-finite entry anywhere (either triangle) fails outright, without retries, as in the reference.
  const at::Tensor finite = G.isfinite().flatten(1).all(1);
  const at::Tensor ok = status.eq(0)
                            .logical_and((pivots * pivots)
                                             .gt(floor.to(G.scalar_type()).unsqueeze(-1))
                                             .logical_and(pivots.isfinite())
                                             .all(-1))
                            .logical_and(finite);
  at::Tensor info = at::zeros({B}, options.dtype(at::kInt));
  at::Tensor jitter = at::zeros({B}, options);
  auto ok_a = ok.accessor<bool, 1>();
  auto finite_a = finite.accessor<bool, 1>();
  auto info_a = info.accessor<int, 1>();
  auto scale_a = scale.accessor<double, 1>();
  auto floor_a = floor.accessor<double, 1>();
  const std::vector<double> schedule = jitter_schedule(G.scalar_type());
  const at::Tensor eye = at::eye(n, options);
  for (int64_t b = 0; b < B; ++b) {
    if (ok_a[b]) continue;
    const at::Tensor Gb = G[b];
    info_a[b] = -1;
    for (size_t t = 0; finite_a[b] && t < schedule.size(); ++t) {
      const double add = schedule[t] * scale_a[b];
      at::Tensor Lb;
      if (cholesky_ok(Gb + add * eye, floor_a[b], Lb)) {
        L[b].copy_(Lb);
        info_a[b] = static_cast<int>(t + 1);
        jitter[b].fill_(add);
        break;
      }
    }
    if (info_a[b] < 0) {  // non-finite input only: a diagonal factor keeps the result finite
      const at::Tensor d = Gb.diagonal();
      L[b].copy_(at::diag(at::where(d.isfinite().logical_and(d.gt(0)), d, at::ones_like(d)).sqrt()));
      jitter[b].fill_(scale_a[b]);
    }
  }
  return {L.contiguous(), info, jitter};  // a no-op copy check: L is row-major already
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_factor_cpu(const at::Tensor& A, const at::Tensor& damping,
                                                               bool append_ones) {
  check_gram_args(A, damping);
  return factor_damped_gram(damped_gram_blocked(A, damping, append_ones));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_factor_from_gram_cpu(const at::Tensor& G,
                                                                         const at::Tensor& damping) {
  check_from_gram_args(G, damping);
  at::Tensor damped = G.clone(at::MemoryFormat::Contiguous);
  damped.diagonal(0, -2, -1).add_(damping.unsqueeze(-1));
  return factor_damped_gram(damped);
}

at::Tensor gram_solve_cpu(const at::Tensor& A, const at::Tensor& L, const at::Tensor& R, bool append_ones) {
  return gram_solve(A, L, R, append_ones);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_cholesky_solve_cpu(const at::Tensor& A, const at::Tensor& R,
                                                                       const at::Tensor& damping,
                                                                       bool append_ones) {
  auto [L, info, jitter] = gram_factor_cpu(A, damping, append_ones);
  return {gram_solve(A, L, R, append_ones), info, jitter};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gram_factor_from_gram_inplace(const at::Tensor& G, const at::Tensor& damping) {
  check_from_gram_args(G, damping);
  TORCH_CHECK(G.is_contiguous(), "revgn: G must be contiguous to be factored in place");
  const int64_t B = G.size(0), n = G.size(1);
  at::Tensor info = at::zeros({B}, G.options().dtype(at::kInt));
  at::Tensor jitter = at::zeros({B}, G.options());
  if (B == 0 || n == 0) return {info, jitter};
  G.diagonal(0, -2, -1).add_(damping.unsqueeze(-1));
  const at::Tensor diagonal = G.diagonal(0, -2, -1).clone();  // (B, n): the damped diagonals, for retries
  at::Tensor scale = diagonal.mean(-1).abs().to(at::kDouble).cpu();
  // An all-zero Gram: any jitter works. A non-finite one (direct calls only) gets a finite scale.
  scale.masked_fill_(scale.le(0).logical_or(scale.isfinite().logical_not()), 1.0);
  auto scale_a = scale.accessor<double, 1>();
  const std::vector<double> schedule = jitter_schedule(G.scalar_type());
  const double eps = dtype_eps(G.scalar_type());
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor Gb = G[b];
    const double floor = kPivotFloor * eps * scale_a[b];
    // A non-finite entry anywhere (either triangle) fails outright, without retries; checked in row blocks.
    at::Tensor finite_t = at::ones({}, G.options().dtype(at::kBool));
    for (int64_t i0 = 0; i0 < n; i0 += kInPlaceBlock) {
      finite_t.logical_and_(Gb.narrow(0, i0, std::min(kInPlaceBlock, n - i0)).isfinite().all());
    }
    const bool finite = finite_t.item<bool>();
    if (finite && factor_lower_in_place(Gb, floor)) continue;
    int retries = -1;
    for (size_t t = 0; finite && t < schedule.size(); ++t) {
      const double add = schedule[t] * scale_a[b];
      lower_from_upper(Gb, diagonal[b] + add);
      if (factor_lower_in_place(Gb, floor)) {
        retries = static_cast<int>(t + 1);
        jitter[b].fill_(add);
        break;
      }
    }
    info[b].fill_(retries);
    if (retries < 0) {  // non-finite input only: a diagonal factor keeps the result finite
      for (int64_t i0 = 0; i0 < n; i0 += kInPlaceBlock) {
        const int64_t w = std::min(kInPlaceBlock, n - i0);
        Gb.narrow(0, i0, w).narrow(1, 0, i0).zero_();
        at::Tensor D = Gb.narrow(0, i0, w).narrow(1, i0, w);
        D.copy_(D.triu(1));
      }
      const at::Tensor d = diagonal[b];
      Gb.diagonal().copy_(at::where(d.isfinite().logical_and(d.gt(0)), d, at::ones_like(d)).sqrt());
      jitter[b].fill_(scale_a[b]);
    }
  }
  return {info, jitter};
}

TORCH_LIBRARY_IMPL(revgn, CPU, m) {
  m.impl("gram_factor", &gram_factor_cpu);
  m.impl("gram_factor_from_gram_inplace", &gram_factor_from_gram_inplace);
  m.impl("gram_factor_from_gram", &gram_factor_from_gram_cpu);
  m.impl("gram_solve", &gram_solve_cpu);
  m.impl("gram_cholesky_solve", &gram_cholesky_solve_cpu);
}

}  // namespace revgn
