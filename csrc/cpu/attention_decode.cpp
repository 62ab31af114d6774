// Decoding attention against a KV cache (see attnkit/attention_decode.h). Why not the
// flash attention kernel: with one query row per head its per-call setup (K transposed
// and tiled once per call, a mask tensor for the ragged lengths) costs ~7x the work;
// here each (sequence, KV head) task reads its valid cache rows once, for every query
// row of its GQA group, computing exact scores, softmax and P V in two passes.
#include "attnkit/attention_decode.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_rows.h"
#include "simd.h"

namespace attnkit {
namespace cpu {
namespace {

using namespace simd;

struct Rows {  // the query rows of one task and what each of them sees
  int64_t count, D, Dv;
  const float* q;      // (count, D), already scaled
  const int64_t* lo;   // first visible key per row
  const int64_t* hi;   // one past the last visible key per row (hi <= lo: nothing visible)
  const int64_t* pos;  // the row's position (for ALiBi)
  const float* slope = nullptr;      // per row, or nullptr
  const float* bias = nullptr;       // (count, L): a float attn_mask's values, or nullptr
  const uint8_t* blocked = nullptr;  // (count, L): 1 where a mask or padding hides the key, or nullptr
};

// The masks flash_attention may hand over (attention_decode takes none).
struct Masks {
  const void* mask = nullptr;  // attn_mask (B, H, Nq, N), these strides: bool (True = attend) or float (added)
  at::ScalarType mask_type = at::kBool;
  int64_t mask_stride[4] = {};
  const bool* padding = nullptr;  // (B, N), True = padding
  int64_t padding_stride = 0;

