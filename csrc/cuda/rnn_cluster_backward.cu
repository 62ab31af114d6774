// Persistent LSTM / GRU backward on thread-block clusters (float16 / bfloat16,
// sm_90+, opt-in ATTNKIT_RNN_CLUSTER=1): the reverse time loop of rnn.cu's
// per-step backward in one launch, on the forward's split (rnn_cluster.cu): one
// cluster for each 8 batch rows, block k owning units [k U, k U + U).
// Each step, walking t down:
// - each gate thread (batch row, unit) adds the step's output gradient to the
//   carried dh, applies the gate backward of attnkit/gate_math.h to the saved
//   gates (LSTM: and cell states; its dc stays in a register) and writes the
//   pre-activation gradients for the weight-gradient GEMMs after the loop;
// - the block multiplies its own gate rows' gradients by its rows of W_hh,
//   transposed (held in shared memory in mma.sync fragment order): a partial
//   dh_(t-1) over all H units, whose slices it writes into their owners'
//   shared memory (one slot per sending block, double-buffered);
// - one cluster barrier; the next step's owners sum their C slots.
// A stopped row (t >= length) passes dh (and dc) through with zero gradients.
// Written without a GPU (2026-11-27): opt-in until a GPU run has checked it.
#include "attnkit/rnn_persistent.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "attnkit/gate_math.h"
#include "attnkit/rnn_sequence.h"
#include "rnn_cluster.h"
#include "rnn_cluster_device.cuh"

