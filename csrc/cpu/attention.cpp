// Flash attention on the CPU: the structure of triton_kernels/flash_attention.py
// with GEMMs on tiles instead of tl.dot.
//
// Forward: one task per (batch, head, block of BM queries) walks the visible key
// blocks with an online softmax; S = Q (scale K^T) and acc += P V are GEMMs into
// per-thread buffers, the row passes (max, exp, soft-cap) are vectorized
// (attention_rows.cpp). Backward recomputes P from the saved log-sum-exp. With
// enough (batch, kv-head) pairs to keep every thread busy, one task per pair
// walks its key blocks and also accumulates dQ of the group's heads (5 GEMMs per
// tile, no race: the task owns those rows). Otherwise dK/dV run one task per
// key block and dQ one per query block (7 GEMMs per tile). No atomics either
// way, and a fixed summation order, so the result is deterministic.
//
// Every tile product is a plain row-major A B (gemm_nn: oneDNN's brgemm, BLAS
// for double): operands that would need a transpose (K^T, V^T, Q^T, dO^T) are
// transposed once per call, O(N D), into 64-column panels (Columns), so that no
// GEMM's leading dim follows the sequence length. Statistics, accumulators and GEMMs are
// float (double for double inputs); fp16/bf16 inputs are converted to float
// once per call and the results back.
//
// Fused RoPE (attention_rope.h, entered from attention_rotary.cpp) rotates q
// and k in those same copies: K while scale * K^T is formed, each Q tile as a
// forward task loads it, Q and K while the backward transposes them (K per key
// block inside the dK/dV kernel on the one-task-per-pair schedule), and writes
// dQ, dK rotated back where it scales them.
//
// Files: attention_kernel.h (what the others share: layouts, the score pass of
// a tile, the fused-RoPE operand passes, tile sizes), attention_gemm.cpp
// (gemm_nn), attention_forward.cpp and attention_backward.cpp (the kernels and
// their entry points); this one checks the arguments and prepares the call.
#include "attnkit/attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "attention_kernel.h"
#include "attention_rows.h"

namespace attnkit {
namespace cpu {
namespace flash {

// ------------------------------------------------------------------ argument checks

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 2,
              "attention: ", name, " must be a 1-D int32 CPU tensor of batch + 1 >= 2 entries");
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[cu.numel() - 1] == total, "attention: ", name, " must run from 0 to ", total);
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    TORCH_CHECK(p[b + 1] >= p[b], "attention: ", name, " must be non-decreasing");
    TORCH_CHECK(p[b + 1] - p[b] <= max_seqlen, "attention: a sequence of ", name, " is longer than max_seqlen ",
                max_seqlen);
  }
}

}  // namespace

// Makes rows addressable with a BLAS leading dimension: last dim contiguous, rows
// not overlapping (an expanded k, say, is copied), and rows less than 2 GiB apart
// (BLAS takes an int leading dimension and oneDNN's brgemm int byte strides: MKL
// refused a float64 one of 2^31 and left the scores unwritten, brgemm threw bad_alloc).
at::Tensor rows_ready(const at::Tensor& t, int64_t row_dim) {
  const bool many = t.size(row_dim) > 1;
  if (t.stride(-1) != 1 || (many && t.stride(row_dim) < t.size(-1)) ||
      (many && t.stride(row_dim) >= (int64_t{1} << 31) / static_cast<int64_t>(t.element_size()))) {
    return t.contiguous();
  }
  return t;
}

