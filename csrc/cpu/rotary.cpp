// Rotary position embedding on the CPU (see attnkit/rotary.h).
//
// One unit of work per head row (b, n, h), walked in x's memory order (n
// fastest for an SDPA-layout (B, H, N, D) view, h fastest for (B, N, H, D)) so
// that reads and writes stream. A row's pairs go through at::vec::Vectorized
// (x0 c - x1 s, x0 s + x1 c) reading cos/sin straight from the table; an
// interleaved pair is the same loop with a stride of 2, so neither layout needs
// a shuffle. Both halves of a chunk are loaded before either is stored, so out
// may be x itself (in place).
#include "attnkit/rotary.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ATTNKIT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATTNKIT_SIMD_CLONES
#endif

namespace attnkit {
namespace cpu {

namespace {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// n <= size() elements p[0], p[stride], ... as a vector of A (zeros past n); kUnit: stride is 1.
template <typename A, bool kUnit, typename T>
inline at::vec::Vectorized<A> load(const T* p, int64_t stride, int64_t n) {
  using V = at::vec::Vectorized<A>;
  if constexpr (kUnit && std::is_same_v<A, T>) {
    return n == V::size() ? V::loadu(p) : V::loadu(p, n);
  } else {
    __at_align__ A buf[V::size()] = {};
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<A>(p[j * stride]);
    return V::loadu(buf);
  }
}

template <typename A, bool kUnit, typename T>
inline void store(T* p, int64_t stride, const at::vec::Vectorized<A>& v, int64_t n) {
  using V = at::vec::Vectorized<A>;
  if constexpr (kUnit && std::is_same_v<A, T>) {
    n == V::size() ? v.store(p) : v.store(p, n);
  } else {
    __at_align__ A buf[V::size()];
    v.store(buf);
    for (int64_t j = 0; j < n; ++j) p[j * stride] = static_cast<T>(buf[j]);
  }
}

// The first 2 * half dims of one head row: x (dim stride xs) rotated into o (stride os)
// by the table rows c, s (sin times `sign`). kUnit: both pair halves are contiguous. Always
// inlined, so that each target clone of rotate_row_float compiles it for its own ISA.
template <typename acc_t, bool kUnit, typename scalar_t, typename table_t>
inline __attribute__((always_inline)) void rotate_row(const scalar_t* x, int64_t xs, scalar_t* o, int64_t os,
                                                      const table_t* c, const table_t* s, acc_t sign, int64_t half,
                                                      bool interleaved) {
  using V = at::vec::Vectorized<acc_t>;
  const int64_t xstep = interleaved ? 2 * xs : xs, ostep = interleaved ? 2 * os : os;
  const scalar_t* x1 = x + (interleaved ? xs : half * xs);
  scalar_t* o1 = o + (interleaved ? os : half * os);
  const V flip(sign);
  for (int64_t i = 0; i < half; i += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), half - i);
    const V a = load<acc_t, kUnit>(x + i * xstep, xstep, n), b = load<acc_t, kUnit>(x1 + i * xstep, xstep, n);
    const V cv = load<acc_t, true>(c + i, 1, n), sv = load<acc_t, true>(s + i, 1, n) * flip;
    store<acc_t, kUnit>(o + i * ostep, ostep, a * cv - b * sv, n);
    store<acc_t, kUnit>(o1 + i * ostep, ostep, a * sv + b * cv, n);
  }
}

// rotate_row for unit-stride float rows and float tables, the common case, compiled for AVX-512,
// AVX2 and baseline x86-64 and picked at load time: the extension has no -march flags, so
// at::vec is its generic 8-lane code, which each clone lowers to its own registers (1.5x with AVX2).
ATTNKIT_SIMD_CLONES void rotate_row_float(const float* x, float* o, const float* c, const float* s, float sign,
                                          int64_t half) {
  rotate_row<float, true>(x, 1, o, 1, c, s, sign, half, false);
}

// Element strides of x or out seen as (B, N, H, D); packed (total, H, D) has sb = 0, sn = the row stride.
struct Layout {
  int64_t sb, sn, sh, sd;
};

Layout layout_of(const at::Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(0), t.stride(1), t.stride(2)};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Spec {
  int64_t batch, seqlen, rows, heads, dim, half, seqlen_ro;
  bool per_sequence_tables, interleaved, conjugate, inplace;
  const int64_t* offsets;  // (B,) or nullptr: then `offset` for every sequence
  int64_t offset;
  const int32_t* cu;  // (B + 1,) for packed x, else nullptr
};

template <typename scalar_t, typename table_t>
void rotary_kernel(const Spec& sp, const scalar_t* x, Layout xl, scalar_t* out, Layout ol, const table_t* cos,
                   const table_t* sin) {
  using acc_t = acc_type<scalar_t>;
  const acc_t sign = sp.conjugate ? acc_t(-1) : acc_t(1);
  const bool heads_outer = xl.sh > xl.sn;  // e.g. a (B, H, N, D) tensor seen as (B, N, H, D)
  const bool unit = !sp.interleaved && xl.sd == 1 && ol.sd == 1;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, sp.dim));
  at::parallel_for(0, sp.rows * sp.heads, grain, [&](int64_t begin, int64_t end) {
    // The unit of work `task` is (b, h, n) or (b, n, h) with the last fastest, packed rows
    // (h, t) or (t, h); split once per chunk, then stepped without divisions.
    const int64_t inner = heads_outer ? (sp.cu ? sp.rows : sp.seqlen) : sp.heads;
    const int64_t middle = sp.cu ? (heads_outer ? sp.heads : sp.rows) : (heads_outer ? sp.heads : sp.seqlen);
    int64_t i = begin % inner, m = (begin / inner) % middle, outer = begin / inner / middle;
    int64_t b = 0;  // packed rows: the sequence of the current row, searched again only when left
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = heads_outer ? m : i;
      int64_t n;
      const scalar_t* xh;
      scalar_t* oh;
      if (sp.cu) {
        const int64_t row = heads_outer ? i : m;
        if (row < sp.cu[b] || row >= sp.cu[b + 1]) {  // upper_bound skips empty sequences
          b = std::upper_bound(sp.cu, sp.cu + sp.batch + 1, int32_t(row)) - sp.cu - 1;
        }
        n = row - sp.cu[b];
        xh = x + row * xl.sn + h * xl.sh;
        oh = out + row * ol.sn + h * ol.sh;
      } else {
        b = outer;
        n = heads_outer ? i : m;
        xh = x + b * xl.sb + n * xl.sn + h * xl.sh;
        oh = out + b * ol.sb + n * ol.sn + h * ol.sh;
      }
      const int64_t pos = n + (sp.offsets ? sp.offsets[b] : sp.offset);
      const bool inside = pos >= 0 && pos < sp.seqlen_ro;
      if (inside) {
        const int64_t at = ((sp.per_sequence_tables ? b * sp.seqlen_ro : 0) + pos) * sp.half;
        if (!unit) {
          rotate_row<acc_t, false>(xh, xl.sd, oh, ol.sd, cos + at, sin + at, sign, sp.half, sp.interleaved);
        } else if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<table_t, float>) {
          rotate_row_float(xh, oh, cos + at, sin + at, sign, sp.half);
        } else {
          rotate_row<acc_t, true>(xh, 1, oh, 1, cos + at, sin + at, sign, sp.half, false);
        }
      }
      if (!sp.inplace) {  // past rotary_dim, or the whole row when its position is outside the table: copied
        for (int64_t d = inside ? 2 * sp.half : 0; d < sp.dim; ++d) oh[d * ol.sd] = xh[d * xl.sd];
      }
      if (++i == inner) {
        i = 0;
        if (++m == middle) {
          m = 0;
          ++outer;
        }
      }
    }
  });
}

}  // namespace