  bool any() const { return mask != nullptr || padding != nullptr; }
  bool additive() const { return mask != nullptr && mask_type != at::kBool; }
  bool hides_any() const { return padding != nullptr || (mask != nullptr && mask_type == at::kBool); }
  int64_t at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return b * mask_stride[0] + h * mask_stride[1] + i * mask_stride[2] + j * mask_stride[3];
  }
  // Whether key j of row (b, h, i) is hidden (a false bool mask entry, or padding).
  bool hides(int64_t b, int64_t h, int64_t i, int64_t j) const {
    if (padding != nullptr && padding[b * padding_stride + j]) return true;
    return mask != nullptr && mask_type == at::kBool && !static_cast<const bool*>(mask)[at(b, h, i, j)];
  }
  // A float mask's value for key j of row (b, h, i), rounded to float as the reference adds it.
  float bias(int64_t b, int64_t h, int64_t i, int64_t j) const {
    const int64_t o = at(b, h, i, j);
    switch (mask_type) {
      case at::kFloat: return static_cast<const float*>(mask)[o];
      case at::kDouble: return static_cast<float>(static_cast<const double*>(mask)[o]);
      case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(mask)[o]);
      default: return static_cast<float>(static_cast<const c10::BFloat16*>(mask)[o]);
    }
  }
};

// Four sums of 16 lanes each, as one 4-vector: a pairwise tree, not hsum's lane-by-lane
// chain, whose 16 dependent adds per key cost more than the key's FMAs at D = 64.
typedef float vf4 __attribute__((vector_size(16)));
typedef int vi4 __attribute__((vector_size(16)));

ATTNKIT_INLINE vf4 fold(vf v) {
  vf4 parts[4];
  std::memcpy(parts, &v, sizeof(v));
  return (parts[0] + parts[1]) + (parts[2] + parts[3]);
}

ATTNKIT_INLINE vf4 sums4(vf a, vf b, vf c, vf d) {
  const vf4 u0 = fold(a), u1 = fold(b), u2 = fold(c), u3 = fold(d);
  const vf4 t0 = __builtin_shuffle(u0, u1, vi4{0, 4, 1, 5}) + __builtin_shuffle(u0, u1, vi4{2, 6, 3, 7});
  const vf4 t1 = __builtin_shuffle(u2, u3, vi4{0, 4, 1, 5}) + __builtin_shuffle(u2, u3, vi4{2, 6, 3, 7});
  return __builtin_shuffle(t0, t1, vi4{0, 1, 4, 5}) + __builtin_shuffle(t0, t1, vi4{2, 3, 6, 7});
}

// s[j] = q . k_j for j in [lo, hi), four keys at a time (independent FMA chains).
ATTNKIT_INLINE void scores_of(const float* q, int64_t D, const float* k, int64_t k_stride, int64_t lo, int64_t hi,
                              float* s) {
  int64_t j = lo;
  for (; j + 4 <= hi; j += 4) {
    const float* k0 = k + j * k_stride;
    vf a0{}, a1{}, a2{}, a3{};
    int64_t d = 0;
    for (; d + W <= D; d += W) {
      const vf x = load(q + d);
      a0 += x * load(k0 + d), a1 += x * load(k0 + k_stride + d);
      a2 += x * load(k0 + 2 * k_stride + d), a3 += x * load(k0 + 3 * k_stride + d);
    }
    if (d < D) {
      const vf x = load_tail(q + d, D - d, 0.f);
      a0 += x * load_tail(k0 + d, D - d, 0.f), a1 += x * load_tail(k0 + k_stride + d, D - d, 0.f);
      a2 += x * load_tail(k0 + 2 * k_stride + d, D - d, 0.f), a3 += x * load_tail(k0 + 3 * k_stride + d, D - d, 0.f);
    }
    const vf4 four = sums4(a0, a1, a2, a3);
    std::memcpy(s + j, &four, sizeof(four));
  }
  for (; j < hi; ++j) {
    const float* kj = k + j * k_stride;
    vf a{};
    int64_t d = 0;
    for (; d + W <= D; d += W) a += load(q + d) * load(kj + d);
    if (d < D) a += load_tail(q + d, D - d, 0.f) * load_tail(kj + d, D - d, 0.f);
    const vf4 f = fold(a);
    s[j] = (f[0] + f[2]) + (f[1] + f[3]);
  }
}

// o += sum over j in [lo, hi) of p[j] v_j, four V rows per pass over o.
ATTNKIT_INLINE void add_weighted_rows(const float* p, const float* v, int64_t v_stride, int64_t lo, int64_t hi,
                                      float* o, int64_t Dv) {
  int64_t j = lo;
  for (; j + 4 <= hi; j += 4) {
    const float* v0 = v + j * v_stride;
    const vf p0 = splat(p[j]), p1 = splat(p[j + 1]), p2 = splat(p[j + 2]), p3 = splat(p[j + 3]);
    int64_t d = 0;
    for (; d + W <= Dv; d += W)
      store(o + d, load(o + d) + (p0 * load(v0 + d) + p1 * load(v0 + v_stride + d)) +
                       (p2 * load(v0 + 2 * v_stride + d) + p3 * load(v0 + 3 * v_stride + d)));
    for (; d < Dv; ++d)
      o[d] += (p[j] * v0[d] + p[j + 1] * v0[v_stride + d]) +
              (p[j + 2] * v0[2 * v_stride + d] + p[j + 3] * v0[3 * v_stride + d]);
  }
  for (; j < hi; ++j) {
    const float* vj = v + j * v_stride;
    const vf pj = splat(p[j]);
    int64_t d = 0;
    for (; d + W <= Dv; d += W) store(o + d, load(o + d) + pj * load(vj + d));
    for (; d < Dv; ++d) o[d] += p[j] * vj[d];
  }
}

// The valid cache rows of one (sequence, KV head), in the tensor's dtype.
struct Cache {
  enum Type { kFloat, kHalf, kBFloat16 };
  const void* data;  // the task's first row
  int64_t stride;    // elements between rows
  int64_t width;     // D or Dv
  Type type;
};

// Rows [c, c + n) of `x` as float rows: in place for float32, else converted into `buf`
// (n * width floats), a chunk at a time: a whole long cache converted up front was tens of MB
// of fresh memory per task, faulted in on every call.
template <typename T>
ATTNKIT_INLINE void to_float_rows(const T* p, int64_t stride, int64_t n, int64_t width, float* buf) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < width; ++d) buf[j * width + d] = static_cast<float>(p[j * stride + d]);
}

ATTNKIT_INLINE const float* chunk_of(const Cache& x, int64_t c, int64_t n, float* buf, int64_t* stride) {
  if (x.type == Cache::kFloat) {
    *stride = x.stride;
    return static_cast<const float*>(x.data) + c * x.stride;
  }
  if (x.type == Cache::kBFloat16) {
    to_float_rows(static_cast<const c10::BFloat16*>(x.data) + c * x.stride, x.stride, n, x.width, buf);
  } else {
    to_float_rows(static_cast<const c10::Half*>(x.data) + c * x.stride, x.stride, n, x.width, buf);
  }
  *stride = x.width;
  return buf;
}