namespace attnkit {
namespace cuda {
namespace cluster_rnn {
namespace {

template <typename S>
struct BackParams {
  const S* w_hh;      // (G H, H)
  const S* gates;     // (T, B, 4 H) saved by the forward
  const S* cs;        // LSTM: (T, B, H) cell states; GRU: null
  const S* c0;        // LSTM: (B, H); GRU: null
  const S* h0;        // GRU: (B, H), h_(-1); LSTM: null
  const S* output;    // GRU: (T, B, H), h_(t-1) = output[t - 1] while running; LSTM: null
  const S* grad_out;  // (T, B, H)
  const S* grad_hn;   // (B, H)
  const S* grad_cn;   // LSTM: (B, H); GRU: null
  const int64_t* len;  // (B,) or null
  S* dpre;            // LSTM: (T, B, 4 H) gate pre-activation gradients; GRU: dgi (T, B, 3 H)
  S* dgh;             // GRU: (T, B, 3 H) recurrent-side gradients (r, z, r * n's); LSTM: null
  S* dh0;             // (B, H)
  S* dc0;             // LSTM: (B, H); GRU: null
  int T, B, H, units, row_tiles, k_tiles, k_split;  // k_split: warps sharing one 16-unit tile of dh
};

// Shared memory: W_hh^T fragments (KT x RT tiles of 32 lanes x 16 bytes), the gate
// gradients as the product's B operand (8 batch rows x gs 16-bit values, gs = 16 RT + 8),
// partial products (KS x 16 KT x 8 floats), slots (2 buffers x C senders x 8 rows x U floats).
__host__ __device__ inline int g_stride(int row_tiles) { return 16 * row_tiles + 8; }
size_t back_smem_bytes(const Plan& plan) {
  const int KS = plan.k_tiles >= kWarps ? 1 : kWarps / plan.k_tiles;
  return size_t(plan.k_tiles) * plan.row_tiles * 32 * 16 + size_t(kBatchTile) * g_stride(plan.row_tiles) * 2 +
         size_t(KS) * plan.k_tiles * 16 * kBatchTile * 4 + size_t(2) * plan.cluster * kBatchTile * plan.units * 4;
}

template <typename S, int G>
__global__ void __launch_bounds__(kThreads, 1) rnn_cluster_backward_kernel(BackParams<S> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int C = static_cast<int>(cluster.num_blocks());
  const int b0 = static_cast<int>(blockIdx.x / C) * kBatchTile;
  const int H = p.H, B = p.B, Bc = min(kBatchTile, B - b0);
  const int U = p.units, RT = p.row_tiles, KT = p.k_tiles, KS = p.k_split;
  const int gs = g_stride(RT);
  const int j0 = rank * U;
  const int units = max(0, min(U, H - j0));

  extern __shared__ uint4 smem_raw[];
  uint4* wt_frag = smem_raw;
  uint16_t* dg_s = reinterpret_cast<uint16_t*>(wt_frag + KT * RT * 32);
  float* part = reinterpret_cast<float*>(dg_s + kBatchTile * gs);
  float* slots = part + KS * KT * 16 * kBatchTile;

  // A = W_slice^T: A[m = unit j][k = slice row r] = W_hh[g H + j0 + u][j] for r = g U + u.
  // Read along j (coalesced); rows past H and slice rows past G U or the units are zero.
  const uint16_t* w_bits = reinterpret_cast<const uint16_t*>(p.w_hh);
  uint16_t* wt_halves = reinterpret_cast<uint16_t*>(wt_frag);
  for (int i = threadIdx.x; i < RT * 16 * KT * 16; i += kThreads) {
    const int r = i / (KT * 16), m = i % (KT * 16);
    const int g = r / U, u = r % U;
    const uint16_t value = (g < G && u < units && m < H) ? w_bits[(int64_t(g) * H + j0 + u) * H + m] : 0;
    wt_halves[a_fragment_half((m / 16) * RT + r / 16, m % 16, r % 16)] = value;
  }
  for (int i = threadIdx.x; i < kBatchTile * gs; i += kThreads) dg_s[i] = 0;  // padding stays zero

  const int gb = threadIdx.x / U, gu = threadIdx.x % U;
  const bool gate_thread = gb < Bc && gu < units;
  const int j = j0 + gu, row = b0 + gb;
  float carry = 0.f, dc = 0.f;  // dh_t less what the slots bring; dc_t
  int64_t len = p.T;
  if (gate_thread) {
    carry = static_cast<float>(p.grad_hn[row * H + j]);
    if (G == 4) dc = static_cast<float>(p.grad_cn[row * H + j]);
    if (p.len != nullptr) len = p.len[row];
  }
  cluster.sync();  // every block started and initialized before anyone writes its slots

  for (int s = 0; s < p.T; ++s) {
    const int t = p.T - 1 - s;
    if (gate_thread) {
      float dh = carry;
      if (s > 0) {
        const float* in = slots + ((s - 1) & 1) * C * kBatchTile * U + gb * U + gu;
        for (int r = 0; r < C; ++r) dh += in[r * kBatchTile * U];
      }
      float dg[G] = {};
      if (t >= len) {  // stopped: dh and dc pass through, the gradients are 0
        carry = dh;
      } else {
        dh += static_cast<float>(p.grad_out[(int64_t(t) * B + row) * H + j]);
        const S* saved = p.gates + (int64_t(t) * B + row) * 4 * H + j;
        if constexpr (G == 4) {
          const gates::LstmGates<float> a{static_cast<float>(saved[0]), static_cast<float>(saved[H]),
                                          static_cast<float>(saved[2 * H]), static_cast<float>(saved[3 * H])};
          const float c_prev = static_cast<float>(t > 0 ? p.cs[(int64_t(t - 1) * B + row) * H + j] : p.c0[row * H + j]);
          const float c_new = static_cast<float>(p.cs[(int64_t(t) * B + row) * H + j]);
          const auto d = gates::lstm_backward<float>(a, c_prev, c_new, dh, dc);
          dg[0] = d.pre_i, dg[1] = d.pre_f, dg[2] = d.pre_g, dg[3] = d.pre_o;
          dc = d.c_prev;
          carry = 0.f;  // all of dh_(t-1) comes through W_hh
        } else {
          const gates::GruGates<float> a{static_cast<float>(saved[0]), static_cast<float>(saved[H]),
                                         static_cast<float>(saved[2 * H]), static_cast<float>(saved[3 * H])};
          const float h_prev =
              static_cast<float>(t > 0 ? p.output[(int64_t(t - 1) * B + row) * H + j] : p.h0[row * H + j]);
          const auto d = gates::gru_backward<float>(a, h_prev, dh);
          S* dgi = p.dpre + (int64_t(t) * B + row) * 3 * H + j;
          dgi[0] = static_cast<S>(d.gi_r);
          dgi[H] = static_cast<S>(d.gi_z);
          dgi[2 * H] = static_cast<S>(d.gi_n);
          dg[0] = d.gi_r, dg[1] = d.gi_z, dg[2] = d.gh_n;
          carry = d.h_prev;  // the part of dh_(t-1) through z
        }
      }
      // The recurrent side's gradients: to global memory (weight gradients) and, rounded
      // the same way, the product's B operand.
      S* out = G == 4 ? p.dpre + (int64_t(t) * B + row) * 4 * H + j : p.dgh + (int64_t(t) * B + row) * 3 * H + j;
      if (G == 3 && t >= len) {
        S* dgi = p.dpre + (int64_t(t) * B + row) * 3 * H + j;
        dgi[0] = dgi[H] = dgi[2 * H] = S(0.f);
      }
      for (int g = 0; g < G; ++g) {
        const S v = static_cast<S>(dg[g]);
        out[g * H] = v;
        dg_s[gb * gs + g * U + gu] = bits_of(v);
      }
    }
    __syncthreads();  // the B operand complete

    // Partial dh_(t-1) = W_slice^T dg for all H units.
    tiled_product<S>(wt_frag, dg_s, gs, KT, RT, KS, part);
    __syncthreads();  // partial products complete

    // Each unit's partial to its owner's slot from this block (rank); consecutive threads
    // take consecutive units, so the remote stores to one owner are contiguous.
    const int out_offset = (s & 1) * C * kBatchTile * U + rank * kBatchTile * U;
    for (int i = threadIdx.x; i < H * Bc; i += kThreads) {
      const int n = i / H, m = i % H;
      float v = 0.f;
      for (int ks = 0; ks < KS; ++ks) v += part[(ks * KT * 16 + m) * kBatchTile + n];
      float* owner = cluster.map_shared_rank(slots, m / U);
      owner[out_offset + n * U + m % U] = v;
    }
    cluster.sync();  // slots delivered; the B operand and partials free again
  }

  if (gate_thread) {
    float dh = carry;
    if (p.T > 0) {
      const float* in = slots + ((p.T - 1) & 1) * C * kBatchTile * U + gb * U + gu;
      for (int r = 0; r < C; ++r) dh += in[r * kBatchTile * U];
    }
    p.dh0[row * H + j] = static_cast<S>(dh);
    if (G == 4) p.dc0[row * H + j] = static_cast<S>(dc);
  }
#endif
}

// The forward's split, if the backward's shared memory also fits and its clusters can run.
template <typename S, int G>
Plan back_plan(int64_t B, int64_t H, at::ScalarType dtype, at::Device device) {
  Plan plan = cluster_rnn::plan(G, B, H, dtype, device);
  if (!plan.reason.empty()) return plan;
  const auto kernel = rnn_cluster_backward_kernel<S, G>;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  plan.smem = back_smem_bytes(plan);
  if (plan.smem > prop->sharedMemPerBlockOptin) {
    plan.reason = "the backward's shared memory (" + std::to_string(plan.smem) + " bytes) does not fit";
    return plan;
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem)));
  if (plan.cluster > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  plan.k_split = plan.k_tiles >= kWarps ? 1 : kWarps / plan.k_tiles;
  return plan;
}

template <int G>
std::vector<at::Tensor> run_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                     const c10::optional<at::Tensor>& grad_cn, const at::Tensor& x,
                                     const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                     const at::Tensor& gates, const c10::optional<at::Tensor>& cs) {
  TORCH_CHECK(x.is_cuda(), "attnkit cluster rnn backward: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  // The per-step backward's checks (rnn_sequence.h): shapes, dtypes, devices, contiguity.
  rnn::check_forward(x, h0, G == 4 ? &*c0 : nullptr, w_ih, w_hh, c10::nullopt, c10::nullopt, c10::nullopt, lengths, G);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  rnn::check_grad(grad_output, "grad_output", x, {T, B, H});
  rnn::check_grad(grad_hn, "grad_hn", x, {B, H});
  rnn::check_grad(output, "output", x, {T, B, H});
  rnn::check_grad(gates, "gates", x, {T, B, 4 * H});
  if (G == 4) {
    rnn::check_grad(*grad_cn, "grad_cn", x, {B, H});
    rnn::check_grad(*cs, "cs", x, {T, B, H});
  }
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return {};
  if (T == 0 || B == 0 || B * H > INT32_MAX || T > INT32_MAX) return {};
  Plan plan = with_half(x.scalar_type(), [&](auto s) { return back_plan<decltype(s), G>(B, H, x.scalar_type(), x.device()); });
  if (!plan.reason.empty()) return {};

  const at::Tensor &go = grad_output, &gn = grad_hn, &g = gates, &out_c = output, &h0_c = h0;  // contiguous (checked)
  const at::Tensor gcn = G == 4 ? *grad_cn : at::Tensor();
  const at::Tensor cs_c = G == 4 ? *cs : at::Tensor(), c0_c = G == 4 ? *c0 : at::Tensor();
  const at::Tensor len = rnn::present(lengths) ? lengths->to(x.device()) : at::Tensor();
  at::Tensor dpre = at::empty({T, B, (G == 4 ? 4 : 3) * H}, x.options());
  at::Tensor dgh = G == 3 ? at::empty({T, B, 3 * H}, x.options()) : at::Tensor();
  at::Tensor dh0 = at::empty({B, H}, x.options());
  at::Tensor dc0 = G == 4 ? at::empty({B, H}, x.options()) : at::Tensor();

  with_half(x.scalar_type(), [&](auto s) {
    using S = decltype(s);
    const auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<S>() : nullptr; };
    BackParams<S> p{w_hh.data_ptr<S>(), g.data_ptr<S>(), data(cs_c), data(c0_c), G == 3 ? h0_c.data_ptr<S>() : nullptr,
                    G == 3 ? out_c.data_ptr<S>() : nullptr, go.data_ptr<S>(), gn.data_ptr<S>(), data(gcn),
                    len.defined() ? len.data_ptr<int64_t>() : nullptr, dpre.data_ptr<S>(), data(dgh),
                    dh0.data_ptr<S>(), data(dc0), static_cast<int>(T), static_cast<int>(B), static_cast<int>(H),
                    plan.units, plan.row_tiles, plan.k_tiles, plan.k_split};
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config =
        cluster_config(plan.cluster, plan.cluster * ((B + kBatchTile - 1) / kBatchTile), plan.smem,
                       at::cuda::getCurrentCUDAStream(), attribute);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, rnn_cluster_backward_kernel<S, G>, p));
    return 0;
  });

