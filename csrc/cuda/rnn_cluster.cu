// Persistent LSTM / GRU forward (inference, or training's forward saving what
// rnn.cu's per-step backward reads) on thread-block clusters, float16 /
// bfloat16, sm_90+: one cluster for each 8 batch rows (rows never interact, so
// the clusters need not run at the same time). The grid kernel of
// rnn_persistent.cu spreads W_hh over every SM and pays a grid-wide barrier
// (atomics through L2) each step; at H = 128..512 that barrier and the L2 round trips for h and the input
// projections are most of its 3-4 us a step. Here C = 1..16 blocks of one
// cluster share the work:
// - block k keeps its units' rows of W_hh in shared memory, pre-arranged in
//   mma.sync fragment order, and computes W_hh h_(t-1) on tensor cores
//   (m16n8k16: 16 gate rows x 8 batch columns, the batch padded to 8);
// - each block writes its slice of h_t straight into every block's shared
//   memory (distributed shared memory), double-buffered, and the cluster
//   meets at its hardware barrier (arrive.release / wait.acquire), one per
//   step: a block in step t + 1 writes buffer t & 1 of the others only after
//   all of them have passed step t's barrier, i.e. finished reading it;
// - each gate thread owns one (batch row, unit): its cell state stays in a
//   register and the next step's input projections are loaded while this
//   step's product runs.
// Opt-in (ATTNKIT_RNN_CLUSTER=1) until a GPU run has checked and timed it;
// written without one (2026-11-27).
#include "rnn_cluster.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>

#include "attnkit/gate_math.h"
#include "rnn_cluster_device.cuh"