// Keys per pass of a GQA group's rows: 256 rows of K (or V) at D = 128 are 128 KB, which
// stay in L2 while each row of the group reads them, so a long cache is read from memory once.
constexpr int64_t kKeyChunk = 256;

// scores (count, L) -> exponentials in place; out (count, Dv) = P V; lse (count,). chunk_buf:
// kKeyChunk x max(D, Dv) floats for half-precision caches; sums: count floats.
ATTNKIT_SIMD_CLONES
void attend(const Rows& rows, const Cache& k, const Cache& v, float softcap, float* scores, int64_t L, float* out,
            float* lse, float* chunk_buf, float* sums) {
  const float inf = std::numeric_limits<float>::infinity();
  int64_t first = L, last = 0;  // the keys any row sees
  for (int64_t r = 0; r < rows.count; ++r) {
    if (rows.hi[r] > rows.lo[r]) first = std::min(first, rows.lo[r]), last = std::max(last, rows.hi[r]);
  }
  for (int64_t c = first; c < last; c += kKeyChunk) {
    int64_t ks;
    const float* kc = chunk_of(k, c, std::min(kKeyChunk, last - c), chunk_buf, &ks);
    for (int64_t r = 0; r < rows.count; ++r) {
      const int64_t lo = std::max(rows.lo[r], c), hi = std::min(rows.hi[r], c + kKeyChunk);
      if (lo < hi) scores_of(rows.q + r * rows.D, rows.D, kc, ks, lo - c, hi - c, scores + r * L + c);
    }
  }
  for (int64_t r = 0; r < rows.count; ++r) {
    float* s = scores + r * L;
    std::fill(out + r * rows.Dv, out + (r + 1) * rows.Dv, 0.f);
    const int64_t lo = rows.lo[r], hi = rows.hi[r];
    sums[r] = 0;
    if (hi <= lo) {
      lse[r] = -inf;
      continue;
    }
    if (softcap > 0) attn_rows::softcap(s + lo, nullptr, hi - lo, softcap);
    if (rows.slope) {
      const float slope = rows.slope[r];
      for (int64_t j = lo; j < hi; ++j) s[j] -= slope * static_cast<float>(std::abs(j - rows.pos[r]));
    }
    if (rows.bias) {
      const float* bias = rows.bias + r * L;
      for (int64_t j = lo; j < hi; ++j) s[j] += bias[j];
    }
    if (rows.blocked) {  // after the biases, as the reference masks: a hidden key is -inf whatever its score
      const uint8_t* blocked = rows.blocked + r * L;
      for (int64_t j = lo; j < hi; ++j) s[j] = blocked[j] ? -inf : s[j];
    }
    const float m = attn_rows::row_max(s + lo, hi - lo);  // NaN wins, as in the reference
    const float shift = std::isinf(m) && m < 0 ? 0.f : m;
    sums[r] = attn_rows::exp_shift_sum(s + lo, hi - lo, shift);
    lse[r] = shift + std::log(sums[r]);
  }
  for (int64_t c = first; c < last; c += kKeyChunk) {
    int64_t vs;
    const float* vc = chunk_of(v, c, std::min(kKeyChunk, last - c), chunk_buf, &vs);
    for (int64_t r = 0; r < rows.count; ++r) {
      const int64_t lo = std::max(rows.lo[r], c), hi = std::min(rows.hi[r], c + kKeyChunk);
      if (lo < hi && sums[r] != 0)
        add_weighted_rows(scores + r * L + c, vc, vs, lo - c, hi - c, out + r * rows.Dv, rows.Dv);
    }
  }
  for (int64_t r = 0; r < rows.count; ++r) {
    if (sums[r] == 0) continue;  // nothing visible, or every score -inf: output 0 (NaN stays NaN)
    float* o = out + r * rows.Dv;
    const float inv = 1.f / sums[r];
    const vf vinv = splat(inv);
    int64_t d = 0;
    for (; d + W <= rows.Dv; d += W) store(o + d, load(o + d) * vinv);
    for (; d < rows.Dv; ++d) o[d] *= inv;
  }
}