void rotary_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  const c10::optional<at::Tensor>& offsets, int64_t offset, bool interleaved, bool conjugate,
                  const at::Tensor& out, const c10::optional<at::Tensor>& cu_seqlens) {
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "rotary: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == (varlen ? 3 : 4), "rotary: x must be ", varlen ? "packed (total, H, D)" : "(B, N, H, D)");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "rotary: out must match x");
  // Two empty tensors share a null data pointer: that is not writing in place.
  const bool inplace = x.numel() > 0 && out.data_ptr() == x.data_ptr();
  TORCH_CHECK(!inplace || out.strides() == x.strides(), "rotary: out must be x itself or not overlap it");
  // Rows are read and written in one pass: an out that overlaps x partly, or itself, loses values.
  if (!inplace && out.numel() > 0) {
    const at::MemOverlapStatus with_x = at::get_overlap_status(out, x);
    TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes && with_x != at::MemOverlapStatus::Partial &&
                    with_x != at::MemOverlapStatus::Full,
                "rotary: out must be x itself or not overlap it");
  }
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type() &&
                  (cos.dim() == 2 || cos.dim() == 3),
              "rotary: cos and sin must both be (S, R/2) or (B, S, R/2)");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() || cos.scalar_type() == at::kFloat,
              "rotary: cos/sin must have x's dtype or float32");
  Spec sp{};
  sp.heads = x.size(-2);
  sp.dim = x.size(-1);
  sp.half = cos.size(-1);
  sp.seqlen_ro = cos.size(-2);
  TORCH_CHECK(sp.half >= 1 && 2 * sp.half <= sp.dim, "rotary: rotary_dim = 2 * cos.size(-1) must be in [2, D]");
  at::Tensor cu;
  if (varlen) {
    cu = cu_seqlens->contiguous();
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 2 && cu.device().is_cpu(),
                "rotary: cu_seqlens must be a 1-D int32 CPU tensor of B + 1 >= 2 entries");
    sp.cu = cu.data_ptr<int32_t>();
    sp.batch = cu.numel() - 1;
    sp.rows = x.size(0);
    TORCH_CHECK(sp.cu[0] == 0 && sp.cu[sp.batch] == sp.rows, "rotary: cu_seqlens must run from 0 to ", sp.rows);
    for (int64_t b = 0; b < sp.batch; ++b) TORCH_CHECK(sp.cu[b + 1] >= sp.cu[b], "rotary: cu_seqlens must rise");
  } else {
    sp.batch = x.size(0);
    sp.seqlen = x.size(1);
    sp.rows = sp.batch * sp.seqlen;
  }
  TORCH_CHECK(cos.dim() == 2 || cos.size(0) == sp.batch, "rotary: per-sequence cos/sin must have B = ", sp.batch);
  at::Tensor shifts;
  if (offsets.has_value()) {
    shifts = offsets->to(at::kLong).contiguous();
    TORCH_CHECK(shifts.dim() == 1 && shifts.numel() == sp.batch, "rotary: offsets must be (B,) with B = ", sp.batch);
    sp.offsets = shifts.data_ptr<int64_t>();
  }
  sp.offset = offset;
  sp.per_sequence_tables = cos.dim() == 3;
  sp.interleaved = interleaved;
  sp.conjugate = conjugate;
  sp.inplace = inplace;
  if (sp.rows == 0 || sp.heads == 0) return;
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const Layout xl = layout_of(x, varlen), ol = layout_of(out, varlen);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (c.scalar_type() == x.scalar_type()) {
      rotary_kernel<scalar_t>(sp, xp, xl, op, ol, c.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>());
    } else {
      rotary_kernel<scalar_t>(sp, xp, xl, op, ol, c.const_data_ptr<float>(), s.const_data_ptr<float>());
    }
  });
}

}  // namespace cpu
}  // namespace attnkit