Call prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_q,
             const c10::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
             const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
             const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right,
             bool bottom_right, double softcap, double scale, double dropout_p, int64_t seed) {
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), "attention: q, k and v must be tensors");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attention: tensors must be on the CPU");
  TORCH_CHECK(is_float_type(q.scalar_type()), "attention: q must be float16, bfloat16, float32 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention: q, k and v must have one dtype");
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "attention: give both cu_seqlens_q and cu_seqlens_k or neither");
  Call c;
  Spec& sp = c.spec;
  sp.varlen = cu_q.has_value();
  const int64_t ndim = sp.varlen ? 3 : 4, heads_dim = 1, row_dim = sp.varlen ? 0 : 2;
  TORCH_CHECK(q.dim() == ndim && k.dim() == ndim && v.dim() == ndim, "attention: q, k, v must be ", ndim,
              "-D (", sp.varlen ? "packed (total, H, D)" : "(B, H, N, D)", ")");
  sp.heads = q.size(heads_dim);
  sp.heads_kv = k.size(heads_dim);
  TORCH_CHECK(v.size(heads_dim) == sp.heads_kv && sp.heads_kv > 0 && sp.heads % sp.heads_kv == 0,
              "attention: q heads must be a multiple of k/v heads, and k, v must have the same heads");
  sp.group = sp.heads / sp.heads_kv;
  sp.dim = q.size(-1);
  sp.dim_v = v.size(-1);
  TORCH_CHECK(k.size(-1) == sp.dim && sp.dim >= 1, "attention: q and k need one head dim >= 1");
  TORCH_CHECK(sp.dim_v >= 1, "attention: v needs a head dim >= 1");
  TORCH_CHECK(k.size(row_dim) == v.size(row_dim), "attention: k and v must have the same length");
  TORCH_CHECK(max_q >= 0 && max_k >= 0 && max_q < INT_MAX && max_k < INT_MAX, "attention: bad max_seqlen");
  if (sp.varlen) {
    check_cu_seqlens(*cu_q, "cu_seqlens_q", q.size(0), max_q);
    check_cu_seqlens(*cu_k, "cu_seqlens_k", k.size(0), max_k);
    TORCH_CHECK(cu_q->numel() == cu_k->numel(), "attention: cu_seqlens_q and cu_seqlens_k differ in batch");
    TORCH_CHECK(!attn_mask.has_value() && !key_padding_mask.has_value(),
                "attention: attn_mask and key_padding_mask are dense-only");
    c.cu_q = cu_q->contiguous();
    c.cu_k = cu_k->contiguous();
    sp.cu_q = c.cu_q.data_ptr<int32_t>();
    sp.cu_k = c.cu_k.data_ptr<int32_t>();
    sp.batch = cu_q->numel() - 1;
  } else {
    sp.batch = q.size(0);
    TORCH_CHECK(k.size(0) == sp.batch && v.size(0) == sp.batch, "attention: q, k, v must have one batch size");
    TORCH_CHECK(max_q == q.size(2) && max_k == k.size(2), "attention: dense max_seqlen must be Nq and Nk");
  }
  sp.max_q = max_q;
  sp.max_k = max_k;
  c.q = rows_ready(q, row_dim);
  c.k = rows_ready(k, row_dim);
  c.v = rows_ready(v, row_dim);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK(mask.device().is_cpu() && mask.dim() == 4 &&
                    mask.sizes() == at::IntArrayRef({sp.batch, sp.heads, max_q, max_k}),
                "attention: attn_mask must be a CPU tensor of shape (B, H, Nq, Nk), usually an expanded view");
    if (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte) {
      c.keep_mask = mask.scalar_type() == at::kBool ? mask.view(at::kByte) : mask;
      sp.keep_mask = c.keep_mask.data_ptr<uint8_t>();
    } else {
      TORCH_CHECK(is_float_type(mask.scalar_type()), "attention: attn_mask must be bool, uint8 or floating");
      // Convert only the distinct values (broadcast dims narrowed to 1), then
      // broadcast again: never an (Nq, Nk) copy per batch and head.
      at::Tensor compact = mask;
      for (int64_t d = 0; d < 4; ++d) {
        if (compact.stride(d) == 0 && compact.size(d) > 0) compact = compact.narrow(d, 0, 1);
      }
      c.add_mask = compact.to(acc).expand(mask.sizes());
      sp.add_mask = c.add_mask.data_ptr();
    }
    const at::Tensor& used = c.keep_mask.defined() ? c.keep_mask : c.add_mask;
    for (int64_t d = 0; d < 4; ++d) sp.mask_stride[d] = used.size(d) == 1 ? 0 : used.stride(d);
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& pad = *key_padding_mask;
    TORCH_CHECK(pad.device().is_cpu() && (pad.scalar_type() == at::kBool || pad.scalar_type() == at::kByte) &&
                    pad.sizes() == at::IntArrayRef({sp.batch, max_k}),
                "attention: key_padding_mask must be a bool CPU tensor of shape (B, Nk)");
    c.pad = (pad.scalar_type() == at::kBool ? pad.view(at::kByte) : pad).contiguous();
    sp.pad = c.pad.data_ptr<uint8_t>();
  }
  if (alibi_slopes.has_value()) {
    const at::Tensor& slopes = *alibi_slopes;
    TORCH_CHECK(slopes.device().is_cpu() && slopes.scalar_type() == at::kFloat &&
                    slopes.sizes() == at::IntArrayRef({sp.batch, sp.heads}),
                "attention: alibi_slopes must be a float32 CPU tensor of shape (B, H)");
    c.alibi = slopes.contiguous();
    sp.alibi = c.alibi.data_ptr<float>();
  }
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "attention: window sides must be >= -1");
  // A side past any length is unbounded too: near INT64_MAX it overflowed the tiles' key ranges.
  sp.left = window_left < 0 || window_left > kUnbounded ? kUnbounded : window_left;
  sp.right = window_right < 0 || window_right > kUnbounded ? kUnbounded : window_right;
  sp.bottom_right = bottom_right;
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "attention: softcap must be finite and >= 0");
  TORCH_CHECK(std::isfinite(scale), "attention: scale must be finite");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attention: dropout_p must be in [0, 1)");
  sp.softcap = softcap;
  sp.scale = scale;
  sp.dropout = dropout_p > 0;
  sp.threshold = static_cast<uint32_t>(std::nearbyint(dropout_p * double(1 << 24)));  // Python's round
  sp.drop_scale = sp.dropout ? 1.0 / (1.0 - dropout_p) : 1.0;
  sp.seed = static_cast<uint64_t>(seed);
  return c;
}