namespace attnkit {
namespace cuda {
namespace cluster_rnn {
namespace {

constexpr int kMaxCluster = 16;

template <typename S>
struct Params {
  const S* w_hh;       // (G H, H)
  const S* pre;        // (T, B, G H); LSTM: both biases folded in, GRU: b_ih
  const S* b_hh;       // GRU: (3 H) or null; LSTM: null
  S* h;                // (2, B, H): h0 in buffer 0; h_T written to buffer T & 1
  float* c;            // LSTM: (B, H) float32, c0 in, c_T out; GRU: null
  S* out;              // (T, B, H)
  const int64_t* len;  // (B,) or null
  S* gates;            // training: (T, B, 4 H) activated LSTM i, f, g, o / GRU r, z, n, hn; else null
  S* cs;               // training, LSTM: (T, B, H) cell states; else null
  int T, B, H;         // B: the whole batch; cluster i takes rows 8 i .. 8 i + 7
  int units;           // U: units per block (the last block may own fewer)
  int row_tiles;       // RT = ceil(G U / 16)
  int k_tiles;         // KT = ceil(H / 16)
  int k_split;         // KS: warps sharing one row tile, each a residue class of k tiles
};

// Shared memory, in this order: W fragments (RT KT tiles of 32 lanes x 16 bytes),
// h (2 buffers x 8 batch rows x hs 16-bit values), partial products (KS x RT 16 x 8 floats).
// hs = 16 KT + 8: the 4-word pad puts the 8 batch rows of a B fragment in distinct banks.
__host__ __device__ inline int h_stride(int k_tiles) { return 16 * k_tiles + 8; }
inline size_t smem_bytes(int row_tiles, int k_tiles, int k_split) {
  return size_t(row_tiles) * k_tiles * 32 * 16 + size_t(2) * kBatchTile * h_stride(k_tiles) * 2 +
         size_t(k_split) * row_tiles * 16 * kBatchTile * 4;
}

template <typename S, int G>
__global__ void __launch_bounds__(kThreads, 1) rnn_cluster_kernel(Params<S> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int C = static_cast<int>(cluster.num_blocks());
  const int b0 = static_cast<int>(blockIdx.x / C) * kBatchTile;  // clusters are consecutive blocks
  const int H = p.H, B = p.B, Bc = min(kBatchTile, B - b0);
  const int U = p.units, RT = p.row_tiles, KT = p.k_tiles, KS = p.k_split;
  const int hs = h_stride(KT);
  const int j0 = rank * U;
  const int units = max(0, min(U, H - j0));

  extern __shared__ uint4 smem_raw[];
  uint4* w_frag = smem_raw;
  uint16_t* h_s = reinterpret_cast<uint16_t*>(w_frag + RT * KT * 32);
  float* part = reinterpret_cast<float*>(h_s + 2 * kBatchTile * hs);

  // W_hh slice in fragment order (A[row r][k]), read along k (coalesced). Slice row
  // r = g U + u is W_hh row g H + j0 + u; rows past G U or the block's units, and k past
  // H, are zero.
  const uint16_t* w_bits = reinterpret_cast<const uint16_t*>(p.w_hh);
  uint16_t* w_halves = reinterpret_cast<uint16_t*>(w_frag);
  for (int i = threadIdx.x; i < RT * 16 * KT * 16; i += kThreads) {
    const int r = i / (KT * 16), k = i % (KT * 16);
    const int g = r / U, u = r % U;
    const uint16_t value = (g < G && u < units && k < H) ? w_bits[(int64_t(g) * H + j0 + u) * H + k] : 0;
    w_halves[a_fragment_half((r / 16) * KT + k / 16, r % 16, k % 16)] = value;
  }
  // h0 into buffer 0; both buffers' padding (rows >= Bc, columns >= H) zero for good.
  const uint16_t* h0_bits = reinterpret_cast<const uint16_t*>(p.h);
  for (int i = threadIdx.x; i < 2 * kBatchTile * hs; i += kThreads) {
    const int buf = i / (kBatchTile * hs), b = (i / hs) % kBatchTile, k = i % hs;
    h_s[i] = (buf == 0 && b < Bc && k < H) ? h0_bits[(b0 + b) * H + k] : uint16_t(0);
  }

  // This thread's (batch row, unit) for the gate math, if any: gb in the cluster's
  // rows (h_s, part), row = b0 + gb in the batch (global memory).
  const int gb = threadIdx.x / U, gu = threadIdx.x % U;
  const bool gate_thread = gb < Bc && gu < units;
  const int j = j0 + gu, row = b0 + gb;
  float c_state = 0.f, bh[3] = {0.f, 0.f, 0.f};
  int64_t len = p.T;
  S pre_next[G];
  if (gate_thread) {
    if (G == 4) c_state = p.c[row * H + j];
    if (G == 3 && p.b_hh != nullptr) {
      for (int g = 0; g < 3; ++g) bh[g] = static_cast<float>(p.b_hh[g * H + j]);
    }
    if (p.len != nullptr) len = p.len[row];
    if (p.T > 0) {
      for (int g = 0; g < G; ++g) pre_next[g] = p.pre[int64_t(row) * G * H + g * H + j];
    }
  }
  // Every block started and initialized before anyone writes into its shared memory.
  cluster.sync();

  for (int t = 0; t < p.T; ++t) {
    const uint16_t* h_cur = h_s + (t & 1) * kBatchTile * hs;
    const int next_offset = ((t + 1) & 1) * kBatchTile * hs;
    S pre_now[G];
    if (gate_thread) {
      for (int g = 0; g < G; ++g) pre_now[g] = pre_next[g];
      if (t + 1 < p.T) {  // issued now, waited for one step later
        const S* pre = p.pre + (int64_t(t + 1) * B + row) * G * H;
        for (int g = 0; g < G; ++g) pre_next[g] = pre[g * H + j];
      }
    }

    // W_hh h_(t-1) for this block's rows.
    tiled_product<S>(w_frag, h_cur, hs, RT, KT, KS, part);
    __syncthreads();  // partial products complete

    if (gate_thread) {
      float gh[G];
      for (int g = 0; g < G; ++g) {
        float v = 0.f;
        for (int ks = 0; ks < KS; ++ks) v += part[(ks * RT * 16 + g * U + gu) * kBatchTile + gb];
        gh[g] = v;
      }
      const uint16_t h_prev_bits = h_cur[gb * hs + j];
      uint16_t h_bits;
      S* out = p.out + (int64_t(t) * B + row) * H + j;
      if (t >= len) {  // stopped: the state stays, the output is 0
        h_bits = h_prev_bits;
        *out = S(0.f);
      } else {
        float h_new;
        if constexpr (G == 4) {
          const auto a = gates::lstm_activate<float>(
              static_cast<float>(pre_now[0]) + gh[0], static_cast<float>(pre_now[1]) + gh[1],
              static_cast<float>(pre_now[2]) + gh[2], static_cast<float>(pre_now[3]) + gh[3]);
          c_state = gates::lstm_cell_state<float>(a, c_state);
          h_new = gates::lstm_hidden_state<float>(a, c_state);
          if (p.gates != nullptr) {  // as rnn.cu's per-step forward saves them, for its backward
            S* saved = p.gates + (int64_t(t) * B + row) * 4 * H + j;
            saved[0] = static_cast<S>(a.i);
            saved[H] = static_cast<S>(a.f);
            saved[2 * H] = static_cast<S>(a.g);
            saved[3 * H] = static_cast<S>(a.o);
          }
        } else {
          const auto a = gates::gru_activate<float>(static_cast<float>(pre_now[0]), static_cast<float>(pre_now[1]),
                                                    static_cast<float>(pre_now[2]), gh[0] + bh[0], gh[1] + bh[1],
                                                    gh[2] + bh[2]);
          h_new = gates::gru_hidden_state<float>(a, float_of<S>(h_prev_bits));
          if (p.gates != nullptr) {
            S* saved = p.gates + (int64_t(t) * B + row) * 4 * H + j;
            saved[0] = static_cast<S>(a.r);
            saved[H] = static_cast<S>(a.z);
            saved[2 * H] = static_cast<S>(a.n);
            saved[3 * H] = static_cast<S>(a.hn);
          }
        }
        // Rounded once: the output and the next step's input are the same value.
        const S h_store = static_cast<S>(h_new);
        *out = h_store;
        h_bits = bits_of(h_store);
      }
      if (G == 4 && p.cs != nullptr) p.cs[(int64_t(t) * B + row) * H + j] = static_cast<S>(c_state);
      for (int r = 0; r < C; ++r) {
        uint16_t* remote = cluster.map_shared_rank(h_s, r);
        remote[next_offset + gb * hs + j] = h_bits;
      }
    }
    // Every block's h_t is in every block's buffer before anyone reads it; also
    // keeps this step's partial products alive until the gate threads are done.
    cluster.sync();
  }

  if (gate_thread) {  // h_T from buffer T & 1 (h0 when T = 0), and c_T
    p.h[(p.T & 1) * B * H + row * H + j] = S(h_s[(p.T & 1) * kBatchTile * hs + gb * hs + j], S::from_bits());
    if (G == 4) p.c[row * H + j] = c_state;
  }
#endif
}

template <typename S, int G>
auto kernel_of() {
  return rnn_cluster_kernel<S, G>;
}

int forced_cluster_size() {
  const char* value = std::getenv("ATTNKIT_RNN_CLUSTER_SIZE");
  return value == nullptr ? 0 : std::atoi(value);
}

// The cluster's work split for (G, B, H), and whether this device takes it.
template <typename S, int G>
Plan make_plan(int64_t B, int64_t H) {
  Plan plan;
  const int device = c10::cuda::current_device();
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  if (prop->major < 9) {
    plan.reason = std::string("the cluster kernel needs sm_90 or newer, the device (") + prop->name + ") is sm_" +
                  std::to_string(prop->major * 10 + prop->minor);
    return plan;
  }
  const auto kernel = kernel_of<S, G>();
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  if (attributes.ptxVersion < 90) {
    plan.reason = "attnkit._C_cuda was built without sm_90 code for the cluster kernel (TORCH_CUDA_ARCH_LIST)";
    return plan;
  }
  // The smallest cluster whose blocks hold at most one 16-row tile of W_hh per warp
  // (eight): fewer blocks mean a cheaper barrier and fewer remote stores, more rows
  // a longer chain of dependent products per warp. ATTNKIT_RNN_CLUSTER_SIZE forces one.
  const int forced = forced_cluster_size();
  for (int C = 1; C <= kMaxCluster; C *= 2) {
    if (forced != 0 && C != forced) continue;
    const int U = static_cast<int>((H + C - 1) / C);
    const int RT = (G * U + 15) / 16, KT = static_cast<int>((H + 15) / 16);
    const int KS = RT >= kWarps ? 1 : kWarps / RT;
    const size_t smem = smem_bytes(RT, KT, KS);
    const bool too_many_rows = forced == 0 && RT > kWarps && C < kMaxCluster;
    if (std::min<int64_t>(B, kBatchTile) * U > kThreads || smem > prop->sharedMemPerBlockOptin || too_many_rows) {
      continue;
    }
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    if (C > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config = cluster_config(C, C, smem, nullptr, attribute);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters < 1) {
      (void)cudaGetLastError();  // a refused size is an answer, not an error to keep
      continue;
    }
    plan.cluster = C;
    plan.units = U;
    plan.row_tiles = RT;
    plan.k_tiles = KT;
    plan.k_split = KS;
    plan.smem = smem;
    plan.clusters_at_once = clusters;
    return plan;
  }
  plan.reason = forced != 0 ? "ATTNKIT_RNN_CLUSTER_SIZE=" + std::to_string(forced) +
                                  " is not a cluster size (1, 2, 4, 8, 16) this device takes for batch " +
                                  std::to_string(B) + ", hidden size " + std::to_string(H)
                            : "no cluster of up to 16 blocks holds W_hh of hidden size " + std::to_string(H) +
                                  " with one gate thread per (batch row, unit) at batch " +
                                  std::to_string(std::min<int64_t>(B, kBatchTile));
  return plan;
}

}  // namespace

Plan plan(int64_t gates, int64_t batch, int64_t hidden, at::ScalarType dtype, at::Device device) {
  Plan refused;
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    refused.reason = std::string("the cluster kernel takes float16 and bfloat16, got ") + c10::toString(dtype);
    return refused;
  }
  if (batch < 1 || batch > INT32_MAX / kBatchTile) {
    refused.reason = "the cluster kernel takes batch >= 1, got " + std::to_string(batch);
    return refused;
  }
  const c10::cuda::CUDAGuard guard(device);
  return with_half(dtype, [&](auto s) {
    using S = decltype(s);
    return gates == 4 ? make_plan<S, 4>(batch, hidden) : make_plan<S, 3>(batch, hidden);
  });
}

bool enabled() {
  const char* value = std::getenv("ATTNKIT_RNN_CLUSTER");
  return value != nullptr && std::string(value) == "1";
}

void launch(int64_t gates, const Plan& plan, const at::Tensor& w_hh, const at::Tensor& pre,
            const c10::optional<at::Tensor>& b_hh, at::Tensor& h, at::Tensor& c, at::Tensor& output,
            const at::Tensor& len, at::Tensor& saved_gates, at::Tensor& saved_cs, int64_t T, int64_t B, int64_t H) {
  with_half(w_hh.scalar_type(), [&](auto s) {
    using S = decltype(s);
    Params<S> p{w_hh.data_ptr<S>(),
                pre.data_ptr<S>(),
                gates == 3 && b_hh.has_value() && b_hh->defined() ? b_hh->data_ptr<S>() : nullptr,
                h.data_ptr<S>(),
                c.defined() ? c.data_ptr<float>() : nullptr,
                output.data_ptr<S>(),
                len.defined() ? len.data_ptr<int64_t>() : nullptr,
                saved_gates.defined() ? saved_gates.data_ptr<S>() : nullptr,
                saved_cs.defined() ? saved_cs.data_ptr<S>() : nullptr,
                static_cast<int>(T),
                static_cast<int>(B),
                static_cast<int>(H),
                plan.units,
                plan.row_tiles,
                plan.k_tiles,
                plan.k_split};
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config =
        cluster_config(plan.cluster, plan.cluster * ((B + kBatchTile - 1) / kBatchTile), plan.smem,
                       at::cuda::getCurrentCUDAStream(), attribute);
    if (gates == 4) {
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel_of<S, 4>(), p));
    } else {
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel_of<S, 3>(), p));
    }
    return 0;
  });
}

}  // namespace cluster_rnn
}  // namespace cuda
}  // namespace attnkit
