// Fused-step LSTM / GRU time loops for batch 5+ on the CPU (float32, no
// projection), and the tiled brgemm GEMM of the backward's weight gradients.
//
// The per-step loop of rnn_sequence.h calls a GEMM (oneDNN), then a separate
// elementwise pass over (B, 4H), with a fork/join around each. Here one
// OpenMP team lives through the whole sequence: each thread owns a range of
// hidden units, runs the recurrent GEMM for the G gate columns (4 LSTM, 3 GRU)
// of one chunk of its units straight into a small tile and the gate math on
// that tile while it is in L1/L2, and the team meets at one barrier per step (the next
// GEMM reads every unit of h). W_hh is repacked once per call so that a
// chunk's G gate columns are one contiguous (H, G * chunk) matrix (W_ih
// too: every few steps a thread projects the next steps' inputs for its
// chunks, so the step GEMM finds them still in cache, instead of one
// (T, B, G H) GEMM up front whose output has left the cache when read).
// The backward splits the units the same way: dh_t[:, own units] = gp_{t+1}
// W_hh[:, own units] (every thread reads all of gp_{t+1}, hence the barrier;
// the GRU adds it onto the part through z), then the gate backward on the own units.
#include "rnn_fused.h"
#include "row_isa.h"

// Without AVX the generic copy's 16-lane vectors are emulated and inlined
// (gate_math.h's templates instantiate for them): the vector-ABI note gcc
// prints is moot. Before the includes, where those templates are.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "attnkit/gate_math.h"
#include "attnkit/linear.h"
#include "attnkit/rnn_sequence.h"

// fbgemm's SIMD transpose, which x86 builds of torch ship (its header, and the function exported
// from libtorch_cpu): see transpose_into.
#if defined(__x86_64__) && __has_include(<fbgemm/Utils.h>)
#include <fbgemm/Utils.h>
#define ATTNKIT_FBGEMM_TRANSPOSE 1
#endif

namespace attnkit {
namespace cpu {
namespace {

#ifdef CPUBLAS_BRGEMM_F32F32F32
constexpr bool kHaveBrgemm = true;
#else
constexpr bool kHaveBrgemm = false;
#endif

// Units per forward chunk: the LSTM GEMM's tile is (B, 4 * 16), 8 KB at B = 32,
// in L1 for the gate math right after the GEMM. 16 beat 32 and 64 by 4-7%
// (1 thread, CPU time, (32,128,256) and (64,100,512)).
constexpr int64_t kChunk = 16;
// Columns per W_hh panel of the backward's dh GEMM: a contiguous (G H, 64)
// panel stays in L2 while the GEMM walks gp's rows (W_hh's own rows, H apart,
// map a panel onto a few cache sets when H is a power of two).
constexpr int64_t kPanel = 64;
// Past kDhLongK (G H) the dh product runs in K blocks of kDhBlockK, each over all of the thread's
// panels: a whole panel (G H x 64 floats, 1 MB at H = 1024) beside gp's rows overflowed L2 and
// both came from L3 again for every panel. The LSTM backward's time loop at H = 1024, (B, T) =
// (128, 64): 265 -> 205 ms; (16, 64): 35 -> 23; H = 2048 about halved; H <= 768 level (BENCHMARKS.md).
constexpr int64_t kDhLongK = 2048;
constexpr int64_t kDhBlockK = 512;

// G gates a unit: 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n).
struct FusedForward {
  const float* x;          // (T, B, I)
  const float* w_ih;       // packed like w_hh, (I, G * units) per chunk
  const float* w_hh;       // chunk k at G * k * kChunk * H: (H, G * units), gate columns side by side
  const float* bias;       // LSTM b_ih + b_hh (4H), GRU b_ih (3H), or null
  const float* b_hh;       // GRU (3H) or null: inside the reset product
  float* gates;            // (T, B, 4H) saved gates (LSTM activated, GRU r, z, n, hn), or null (not saved)
  float* h_bufs;           // (2, B, H): h_t in slot t % 2
  float* c;                // LSTM (B, H)
  float* out;              // (T, B, H)
  float* cs;               // LSTM (T, B, H) or null
  const int64_t* len;      // (B) or null
  const int64_t* rows;     // (T)
  int64_t T, B, I, H, chunk, block;
  // The bfloat16 forward (rnn_forward_bf16): the GEMMs' operands in bfloat16 instead of x, w_ih, w_hh
  // and h_bufs (which keeps the float h the gate math reads): x (T, B, I); the weights packed as
  // above, then each chunk's (K, G * units) matrix into oneDNN's VNNI layout, rows ldb_low(G * units)
  // apart; h_low (2, B, H), h_t rounded. Null: float operands.
  const at::BFloat16* x_low = nullptr;
  const at::BFloat16* w_ih_low = nullptr;
  const at::BFloat16* w_hh_low = nullptr;
  at::BFloat16* h_low = nullptr;
};

// Row stride of a VNNI-packed chunk: oneDNN's bfloat16 brgemm takes 16, 32, 48 or 64 columns.
inline int64_t ldb_low(int64_t n) { return (n + 15) / 16 * 16; }

struct FusedBackward {
  const float *gates, *grad_output, *w_hh;  // w_hh in kPanel-column panels
  const float *cs, *c0;                     // LSTM
  const float *h0, *output;                 // GRU
  float* grad_pre;                          // (T, B, G H): LSTM d(pre-activations), GRU the recurrent side's
  float* grad_gi;                           // GRU: the input side's (T, B, 3H)
  float *dh, *dc;                           // dc: LSTM
  const int64_t* len;
  const int64_t* rows;
  bool unsorted;
  int64_t T, B, H;
  // The bfloat16 backward's dh product (rnn_backward_bf16): W_hh's panels in the VNNI layout
  // (rows ldb_low(n) apart), and each step's gate gradients rounded, two steps' worth (t % 2).
  // Null: float operands.
  const at::BFloat16* w_hh_low = nullptr;
  at::BFloat16* grad_pre_low = nullptr;
};

#if defined(ATTNKIT_X86_ROW_BUILDS) && defined(CPUBLAS_BRGEMM_F32F32F32)
#define ATTNKIT_HAVE_X86_FUSED 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
namespace avx512 {
#include "rnn_fused_rows.h"
#include "rnn_fused_gru.h"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "rnn_fused_rows.h"
#include "rnn_fused_gru.h"
}  // namespace avx2
#pragma GCC pop_options
#endif
#ifdef CPUBLAS_BRGEMM_F32F32F32
namespace generic {
#include "rnn_fused_rows.h"
#include "rnn_fused_gru.h"
}  // namespace generic
#endif

#ifdef ATTNKIT_HAVE_X86_FUSED
#define ATTNKIT_FUSED(fn) ATTNKIT_PICK_ROWS(fn)
#elif defined(CPUBLAS_BRGEMM_F32F32F32)
#define ATTNKIT_FUSED(fn) (generic::fn)
#else
#define ATTNKIT_FUSED(fn) nullptr  // no brgemm: applies() is false, the teams below never run
#endif

// This thread's number in the team (0 without OpenMP).
int team_thread() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads the team really has: OpenMP may grant fewer than num_threads asked for
// (OMP_DYNAMIC, OMP_THREAD_LIMIT), and the work must still be covered.
int team_granted() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Threads of the team: each needs a few hundred thousand multiply-adds per
// step to be worth a barrier, and at least one chunk (16 units backward).
int team_size(int64_t B, int64_t H, int64_t G, int64_t parts) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;  // called from inside a parallel region: no nested team
#else
  return 1;  // no OpenMP: the parallel region runs once, as thread 0
#endif
  const int64_t by_work = std::max<int64_t>(1, B * G * H * H / (1 << 18));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), by_work, parts})));
}

