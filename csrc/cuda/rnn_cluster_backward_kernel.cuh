// The persistent LSTM / GRU backward on a thread-block cluster (see rnn_cluster_backward.cu
// for the scheme), in a header of its own so that tests/cuda_emulation can run the same
// kernel on CPU threads (ATTNKIT_CUDA_EMULATION), with no GPU.
#pragma once

#include <cstdint>

#include "attnkit/gate_math.h"
#include "rnn_cluster_device.cuh"

namespace attnkit {
namespace cuda {
namespace cluster_rnn {

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
// The backward's k split: warps sharing one 16-unit tile of dh (its products run over H's tiles).
__host__ __device__ inline int g_stride(int row_tiles) { return 16 * row_tiles + 8; }
__host__ inline int back_k_split(int k_tiles) { return k_tiles >= kWarps ? 1 : kWarps / k_tiles; }
__host__ inline size_t back_smem_bytes(int cluster, int units, int row_tiles, int k_tiles) {
  return size_t(k_tiles) * row_tiles * 32 * 16 + size_t(kBatchTile) * g_stride(row_tiles) * 2 +
         size_t(back_k_split(k_tiles)) * k_tiles * 16 * kBatchTile * 4 + size_t(2) * cluster * kBatchTile * units * 4;
}

template <typename S, int G>
__global__ void __launch_bounds__(kThreads, 1) rnn_cluster_backward_kernel(BackParams<S> p) {
#if ATTNKIT_CLUSTER_DEVICE_CODE
  cg::cluster_group cluster = cg::this_cluster();
  const int H = p.H, B = p.B, U = p.units, RT = p.row_tiles, KT = p.k_tiles, KS = p.k_split;
  const auto [rank, C, b0, Bc, j0, units, gb, gu, row, j, gate_thread] = cluster_place(cluster, B, H, U);
  const int gs = g_stride(RT);

  ATTNKIT_DYNAMIC_SHARED(uint4, smem_raw);
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

}  // namespace cluster_rnn
}  // namespace cuda
}  // namespace attnkit