// q (B, H, Nq, D), out (B, H, Nq, Dv) and lse (B, H, Nq) through their strides. Sequence b's
// keys are rows [starts[b], starts[b] + lengths[b]) of dim 2 of k and v at batch 0 when starts is
// given (a packed varlen cache), else rows [0, lengths[b]) at batch b.
template <typename scalar_t>
void decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* lengths,
            const int32_t* starts, float scale, float softcap, int64_t window_left, const float* slopes,
            const Masks& masks, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Dv = v.size(3), group = H / Hkv, rows_per_kv = group * Nq;
  // A (sequence, KV head)'s rows are split into `parts` tasks only when there are fewer of
  // those than threads (MQA at batch 1): each part then reads the cache rows again.
  const int64_t kv_tasks = B * Hkv;
  const int64_t parts = std::clamp<int64_t>((at::get_num_threads() + kv_tasks - 1) / kv_tasks, 1, rows_per_kv);
  const int64_t per_part = (rows_per_kv + parts - 1) / parts;
  const Cache::Type type = std::is_same_v<scalar_t, float>        ? Cache::kFloat
                           : std::is_same_v<scalar_t, c10::BFloat16> ? Cache::kBFloat16
                                                                     : Cache::kHalf;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, kv_tasks * parts, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(per_part * D), outf(per_part * Dv), lsef(per_part), sums(per_part), scores, slope(per_part),
        chunk_buf(std::is_same_v<scalar_t, float> ? 0 : kKeyChunk * std::max(D, Dv));
    std::vector<int64_t> lo(per_part), hi(per_part), pos(per_part);
    std::vector<uint8_t> blocked;
    std::vector<float> bias;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / parts / Hkv, hk = t / parts % Hkv, L = lengths[b];
      const int64_t r0 = t % parts * per_part, count = std::min(rows_per_kv, r0 + per_part) - r0;
      if (count <= 0) continue;
      // Local row r is the group's row r0 + r: head hk * group + (r0 + r) / Nq, new token (r0 + r) % Nq.
      for (int64_t r = 0; r < count; ++r) {
        const int64_t h = hk * group + (r0 + r) / Nq, i = (r0 + r) % Nq;
        const scalar_t* qrow = qp + b * q.stride(0) + h * q.stride(1) + i * q.stride(2);
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(qrow[d]) * scale;
        pos[r] = L - Nq + i;
        hi[r] = std::min(pos[r] + 1, L);
        lo[r] = window_left >= 0 ? std::max<int64_t>(0, pos[r] - window_left) : 0;
        if (slopes) slope[r] = slopes[b * H + h];
      }
      // Only keys from the first any row sees on: with a sliding window, converting the whole
      // cache of a half-precision call cost ~45x the window's work (32k cache, window 64).
      const int64_t first = *std::min_element(lo.begin(), lo.begin() + count), span = L - first;
      for (int64_t r = 0; r < count; ++r) lo[r] -= first, hi[r] -= first, pos[r] -= first;
      scores.resize(static_cast<size_t>(count * std::max<int64_t>(span, 1)));
      const int64_t row0 = (starts ? starts[b] : 0) + first, kb = starts ? 0 : b;
      const Cache kc{kp + kb * k.stride(0) + hk * k.stride(1) + row0 * k.stride(2), k.stride(2), D, type};
      const Cache vc{vp + kb * v.stride(0) + hk * v.stride(1) + row0 * v.stride(2), v.stride(2), Dv, type};
      if (masks.any()) {  // each row's visible keys only: attend reads no other entry
        if (masks.hides_any()) blocked.resize(scores.size());
        if (masks.additive()) bias.resize(scores.size());
        for (int64_t r = 0; r < count; ++r) {
          const int64_t h = hk * group + (r0 + r) / Nq, i = (r0 + r) % Nq;
          for (int64_t j = lo[r]; j < hi[r]; ++j) {
            if (masks.hides_any()) blocked[r * span + j] = masks.hides(b, h, i, first + j);
            if (masks.additive()) bias[r * span + j] = masks.bias(b, h, i, first + j);
          }
        }
      }
      Rows rows{count, D, Dv, qf.data(), lo.data(), hi.data(), pos.data()};
      rows.slope = slopes ? slope.data() : nullptr;
      rows.bias = masks.additive() ? bias.data() : nullptr;
      rows.blocked = masks.hides_any() ? blocked.data() : nullptr;
      attend(rows, kc, vc, softcap, scores.data(), span, outf.data(), lsef.data(), chunk_buf.data(), sums.data());
      for (int64_t r = 0; r < count; ++r) {
        const int64_t h = hk * group + (r0 + r) / Nq, i = (r0 + r) % Nq;
        scalar_t* orow = op + b * out.stride(0) + h * out.stride(1) + i * out.stride(2);
        for (int64_t d = 0; d < Dv; ++d) orow[d] = static_cast<scalar_t>(outf[r * Dv + d]);
        lp[b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2)] = lsef[r];
      }
    }
  });
}