bool applies(const at::Tensor& t, int64_t B) {
  return kHaveBrgemm && t.scalar_type() == at::kFloat && B > 4;
}

// The backward's dh product on bfloat16 operands needs VNNI pairs along K = G H and the bf16 brgemm.
bool bf16_dh_possible(int64_t K) { return K % 2 == 0 && rnn_forward_bf16_available(); }

// dst[c * ldd + r] = src[r * lds + c] for r < R, c < C, on the calling thread.
void transpose_tile(int64_t R, int64_t C, const float* src, int64_t lds, float* dst, int64_t ldd) {
#ifdef ATTNKIT_FBGEMM_TRANSPOSE
  // fbgemm's 8 x 8 / 16 x 16 register shuffles (AVX2 / AVX-512; it picks by the CPU itself):
  // 2.1-2.4x the scalar blocks below in transpose_into ((8192, 2048): 18.1 -> 8.5 ms, 2 threads).
  fbgemm::transpose_simd<float>(R, C, src, lds, dst, ldd);
#else
  constexpr int64_t kB = 32;  // 32 x 32 blocks: both sides touch whole cache lines
  for (int64_t r0 = 0; r0 < R; r0 += kB) {
    for (int64_t c0 = 0; c0 < C; c0 += kB) {
      for (int64_t c = c0; c < std::min(C, c0 + kB); ++c) {
        for (int64_t r = r0; r < std::min(R, r0 + kB); ++r) dst[c * ldd + r] = src[r * lds + c];
      }
    }
  }
#endif
}

