// The grid-wide persistent LSTM / GRU forward (see rnn_persistent.cu for the scheme), in a
// header of its own so that tests/cuda_emulation can run the same kernel on CPU threads
// (ATTNKIT_CUDA_EMULATION), with no GPU.
#pragma once

#include <cstdint>

#include "attnkit/gate_math.h"
#include "device_shared.cuh"

namespace attnkit {
namespace cuda {
namespace grid_rnn {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBatch = 8;  // accumulators per lane: one per batch row

template <typename S>
struct Params {
  const S* w_hh;       // (G H, H)
  const S* pre;        // (T, B, G H) input projections; LSTM: both biases folded in, GRU: b_ih
  const S* b_hh;       // GRU: (3 H) or null (b_hn must stay inside r * (W_hn h + b_hn)); LSTM: null
  S* h;                // (2, B, H): h_{t-1} and h_t, double-buffered; buffer 0 holds h0
  float* c;            // LSTM: (B, H) cell state, each entry owned by one thread; GRU: null
  S* out;              // (T, B, H)
  const int64_t* len;  // (B,) on the device, or null
  int T, B, H, U;      // U: units per block
};

// Shared memory: h_(t-1) as float (B H), the block's W_hh h (B G U), its W_hh rows (G U H).
template <typename S>
__host__ inline size_t smem_bytes(int G, int64_t B, int64_t H, int64_t units) {
  return sizeof(float) * (B * H + B * G * units) + sizeof(S) * G * units * H;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename S, int G>
__global__ void __launch_bounds__(kThreads) rnn_persistent_kernel(Params<S> p) {
  cg::grid_group grid = cg::this_grid();
  const int H = p.H, B = p.B, U = p.U, GU = G * p.U;
  const int j0 = blockIdx.x * U;
  const int units = min(U, H - j0);  // the last block may own fewer than U units
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Shared memory: h_{t-1} as float (B H), this block's W_hh h (B G U), its W_hh rows (G U H).
  ATTNKIT_DYNAMIC_SHARED(float4, smem_raw);
  float* h_s = reinterpret_cast<float*>(smem_raw);
  float* gh_s = h_s + B * H;
  S* w_s = reinterpret_cast<S*>(gh_s + B * GU);

  // Row (g, u) of the slice is W_hh row g H + j0 + u; rows u >= units are never read.
  for (int i = threadIdx.x; i < G * units * H; i += kThreads) {
    const int g = i / (units * H), u = (i / H) % units, k = i % H;
    w_s[(g * U + u) * H + k] = p.w_hh[(int64_t(g) * H + j0 + u) * H + k];
  }

  // A block owns at most kMaxBatch x ceil(H / SMs) (batch row, unit) pairs, fewer than
  // kThreads at any H that fits on chip: one gate thread each, whose input projections
  // are loaded before the product, off the step's critical path.
  const int gate_b = threadIdx.x / max(units, 1), gate_u = threadIdx.x % max(units, 1);
  const bool gate_thread = threadIdx.x < B * units;
  for (int t = 0; t < p.T; ++t) {
    const S* h_prev = p.h + (t & 1) * B * H;
    S* h_next = p.h + ((t + 1) & 1) * B * H;
    float pre_now[G];
    if (gate_thread) {
      const S* pre = p.pre + (int64_t(t) * B + gate_b) * G * H + j0 + gate_u;
#pragma unroll
      for (int g = 0; g < G; ++g) pre_now[g] = static_cast<float>(pre[g * H]);
    }
    for (int i = threadIdx.x; i < B * H; i += kThreads) h_s[i] = static_cast<float>(h_prev[i]);
    __syncthreads();  // h_s complete (and, at t = 0, w_s loaded)

    // W_hh h_{t-1} for this block's rows: one warp per row, all batch rows at once.
    // The loop bounds depend on the warp only, so whole warps reach warp_sum.
    for (int r = warp; r < GU; r += kWarps) {
      if (r % U >= units) continue;
      const S* w_row = w_s + r * H;
      float acc[kMaxBatch] = {};
      for (int k = lane; k < H; k += 32) {
        const float w = static_cast<float>(w_row[k]);
#pragma unroll
        for (int b = 0; b < kMaxBatch; ++b) {
          if (b < B) acc[b] += w * h_s[b * H + k];
        }
      }
#pragma unroll
      for (int b = 0; b < kMaxBatch; ++b) {
        if (b < B) {
          const float v = warp_sum(acc[b]);
          if (lane == 0) gh_s[b * GU + r] = v;
        }
      }
    }
    __syncthreads();  // gh_s complete

    // Gate math, one thread per (batch row, unit); as rnn.cu's per-step kernels.
    if (gate_thread) {
      const int b = gate_b, u = gate_u, j = j0 + u, o = b * H + j;
      S* out = p.out + int64_t(t) * B * H;
      const float* gh = gh_s + b * GU;
      if (p.len != nullptr && t >= p.len[b]) {  // stopped: keep the state (c untouched), output 0
        h_next[o] = h_prev[o];
        out[o] = S(0);
      } else {
        float h_new;
        if constexpr (G == 4) {
          const auto a = gates::lstm_activate<float>(pre_now[0] + gh[u], pre_now[1] + gh[U + u],
                                                     pre_now[2] + gh[2 * U + u], pre_now[3] + gh[3 * U + u]);
          const float c_new = gates::lstm_cell_state<float>(a, p.c[o]);
          p.c[o] = c_new;
          h_new = gates::lstm_hidden_state<float>(a, c_new);
        } else {
          float bh[3] = {0.f, 0.f, 0.f};
          if (p.b_hh != nullptr) {
            for (int g = 0; g < 3; ++g) bh[g] = static_cast<float>(p.b_hh[g * H + j]);
          }
          const auto a = gates::gru_activate<float>(pre_now[0], pre_now[1], pre_now[2], gh[u] + bh[0],
                                                    gh[U + u] + bh[1], gh[2 * U + u] + bh[2]);
          h_new = gates::gru_hidden_state<float>(a, h_s[o]);
        }
        // Rounded once: the output and the next step's input are the same value.
        const S h_store = static_cast<S>(h_new);
        h_next[o] = h_store;
        out[o] = h_store;
      }
    }
    // Every block's h_t written (and visible) before anyone reads it; also
    // keeps h_s / gh_s of this step alive until the whole block is done.
    if (t + 1 < p.T) grid.sync();
  }
}

}  // namespace grid_rnn
}  // namespace cuda
}  // namespace attnkit