std::vector<int64_t> out_shape(const at::Tensor& q, int64_t dim_v) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  shape.back() = dim_v;
  return shape;
}

std::vector<int64_t> stat_shape(const Spec& sp, const at::Tensor& q) {
  if (sp.varlen) return {sp.heads, q.size(0)};
  return {sp.batch, sp.heads, sp.max_q};
}

// `bytes` of fresh memory, on transparent huge pages where Linux gives them on request (its
// usual setting, "madvise"). Why: K^T of a long sequence is tens of MB, faulted in 4 KB page
// by page each call; with few queries those faults were most of a forward (12 heads, 16384
// keys, D = 64, 16 queries: 21 ms, against 9-12 ms on huge pages). ATTNKIT_CPU_HUGE_PAGES=0
// turns it off (where the kernel's compaction for huge pages stalls).
static at::Tensor huge_page_buffer(int64_t bytes) {
  const auto options = at::TensorOptions().dtype(at::kByte);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool wanted = [] {
    const char* value = std::getenv("ATTNKIT_CPU_HUGE_PAGES");
    return value == nullptr || std::string(value) != "0";
  }();
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t size = (static_cast<size_t>(bytes) + kHugePage - 1) / kHugePage * kHugePage;
  void* data = nullptr;
  if (wanted && posix_memalign(&data, kHugePage, size) == 0) {
    madvise(data, size, MADV_HUGEPAGE);  // a hint: where refused, the pages stay 4 KB
    return at::from_blob(data, {bytes}, [](void* p) { std::free(p); }, options);
  }
#endif
  return at::empty({bytes}, options);
}