// w (G H, K) -> per chunk of units, the (K, G * units) matrix of its gate columns side by side.
at::Tensor pack_gate_columns(const at::Tensor& w, int64_t H, int64_t G) {
  const int64_t K = w.size(1);
  at::Tensor packed = at::empty({G * H * K}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, (H + kChunk - 1) / kChunk, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t u0 = k0 * kChunk; u0 < std::min(H, k1 * kChunk); u0 += kChunk) {
      const int64_t units = std::min(kChunk, H - u0);
      float* chunk = dst + G * u0 * K;
      const int64_t width = G * units;
      // Gate g's (units, K) rows of w are the chunk's columns g * units ..: transposed 64 columns of
      // w at a time, so that the (64, width) rows of the chunk written stay in L1. (The scalar
      // column stores before took 360-400 us of a 10.8 ms forward at (B, T, H) = (32, 128, 256).)
      for (int64_t c0 = 0; c0 < K; c0 += 64) {
        for (int64_t g = 0; g < G; ++g) {
          transpose_tile(units, std::min<int64_t>(64, K - c0), src + (g * H + u0) * K + c0, K,
                         chunk + c0 * width + g * units, width);
        }
      }
    }
  });
  return packed;
}

#ifdef CPUBLAS_BRGEMM_F32F32F32
// The forward's team: packs W_ih and W_hh (G H rows) by chunk into f, h (h0 in, h_T out) through
// f.h_bufs, splits the chunks, sizes the input-projection blocks, and runs `run(f, k0, k1, xp, gh)` on
// each thread (gh: a (B, G * kChunk) tile of its own when `gh_tile`, else null).
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
// w (G H, K) bfloat16, K even -> per chunk of units, its (K, G * units) matrix of gate columns (as
// pack_gate_columns) in oneDNN's VNNI layout for bfloat16: row pairs (2i, 2i + 1) interleaved,
// element (k, c) at (k / 2) * 2 ldb + 2 c + k % 2, ldb = ldb_low(G * units), columns past G * units
// zero. Written here: ATen's cpublas::pack builds a oneDNN transform on every call, ~0.1 ms a chunk.
at::Tensor pack_gate_columns_low(const at::Tensor& w, int64_t H, int64_t G) {
  const int64_t K = w.size(1), chunks = (H + kChunk - 1) / kChunk;
  // Room for whole chunks: the last one's rows are ldb_low(n) long, up to G * kChunk.
  at::Tensor packed = at::zeros({chunks * G * kChunk * K}, w.options());
  const at::BFloat16* src = w.data_ptr<at::BFloat16>();
  at::BFloat16* dst = packed.data_ptr<at::BFloat16>();
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t chunk = k0; chunk < k1; ++chunk) {
      const int64_t u0 = chunk * kChunk, units = std::min(kChunk, H - u0), ldb = ldb_low(G * units);
      at::BFloat16* out = dst + G * u0 * K;
      // A row pair of the output at a time, written in order; the G * units source rows it reads
      // from (4 bytes each) stay in L1 from one pair to the next. (Column by column, the stores
      // walked the whole 64 KB chunk for every source row: 2 ms of a one-step call at H = 512.)
      for (int64_t k = 0; k < K; k += 2) {
        at::BFloat16* pair_row = out + k * ldb;
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t u = 0; u < units; ++u) {
            std::memcpy(pair_row + 2 * (g * units + u), src + (g * H + u0 + u) * K + k, 2 * sizeof(at::BFloat16));
          }
        }
      }
    }
  });
  return packed;
}

// The backward's float panels (K rows, kPanel columns each, panel p0 at K * p0) in bfloat16, each
// in the VNNI layout of pack_gate_columns_low (rows ldb_low(n) apart; K even).
at::Tensor pack_panels_low(const at::Tensor& panels, int64_t K, int64_t H) {
  // The last panel's rows are ldb_low(n) >= n long: K ldb_low(H) in all (whole panels are 64 wide).
  at::Tensor packed = at::zeros({K * ldb_low(H)}, panels.options().dtype(at::kBFloat16));
  const float* src = panels.data_ptr<float>();
  at::BFloat16* dst = packed.data_ptr<at::BFloat16>();
  for (int64_t p0 = 0; p0 < H; p0 += kPanel) {
    const int64_t n = std::min(kPanel, H - p0), ldb = ldb_low(n);
    const float* panel = src + K * p0;
    at::BFloat16* out = dst + K * p0;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < n; ++c) out[(k / 2) * 2 * ldb + 2 * c + k % 2] = at::BFloat16(panel[k * n + c]);
    }
  }
  return packed;
}
#endif