// As attention_forward's: the ops check these in Python, a direct call gets the same refusal.
void check_scalars(const char* op, double scale, double softcap, int64_t window_left) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite");
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), op, ": softcap must be finite and >= 0");
  TORCH_CHECK(window_left >= -1, op, ": window_left must be >= -1 (-1 = unbounded)");
}

void check_dtypes(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", q.scalar_type());
}

const float* slopes_of(const char* op, const c10::optional<at::Tensor>& alibi_slopes, int64_t B, int64_t H) {
  if (!alibi_slopes.has_value()) return nullptr;
  TORCH_CHECK(alibi_slopes->scalar_type() == at::kFloat && alibi_slopes->is_contiguous() &&
                  alibi_slopes->numel() == B * H && alibi_slopes->device().is_cpu(),
              op, ": alibi_slopes must be contiguous float32 (B, H)");
  return alibi_slopes->data_ptr<float>();
}

void run_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* lengths,
                const int32_t* starts, double scale, double softcap, int64_t window_left, const float* slopes,
                const Masks& masks, at::Tensor& out, at::Tensor& lse) {
  if (out.numel() == 0 && lse.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_decode_forward", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // refused by check_dtypes
      decode<scalar_t>(q, k, v, lengths, starts, static_cast<float>(scale), static_cast<float>(softcap), window_left,
                       slopes, masks, out, lse);
    }
  });
}

}  // namespace

std::vector<at::Tensor> attention_decode_forward(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                 double scale, double softcap, int64_t window_left,
                                                 const c10::optional<at::Tensor>& alibi_slopes,
                                                 const c10::optional<at::Tensor>& attn_mask,
                                                 const c10::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "attention_decode_forward: q, k_cache, v_cache must be 4-D");
  constexpr const char* op = "attention_decode_forward";
  check_dtypes(op, q, k_cache, v_cache);
  TORCH_CHECK(cache_seqlens.device().is_cpu(), op, ": cache_seqlens must be on the CPU");
  const int64_t B = q.size(0), H = q.size(1), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(0) == B && v_cache.size(0) == B && v_cache.size(1) == Hkv && Hkv > 0 && H % Hkv == 0,
              "attention_decode_forward: caches must be (B, H_kv, N, D) with H a multiple of H_kv");
  TORCH_CHECK(k_cache.size(3) == q.size(3) && k_cache.size(2) == v_cache.size(2),
              "attention_decode_forward: k_cache must be (B, H_kv, N, D) and v_cache (B, H_kv, N, Dv)");
  TORCH_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "attention_decode_forward: q, k_cache, v_cache need a unit last stride");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  cache_seqlens.is_contiguous(),
              "attention_decode_forward: cache_seqlens must be contiguous int32 (B,)");
  check_scalars(op, scale, softcap, window_left);
  const int32_t* lengths = cache_seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lengths[b] >= 0 && lengths[b] <= k_cache.size(2), "attention_decode_forward: cache_seqlens[", b,
                "] = ", lengths[b], " is outside [0, ", k_cache.size(2), "]");
  const float* slopes = slopes_of(op, alibi_slopes, B, H);
  Masks masks;
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    const auto type = m.scalar_type();
    TORCH_CHECK((type == at::kBool || type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                 type == at::kBFloat16) &&
                    m.dim() == 4 && m.device().is_cpu() && m.size(0) == B && m.size(1) == H &&
                    m.size(2) == q.size(2) && m.size(3) == k_cache.size(2),
                "attention_decode_forward: attn_mask must be a CPU bool or floating (B, H, Nq, N_max) tensor");
    masks.mask = m.data_ptr();
    masks.mask_type = type;
    for (int d = 0; d < 4; ++d) masks.mask_stride[d] = m.stride(d);
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.device().is_cpu() && m.size(0) == B &&
                    m.size(1) == k_cache.size(2) && m.stride(1) == 1,
                "attention_decode_forward: key_padding_mask must be a CPU bool (B, N_max) tensor, rows contiguous");
    masks.padding = m.data_ptr<bool>();
    masks.padding_stride = m.stride(0);
  }
  at::Tensor out = at::empty({B, H, q.size(2), v_cache.size(3)}, q.options());
  at::Tensor lse = at::empty({B, H, q.size(2)}, q.options().dtype(at::kFloat));
  run_decode(q, k_cache, v_cache, lengths, nullptr, scale, softcap, window_left, slopes, masks, out, lse);
  return {out, lse};
}