// A tensor of `sizes` in `options`: fresh (kNoScratch), or a view of buffer
// `slot` of the calling thread, kept from call to call, for copies that live
// only inside one call. Why: a float32 backward at B=4 H=8 N=256 D=64 allocates
// four 2 MB operand copies and three 2 MB gradients; glibc hands such blocks
// back to the system when they are freed, and the next call faults every page
// in again (up to ~4,000 page faults a forward+backward, 10-30% of its time on
// the VM of BENCHMARKS.md). Up to kScratchBytes a slot; larger copies are
// allocated each call, on huge pages (huge_page_buffer).
at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& options, int slot) {
  constexpr int64_t kScratchBytes = 8 << 20;
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (slot == kNoScratch) return at::empty(sizes, options);
  if (bytes > kScratchBytes) return huge_page_buffer(bytes).view(options.dtype().toScalarType()).view(sizes);
  TORCH_CHECK(slot >= 0 && slot < kScratchSlots, "attention scratch: no slot ", slot);
  // Bytes, freed when the thread ends. Per thread: the Python bindings hold the GIL through a
  // call, but nothing stops C++ callers from running two calls at once.
  thread_local at::Tensor kept[kScratchSlots];
  at::Tensor& buffer = kept[slot];
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }
  return buffer.narrow(0, 0, bytes).view(options.dtype().toScalarType()).view(sizes);
}

at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

Columns columns_like(const Spec& sp, bool queries, const at::Tensor& x, at::ScalarType dtype, int slot) {
  const std::vector<int64_t> first = panel_starts(sp, queries);
  const int64_t heads = x.size(1), dim = x.size(-1), panel = dim * kPanel;
  Columns c;
  c.data = scratch({heads * first.back() * panel}, x.options().dtype(dtype), slot);
  c.start = at::empty({sp.batch}, at::TensorOptions().dtype(at::kLong));
  int64_t* start = c.start.data_ptr<int64_t>();
  for (int64_t b = 0; b < sp.batch; ++b) start[b] = first[b] * panel;
  c.head_stride = first.back() * panel;
  c.panel_stride = panel;
  return c;
}

Columns transposed(const Spec& sp, bool queries, const at::Tensor& x, double factor, at::ScalarType dtype, int slot) {
  Columns c = columns_like(sp, queries, x, dtype, slot);
  // fp16/bf16 converted by ATen first (vectorized): element by element in the transpose, an
  // fp16 forward+backward at (4, 8, 256, 64) ran ~1.2x slower.
  const at::Tensor xa = as_type(x, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "attention_transposed", [&] {
    rows_to_columns<scalar_t>(sp, queries, rows_of<const scalar_t>(xa, sp.varlen), x.size(1), x.size(-1),
                              static_cast<scalar_t>(factor), panels_of<scalar_t>(c));
  });
  return c;
}

}  // namespace flash

at::Tensor attention_dropout_keep_mask(int64_t batch, int64_t heads, int64_t max_q, int64_t max_k, double dropout_p,
                                       int64_t seed) {
  TORCH_CHECK(batch >= 0 && heads >= 0 && max_q >= 0 && max_k >= 0, "attention_dropout_keep_mask: negative size");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attention_dropout_keep_mask: dropout_p must be in [0, 1)");
  const uint32_t threshold = static_cast<uint32_t>(std::nearbyint(dropout_p * double(1 << 24)));
  at::Tensor keep = at::empty({batch, heads, max_q, max_k}, at::TensorOptions().dtype(at::kByte));
  uint8_t* p = keep.data_ptr<uint8_t>();
  at::parallel_for(0, batch * heads * max_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      attn_rows::dropout_keep(p + row * max_k, static_cast<uint64_t>(seed) + uint64_t(row / max_q), row % max_q, 0,
                              max_k, threshold);
    }
  });
  return keep.view(at::kBool);
}

}  // namespace cpu
}  // namespace attnkit