template <typename Run>
void forward_team(FusedForward f, int64_t G, const at::Tensor& w_ih, const at::Tensor& w_hh, at::Tensor& h,
                  bool gh_tile, Run run, bool low = false) {
  const int64_t T = f.T, B = f.B, H = f.H;
  const int64_t chunks = (H + kChunk - 1) / kChunk;
  at::Tensor w_ih_p, w_hh_p, h_low;
  if (!low) {
    w_ih_p = pack_gate_columns(w_ih, H, G), w_hh_p = pack_gate_columns(w_hh, H, G);
  }
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  if (low) {
    w_ih_p = pack_gate_columns_low(w_ih, H, G), w_hh_p = pack_gate_columns_low(w_hh, H, G);
    f.w_ih_low = w_ih_p.data_ptr<at::BFloat16>();
    f.w_hh_low = w_hh_p.data_ptr<at::BFloat16>();
    h_low = at::empty({2, B, H}, h.options().dtype(at::kBFloat16));
    h_low[0].copy_(h);
    f.h_low = h_low.data_ptr<at::BFloat16>();
  }
#endif
  at::Tensor h_bufs = at::empty({2, B, H}, h.options());
  h_bufs[0].copy_(h);
  const int nt = team_size(B, H, G, chunks);
  const int64_t per_thread = (chunks + nt - 1) / nt;
  f.w_ih = low ? nullptr : w_ih_p.data_ptr<float>();
  f.w_hh = low ? nullptr : w_hh_p.data_ptr<float>();
  f.h_bufs = h_bufs.data_ptr<float>();
  f.chunk = kChunk;
  // Steps per input-projection block: ~512 KB of projections per thread (256 KB measured within noise).
  f.block = std::clamp<int64_t>((128 * 1024) / (B * G * kChunk * per_thread), 1, T);
  const int64_t xp_size = per_thread * f.block * B * G * kChunk, gh_size = gh_tile ? B * G * kChunk : 0;
  at::Tensor xp = at::empty({nt, xp_size + gh_size}, h.options());
#pragma omp parallel num_threads(nt)
  {
    // Slots (chunks and buffer) as planned for nt threads; a smaller team takes several adjacent
    // ones per thread (contiguous chunks, and the slots' buffers hold their projections end to end).
    const int team = team_granted(), tid = team_thread();
    const int64_t v0 = int64_t{tid} * nt / team, v1 = int64_t{tid + 1} * nt / team;
    const int64_t k0 = std::min(chunks, v0 * per_thread), k1 = std::min(chunks, v1 * per_thread);
    float* mine = xp.data_ptr<float>() + v0 * (xp_size + gh_size);
    run(f, k0, k1, mine, gh_tile ? mine + (v1 - v0) * xp_size : nullptr);
    at::native::cpublas::brgemm_release(low);  // bfloat16: the AMX tile state too
  }
  h.copy_(h_bufs[T % 2]);
}

// The backward's team: W_hh (G H, H) into f.w_hh as panels of kPanel columns, whole panels per thread,
// `run(f, u0, u1, tile)` on each (tile: a B x H of its own when lengths are unsorted and `tiles`).
// low: the dh products on bfloat16 operands where bf16_dh_possible.
template <typename Run>
void backward_team(FusedBackward f, int64_t G, const at::Tensor& w_hh, bool tiles, bool low, Run run) {
  const int64_t B = f.B, H = f.H;
  for (int64_t b = 1; b < B && f.len != nullptr; ++b) f.unsorted = f.unsorted || f.len[b] > f.len[b - 1];
  at::Tensor panels = at::empty({G * H * H}, w_hh.options()), panels_low, grad_pre_low;
  for (int64_t p0 = 0; p0 < H; p0 += kPanel) {
    const int64_t n = std::min(kPanel, H - p0);
    panels.narrow(0, G * H * p0, G * H * n).view({G * H, n}).copy_(w_hh.narrow(1, p0, n));
  }
  f.w_hh = panels.data_ptr<float>();
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  if (low && bf16_dh_possible(G * H)) {
    panels_low = pack_panels_low(panels, G * H, H);
    grad_pre_low = at::empty({2 * B * G * H}, w_hh.options().dtype(at::kBFloat16));
    f.w_hh_low = panels_low.data_ptr<at::BFloat16>();
    f.grad_pre_low = grad_pre_low.data_ptr<at::BFloat16>();
  }
#endif
  const int64_t n_panels = (H + kPanel - 1) / kPanel;
  const int nt = team_size(B, H, G, n_panels);
  tiles = tiles && f.unsorted;
  at::Tensor tile_buf = tiles ? at::empty({nt, B * H}, w_hh.options()) : at::Tensor();
#pragma omp parallel num_threads(nt)
  {
    const int team = team_granted(), tid = team_thread();  // team <= nt: OpenMP may grant fewer
    // Whole panels per thread.
    const int64_t u0 = std::min(H, n_panels * tid / team * kPanel);
    const int64_t u1 = std::min(H, n_panels * (tid + 1) / team * kPanel);
    run(f, u0, u1, tiles ? tile_buf.data_ptr<float>() + tid * B * H : nullptr);
    at::native::cpublas::brgemm_release(f.w_hh_low != nullptr);
  }
}
#else
template <typename Run>
void forward_team(FusedForward, int64_t, const at::Tensor&, const at::Tensor&, at::Tensor&, bool, Run) {}
template <typename Run>
void backward_team(FusedBackward, int64_t, const at::Tensor&, bool, bool, Run) {}
#endif

template <typename S>
S* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<S>() : nullptr;
}

}  // namespace