std::vector<at::Tensor> attention_decode_varlen_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                        double scale, double softcap, int64_t window_left,
                                                        const c10::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* op = "attention_decode_varlen_forward";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q, k, v must be 3-D (total, heads, head_dim)");
  check_dtypes(op, q, k, v);
  const int64_t H = q.size(1), Hkv = k.size(1), D = q.size(2), Dv = v.size(2);
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == Hkv && Hkv > 0 && H % Hkv == 0 && k.size(2) == D, op,
              ": k must be (total_k, H_kv, D) and v (total_k, H_kv, Dv), H a multiple of H_kv");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, op, ": q, k, v need a unit last stride");
  for (const at::Tensor* cu : {&cu_seqlens_q, &cu_seqlens_k}) {
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() && cu->device().is_cpu() &&
                    cu->numel() == cu_seqlens_q.numel() && cu->numel() >= 2,
                op, ": cu_seqlens_q and cu_seqlens_k must be contiguous CPU int32 (B + 1,), B >= 1");
  }
  check_scalars(op, scale, softcap, window_left);
  const int64_t B = cu_seqlens_q.numel() - 1, total_q = q.size(0), total_k = k.size(0);
  TORCH_CHECK(total_q % B == 0, op, ": every sequence must have the same number of queries, got ", total_q,
              " for ", B, " sequences");
  const int64_t Nq = total_q / B;
  const int32_t* cu_q = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* cu_k = cu_seqlens_k.data_ptr<int32_t>();
  std::vector<int32_t> lengths(B), starts(B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cu_q[b] == b * Nq && cu_q[b + 1] == (b + 1) * Nq, op, ": sequence ", b, " must have ", Nq,
                " queries (cu_seqlens_q[", b, "] = ", cu_q[b], ", [", b + 1, "] = ", cu_q[b + 1], ")");
    TORCH_CHECK(cu_k[0] == 0 && cu_k[b] <= cu_k[b + 1] && cu_k[b + 1] <= total_k, op,
                ": cu_seqlens_k must rise from 0 to at most ", total_k, ", got ", cu_k[b], ", ", cu_k[b + 1],
                " at ", b);
    starts[b] = cu_k[b], lengths[b] = cu_k[b + 1] - cu_k[b];
  }
  const float* slopes = slopes_of(op, alibi_slopes, B, H);
  // The dense kernel's (B, H, Nq, .) views of the packed tensors; k and v as one sequence of
  // total_k rows, which `starts` cut.
  const at::Tensor q4 = q.view({B, Nq, H, D}).permute({0, 2, 1, 3});
  const at::Tensor k4 = k.unsqueeze(0).permute({0, 2, 1, 3}), v4 = v.unsqueeze(0).permute({0, 2, 1, 3});
  at::Tensor out = at::empty({total_q, H, Dv}, q.options());
  at::Tensor lse = at::empty({H, total_q}, q.options().dtype(at::kFloat));
  at::Tensor out4 = out.view({B, Nq, H, Dv}).permute({0, 2, 1, 3});
  at::Tensor lse3 = lse.view({H, B, Nq}).permute({1, 0, 2});
  run_decode(q4, k4, v4, lengths.data(), starts.data(), scale, softcap, window_left, slopes, Masks{}, out4, lse3);
  return {out, lse};
}

}  // namespace cpu
}  // namespace attnkit
