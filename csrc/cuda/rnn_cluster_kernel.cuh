// The persistent LSTM / GRU forward on a thread-block cluster (see rnn_cluster.cu for the
// scheme), in a header of its own so that tests/cuda_emulation can run the same kernel on
// CPU threads (ATTNKIT_CUDA_EMULATION), its PTX emulated, with no GPU.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attnkit/gate_math.h"
#include "rnn_cluster_device.cuh"

namespace attnkit {
namespace cuda {
namespace cluster_rnn {

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
__host__ inline size_t smem_bytes(int row_tiles, int k_tiles, int k_split) {
  return size_t(row_tiles) * k_tiles * 32 * 16 + size_t(2) * kBatchTile * h_stride(k_tiles) * 2 +
         size_t(k_split) * row_tiles * 16 * kBatchTile * 4;
}

// A cluster of C blocks' share of (G gates, hidden size H): units per block, tiles of W_hh
// (RT x KT), k split and shared memory.
struct Split {
  int units = 0, row_tiles = 0, k_tiles = 0, k_split = 0;
  size_t smem = 0;
};

__host__ inline Split split_for(int G, int64_t H, int C) {
  Split s;
  s.units = static_cast<int>((H + C - 1) / C);
  s.row_tiles = (G * s.units + 15) / 16;
  s.k_tiles = static_cast<int>((H + 15) / 16);
  s.k_split = s.row_tiles >= kWarps ? 1 : kWarps / s.row_tiles;
  s.smem = smem_bytes(s.row_tiles, s.k_tiles, s.k_split);
  return s;
}

// Whether that split runs at batch B within smem_limit bytes of shared memory a block: one
// gate thread per (batch row, unit); unless the size is forced, at most one 16-row tile of
// W_hh per warp (eight) below the largest cluster: fewer blocks mean a cheaper barrier and
// fewer remote stores, more rows a longer chain of dependent products per warp.
__host__ inline bool split_fits(const Split& s, int64_t B, int C, size_t smem_limit, bool forced) {
  const bool too_many_rows = !forced && s.row_tiles > kWarps && C < kMaxCluster;
  return std::min<int64_t>(B, kBatchTile) * s.units <= kThreads && s.smem <= smem_limit && !too_many_rows;
}


template <typename S, int G>
__global__ void __launch_bounds__(kThreads, 1) rnn_cluster_kernel(Params<S> p) {
#if ATTNKIT_CLUSTER_DEVICE_CODE
  cg::cluster_group cluster = cg::this_cluster();
  const int H = p.H, B = p.B, U = p.units, RT = p.row_tiles, KT = p.k_tiles, KS = p.k_split;
  const auto [rank, C, b0, Bc, j0, units, gb, gu, row, j, gate_thread] = cluster_place(cluster, B, H, U);
  const int hs = h_stride(KT);

  ATTNKIT_DYNAMIC_SHARED(uint4, smem_raw);
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

}  // namespace cluster_rnn
}  // namespace cuda
}  // namespace attnkit