bool lstm_forward_fused(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& w_hh, at::Tensor& h, at::Tensor& c, at::Tensor& output, at::Tensor& gates,
                        const at::Tensor& cs, const at::Tensor& len, const std::vector<int64_t>& rows, bool save) {
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = c.size(1);
  if (!applies(x, B) || I == 0) return false;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  gates = save ? at::empty({T, B, 4 * H}, x.options()) : at::Tensor();
  const FusedForward f{x.data_ptr<float>(), nullptr, nullptr, ptr_or_null<float>(b), nullptr,
                       ptr_or_null<float>(gates), nullptr, c.data_ptr<float>(), output.data_ptr<float>(),
                       ptr_or_null<float>(cs), ptr_or_null<int64_t>(len), rows.data(), T, B, I, H, 0, 0};
  forward_team(f, 4, w_ih, w_hh, h, false, ATTNKIT_FUSED(fused_lstm_forward_thread));
  return true;
}

bool lstm_backward_fused(const at::Tensor& gates, const at::Tensor& cs, const at::Tensor& c0,
                         const at::Tensor& grad_output, const at::Tensor& w_hh, at::Tensor& dh, at::Tensor& dc,
                         at::Tensor& grad_pre, const at::Tensor& len, const std::vector<int64_t>& rows, bool low) {
  const int64_t T = gates.size(0), B = gates.size(1), H = dc.size(1);
  if (!applies(gates, B)) return false;
  const FusedBackward f{gates.data_ptr<float>(), grad_output.data_ptr<float>(), nullptr, cs.data_ptr<float>(),
                        c0.data_ptr<float>(), nullptr, nullptr, grad_pre.data_ptr<float>(), nullptr,
                        dh.data_ptr<float>(), dc.data_ptr<float>(), ptr_or_null<int64_t>(len), rows.data(), false,
                        T, B, H};
  backward_team(f, 4, w_hh, true, low, ATTNKIT_FUSED(fused_lstm_backward_thread));
  return true;
}

bool gru_forward_fused(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                       const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, at::Tensor& h,
                       at::Tensor& output, at::Tensor& gates, const at::Tensor& len, const std::vector<int64_t>& rows,
                       bool save) {
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = h.size(1);
  if (!applies(x, B) || I == 0) return false;
  const at::Tensor bi = b_ih.value_or(at::Tensor()), bh = b_hh.value_or(at::Tensor());
  gates = save ? at::empty({T, B, 4 * H}, x.options()) : at::Tensor();
  const FusedForward f{x.data_ptr<float>(), nullptr, nullptr, ptr_or_null<float>(bi), ptr_or_null<float>(bh),
                       ptr_or_null<float>(gates), nullptr, nullptr, output.data_ptr<float>(), nullptr,
                       ptr_or_null<int64_t>(len), rows.data(), T, B, I, H, 0, 0};
  forward_team(f, 3, w_ih, w_hh, h, true, ATTNKIT_FUSED(fused_gru_forward_thread));
  return true;
}

bool gru_backward_fused(const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& output,
                        const at::Tensor& grad_output, const at::Tensor& w_hh, at::Tensor& dh, at::Tensor& dgi,
                        at::Tensor& dgh, const at::Tensor& len, const std::vector<int64_t>& rows, bool low) {
  const int64_t T = gates.size(0), B = gates.size(1), H = dh.size(1);
  if (!applies(gates, B)) return false;
  const FusedBackward f{gates.data_ptr<float>(), grad_output.data_ptr<float>(), nullptr, nullptr, nullptr,
                        h0.data_ptr<float>(), output.data_ptr<float>(), dgh.data_ptr<float>(), dgi.data_ptr<float>(),
                        dh.data_ptr<float>(), nullptr, ptr_or_null<int64_t>(len), rows.data(), false, T, B, H};
  backward_team(f, 3, w_hh, false, low, ATTNKIT_FUSED(fused_gru_backward_thread));
  return true;
}

bool rnn_forward_bf16_available() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(ATTNKIT_HAVE_X86_FUSED)
  return at::native::cpublas::could_pack(at::kBFloat16) && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