  // The weight gradients and dx from the whole sequence's gate gradients, as rnn_sequence.h
  // does: h_(t-1) = h0, output[0], ..., output[T - 2] (a stopped row's gradients are 0).
  const at::Tensor x2 = x.reshape({T * B, I});
  const at::Tensor h_prev = at::cat({h0_c.unsqueeze(0), out_c.narrow(0, 0, T - 1)}, 0).view({T * B, H});
  const at::Tensor dgi2 = dpre.view({T * B, -1}), dgh2 = G == 4 ? dgi2 : dgh.view({T * B, 3 * H});
  at::Tensor dx = at::mm(dgi2, w_ih).view({T, B, I});
  at::Tensor dw_ih = at::mm(dgi2.t(), x2), dw_hh = at::mm(dgh2.t(), h_prev);
  if (G == 4) return {dx, dh0, dc0, dw_ih, dw_hh, dgi2.sum(0)};
  return {dx, dh0, dw_ih, dw_hh, dgi2.sum(0), dgh2.sum(0)};
}

}  // namespace
}  // namespace cluster_rnn

std::vector<at::Tensor> lstm_backward_cluster(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                              const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                              const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                              const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                              const at::Tensor& gates, const at::Tensor& cs) {
  return cluster_rnn::run_backward<4>(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, lengths, output, gates, cs);
}

std::vector<at::Tensor> gru_backward_cluster(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                             const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                             const at::Tensor& w_hh, const c10::optional<at::Tensor>& lengths,
                                             const at::Tensor& output, const at::Tensor& gates) {
  return cluster_rnn::run_backward<3>(grad_output, grad_hn, c10::nullopt, x, h0, c10::nullopt, w_ih, w_hh, lengths,
                                      output, gates, c10::nullopt);
}

}  // namespace cuda
}  // namespace attnkit