std::vector<at::Tensor> rnn_forward_bf16(int64_t gates, const at::Tensor& x, const at::Tensor& h0,
                                         const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                                         const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                         const c10::optional<at::Tensor>& b_hh,
                                         const c10::optional<at::Tensor>& lengths, bool save) {
  TORCH_CHECK(gates == 3 || gates == 4, "rnn_forward_bf16: gates must be 4 (LSTM) or 3 (GRU), got ", gates);
  TORCH_CHECK(gates == 3 || rnn::present(c0), "rnn_forward_bf16: the LSTM needs c0");
  rnn::check_forward(x, h0, gates == 4 ? &*c0 : nullptr, w_ih, w_hh, b_ih, b_hh, c10::nullopt, lengths, gates);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rnn_forward_bf16: x must be bfloat16, got ", x.scalar_type());
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(ATTNKIT_HAVE_X86_FUSED)
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  // oneDNN's VNNI layout pairs rows of K: an odd input or hidden size is not taken (float32 runs it),
  // nor an empty one (a brgemm of K = 0 throws inside the OpenMP team: std::terminate).
  if (B == 0 || I == 0 || I % 2 != 0 || H % 2 != 0 || !rnn_forward_bf16_available()) return {};
  const std::vector<int64_t> rows = rnn::active_rows(lengths, T, B);
  const auto wide = [](const at::Tensor& t) { return t.to(at::kFloat, false, /*copy=*/true).contiguous(); };
  at::Tensor h = wide(h0), c = gates == 4 ? wide(*c0) : at::Tensor();
  at::Tensor output = at::empty({T, B, H}, x.options().dtype(at::kFloat));
  at::Tensor bias, bias_hh;  // LSTM: b_ih + b_hh; GRU: b_ih and b_hh apart
  if (gates == 4 && (rnn::present(b_ih) || rnn::present(b_hh))) {
    bias = rnn::present(b_ih) && rnn::present(b_hh) ? b_ih->to(at::kFloat) + b_hh->to(at::kFloat)
                                                    : wide(rnn::present(b_ih) ? *b_ih : *b_hh);
  } else if (gates == 3) {
    bias = rnn::present(b_ih) ? wide(*b_ih) : at::Tensor();
    bias_hh = rnn::present(b_hh) ? wide(*b_hh) : at::Tensor();
  }
  // Training: the activated gates (LSTM i f g o, GRU r z n hn) and the LSTM's c_t, as the float32
  // loop saves them, for the float32 backward.
  const at::Tensor saved = save ? at::empty({T, B, 4 * H}, output.options()) : at::Tensor();
  const at::Tensor cs = save && gates == 4 ? at::empty({T, B, H}, output.options()) : at::Tensor();
  FusedForward f{nullptr, nullptr, nullptr, ptr_or_null<float>(bias), ptr_or_null<float>(bias_hh),
                 ptr_or_null<float>(saved), nullptr, gates == 4 ? c.data_ptr<float>() : nullptr,
                 output.data_ptr<float>(), ptr_or_null<float>(cs),
                 rnn::present(lengths) ? lengths->data_ptr<int64_t>() : nullptr, rows.data(), T, B, I, H, 0, 0};
  f.x_low = x.data_ptr<at::BFloat16>();
  const at::Tensor w_ih_c = w_ih.contiguous(), w_hh_c = w_hh.contiguous();
  if (gates == 4) {
    forward_team(f, 4, w_ih_c, w_hh_c, h, false, avx512::fused_lstm_forward_thread, /*low=*/true);
    if (save) return {output.to(at::kBFloat16), h.to(at::kBFloat16), c.to(at::kBFloat16), saved, cs};
    return {output.to(at::kBFloat16), h.to(at::kBFloat16), c.to(at::kBFloat16)};
  }
  forward_team(f, 3, w_ih_c, w_hh_c, h, true, avx512::fused_gru_forward_thread, /*low=*/true);
  if (save) return {output.to(at::kBFloat16), h.to(at::kBFloat16), saved};
  return {output.to(at::kBFloat16), h.to(at::kBFloat16)};
#else
  return {};
#endif
}

at::Tensor mm_tn(const at::Tensor& a, const at::Tensor& b) {
  if (a.size(0) == 1) return a.t() * b;
  if (a.scalar_type() != at::kFloat || !a.is_contiguous() || a.size(0) < kFewRows || a.size(1) < kFewRows ||
      !onednn_linear_available() || gemms_on_aten()) {
    return at::mm(a.t(), b);
  }
  at::Tensor a_t = at::empty({a.size(1), a.size(0)}, a.options());
  transpose_into(a, a_t);
  return onednn_linear(a_t, b.contiguous().t(), c10::nullopt);
}

at::Tensor linear_tiles(const at::Tensor& x, const at::Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  if (!kHaveBrgemm || x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || !x.is_contiguous() ||
      !w.is_contiguous() || M < kLinearTileRows || K == 0 || N == 0 || gemms_on_aten()) {
    return at::Tensor();
  }
  at::Tensor out = at::empty({M, N}, x.options());
#ifdef CPUBLAS_BRGEMM_F32F32F32
  // W^T a panel of kN columns at a time, (K, n) contiguous, transposed by the task that uses it
  // into a buffer of its own (in cache for the tiles after it). Row tiles of kM, the last one
  // through a zero-padded kM-row copy: the brgemm kernels, which oneDNN JIT-compiles per shape and
  // ATen keeps per thread for good, depend on (K, N) only, not on the number of rows (which
  // changes with every sequence length and batch size). Tasks go by blocks of kBlockTiles row
  // tiles (kM kBlockTiles rows of x stay in L2), then panels, then the block's tiles.
  constexpr int64_t kM = 64, kN = 64, kBlockTiles = 4;
  const int64_t panels = (N + kN - 1) / kN, tiles = (M + kM - 1) / kM;
  const int64_t blocks = (tiles + kBlockTiles - 1) / kBlockTiles;
  const float *x_p = x.data_ptr<float>(), *w_p = w.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  at::parallel_for(0, blocks * panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(K * std::min(kN, N)), a_pad, c_pad;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / panels, p = task % panels;
      const int64_t n0 = p * kN, n = std::min(kN, N - n0);
      transpose_tile(n, K, w_p + n0 * K, K, panel.data(), n);
      // c (kM rows, ldc apart) = a (kM rows of K) W^T's panel.
      const auto tile = [&](const float* a, float* c, int64_t ldc) {
        at::native::cpublas::brgemm(kM, n, K, K, n, ldc, false, a, panel.data(), c, false);
      };
      for (int64_t m0 = block * kBlockTiles * kM; m0 < std::min(M, (block + 1) * kBlockTiles * kM); m0 += kM) {
        const int64_t rows = std::min(kM, M - m0);
        if (rows == kM) {
          tile(x_p + m0 * K, out_p + m0 * N + n0, N);
          continue;
        }
        a_pad.assign(kM * K, 0.0f);
        std::copy(x_p + m0 * K, x_p + (m0 + rows) * K, a_pad.data());
        c_pad.resize(kM * n);
        tile(a_pad.data(), c_pad.data(), n);
        for (int64_t r = 0; r < rows; ++r) {
          std::copy(c_pad.data() + r * n, c_pad.data() + (r + 1) * n, out_p + (m0 + r) * N + n0);
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
#endif
  return out;
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (!kHaveBrgemm || a.scalar_type() != at::kFloat || !a.is_contiguous() || !b.is_contiguous() || K == 0 ||
      M * N * K < (1 << 18) || gemms_on_aten()) {
    return at::mm(a, b);
  }
  at::Tensor out = at::empty({M, N}, a.options());
#ifdef CPUBLAS_BRGEMM_F32F32F32
  // K (T B) and A's leading dimension (K) change with every sequence length and batch
  // size, and oneDNN's brgemm JIT-compiles a kernel per (M, N, K, lda, ldb, ldc) that
  // ATen caches per thread and never frees (~0.2 MB kept per new T B). So K runs in
  // blocks of kK, each block of A first copied with rows kK apart, the last block rounded
  // up to a multiple of kKStep with zero columns in A and zero rows in B's panel: the
  // kernels depend on M and N only (kK / kKStep of them at most). Then each task owns a column
  // panel of C; per block it copies that block of B into a contiguous buffer (B's rows are N
  // apart, often 4 KB: a power-of-two stride that maps a panel's rows onto a few cache sets)
  // and runs it against every row tile of A. Each block reads and writes all of C (32 MB at
  // H = 1024): blocks of 1024 pass over it a quarter as often as blocks of 256 did (the
  // [dW_ih | dW_hh] product at (B, T, H) = (128, 64, 1024): 357-374 -> 308-347 ms; (64, 100,
  // 512) 65-68 -> 60-61; (64, 32, 2048) 370-398 -> 343-356; level at (32, 128, 256) and (8, 256, 256)).
  constexpr int64_t kM = 64, kN = 64, kK = 1024, kKStep = 64;
  const int64_t panels = (N + kN - 1) / kN;
  const float *a_p = a.data_ptr<float>(), *b_p = b.data_ptr<float>();
  float* c_p = out.data_ptr<float>();
  std::vector<float> a_block(M * kK);
  for (int64_t k0 = 0; k0 < K; k0 += kK) {
    const int64_t k = std::min(kK, K - k0), k_padded = (k + kKStep - 1) / kKStep * kKStep;
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        std::copy(a_p + r * K + k0, a_p + r * K + k0 + k, a_block.data() + r * kK);
        std::fill(a_block.data() + r * kK + k, a_block.data() + r * kK + k_padded, 0.0f);
      }
    });
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> panel(kK * kN);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * kN, n = std::min(kN, N - n0);
        for (int64_t r = 0; r < k; ++r) std::copy(b_p + (k0 + r) * N + n0, b_p + (k0 + r) * N + n0 + n, panel.data() + r * n);
        std::fill(panel.data() + k * n, panel.data() + k_padded * n, 0.0f);
        for (int64_t m0 = 0; m0 < M; m0 += kM) {
          at::native::cpublas::brgemm(std::min(kM, M - m0), n, k_padded, kK, n, N, k0 > 0, a_block.data() + m0 * kK,
                                      panel.data(), c_p + m0 * N + n0, false);
        }
      }
      at::native::cpublas::brgemm_release(false);
    });
  }
#endif
  return out;
}

at::Tensor workspace(int slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  // Bounded so that a thread never keeps more than 2 x 64 MB after a call: enough for the
  // backward at (T, B, H) = (100, 64, 512) (52 MB of grad_pre); larger calls allocate afresh.
  constexpr int64_t kMaxBytes = int64_t(64) << 20;
  thread_local at::Tensor cache[2];
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  if (slot < 0 || slot > 1 || !opts.device().is_cpu() || bytes > kMaxBytes) return at::empty(sizes, opts);
  at::Tensor& c = cache[slot];
  // Reused only when this thread holds the sole reference (no view from an earlier call is alive).
  if (!c.defined() || c.dtype() != opts.dtype() || c.numel() < numel || c.storage().use_count() != 1 ||
      c.use_count() != 1) {
    c = at::empty({numel}, opts);
  }
  return c.narrow(0, 0, numel).view(sizes);
}

at::Tensor pack_running_rows(const at::Tensor& flat, const std::vector<int64_t>& rows, int64_t B) {
  TORCH_CHECK(flat.is_contiguous() && flat.dim() == 2, "pack_running_rows: flat must be a contiguous 2-D tensor");
  const int64_t C = flat.size(1) * static_cast<int64_t>(flat.element_size());
  char* base = static_cast<char*>(flat.data_ptr());
  int64_t packed = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(rows.size()); ++t) {
    // Each step's block moves down or stays: memmove in increasing t never overwrites a later block.
    if (packed != t * B && rows[t] > 0) std::memmove(base + packed * C, base + t * B * C, rows[t] * C);
    packed += rows[t];
  }
  return flat.narrow(0, 0, packed);
}

at::Tensor unpack_running_rows(const at::Tensor& packed, const std::vector<int64_t>& rows, int64_t B) {
  const int64_t T = static_cast<int64_t>(rows.size()), C = packed.size(1);
  at::Tensor flat = at::empty({T * B, C}, packed.options());
  const int64_t row_bytes = C * static_cast<int64_t>(packed.element_size());
  const char* src = static_cast<const char*>(packed.contiguous().data_ptr());
  char* dst = static_cast<char*>(flat.data_ptr());
  std::vector<int64_t> offset(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) offset[t + 1] = offset[t] + rows[t];
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      // No rows at all run (every length 0): `packed` is empty and src null, which memcpy may not take.
      if (rows[t] > 0) std::memcpy(dst + t * B * row_bytes, src + offset[t] * row_bytes, rows[t] * row_bytes);
      std::memset(dst + (t * B + rows[t]) * row_bytes, 0, (B - rows[t]) * row_bytes);
    }
  });
  return flat;
}

at::Tensor running_inputs_transposed(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                                     const std::vector<int64_t>& rows) {
  const int64_t B = x.size(1), I = x.size(2), P = h0.size(1);
  int64_t N = 0;
  for (const int64_t r : rows) N += r;
  at::Tensor out = workspace(1, {I + P, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attnkit_running_inputs_transposed", [&] {
    using S = scalar_t;
    const S *x_p = x.data_ptr<S>(), *h0_p = h0.data_ptr<S>(), *out_p = output.data_ptr<S>();
    // Source rows of column j: x[t, b] and h_{t-1}[b].
    std::vector<const S*> xs(N), hs(N);
    int64_t j = 0;
    for (int64_t t = 0; t < static_cast<int64_t>(rows.size()); ++t) {
      for (int64_t b = 0; b < rows[t]; ++b, ++j) {
        xs[j] = x_p + (t * B + b) * I;
        hs[j] = t == 0 ? h0_p + b * P : out_p + ((t - 1) * B + b) * P;
      }
    }
    S* d = out.data_ptr<S>();
    constexpr int64_t kB = 32;  // 32 x 32 blocks, as transpose_into
    const int64_t col_blocks = (N + kB - 1) / kB, feature_blocks = (I + P + kB - 1) / kB;
    at::parallel_for(0, col_blocks * feature_blocks, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c0 = (i / col_blocks) * kB, j0 = (i % col_blocks) * kB;
        const int64_t c1 = std::min(I + P, c0 + kB), j1 = std::min(N, j0 + kB);
        for (int64_t c = c0; c < c1; ++c) {
          S* row = d + c * N;
          if (c < I) {
            for (int64_t jj = j0; jj < j1; ++jj) row[jj] = xs[jj][c];
          } else {
            for (int64_t jj = j0; jj < j1; ++jj) row[jj] = hs[jj][c - I];
          }
        }
      }
    });
  });
  return out;
}

void transpose_into(const at::Tensor& src, const at::Tensor& dst) {
  const int64_t R = src.size(0), C = src.size(1);
  if (src.scalar_type() != at::kFloat || dst.scalar_type() != at::kFloat || src.stride(1) != 1 ||
      dst.stride(1) != 1 || R * C < 4096) {
    dst.copy_(src.t());
    return;
  }
  const float* s = src.data_ptr<float>();
  float* d = dst.data_ptr<float>();
  const int64_t lds = src.stride(0), ldd = dst.stride(0);
  // 64 x 64 tiles (16 KB each side) split across the threads.
  constexpr int64_t kTile = 64;
  const int64_t tile_cols = (C + kTile - 1) / kTile;
  at::parallel_for(0, ((R + kTile - 1) / kTile) * tile_cols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = (i / tile_cols) * kTile, c0 = (i % tile_cols) * kTile;
      transpose_tile(std::min(kTile, R - r0), std::min(kTile, C - c0), s + r0 * lds + c0, lds, d + c0 * ldd + r0, ldd);
    }
  });
}

}  // namespace cpu
}  // namespace attnkit
