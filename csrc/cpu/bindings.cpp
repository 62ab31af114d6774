// attnkit._C: the CPU kernels, one pybind function per entry point. Dispatch
// and validation live in Python (attnkit.ops), so these are thin.
#include <torch/extension.h>

#include "attnkit/additive_attention.h"
#include "attnkit/attention.h"
#include "attnkit/attention_decode.h"
#include "attnkit/linear.h"
#include "attnkit/lstm_cell.h"
#include "attnkit/rnn.h"
#include "attnkit/rnn_layernorm.h"
#include "attnkit/rotary.h"
#include "attention_kernel.h"  // flash::bf16_tiles_available
#include "rnn_fused.h"  // rnn_forward_bf16, rnn_backward_bf16

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnkit CPU kernels";
  m.def("lstm_cell_forward", &attnkit::cpu::lstm_cell_forward, "LSTM cell step, forward (CPU)");
  m.def("lstm_cell_backward", &attnkit::cpu::lstm_cell_backward, "LSTM cell step, backward (CPU)");
  m.def("lstm_forward", &attnkit::cpu::lstm_forward, "whole-sequence LSTM layer, forward (CPU)");
  m.def("lstm_backward", &attnkit::cpu::lstm_backward, "whole-sequence LSTM layer, backward (CPU)");
  m.def("gru_forward", &attnkit::cpu::gru_forward, "whole-sequence GRU layer, forward (CPU)");
  m.def("gru_backward", &attnkit::cpu::gru_backward, "whole-sequence GRU layer, backward (CPU)");
  m.def("rnn_forward_bf16_available", &attnkit::cpu::rnn_forward_bf16_available,
        "whether rnn_forward_bf16 can run on this CPU and torch");
  m.def("rnn_forward_bf16", &attnkit::cpu::rnn_forward_bf16,
        "LSTM (gates 4) / GRU (gates 3) layer, bfloat16 forward on bfloat16 brgemm; [] when not taken (CPU)");
  m.def("rnn_backward_bf16", &attnkit::cpu::rnn_backward_bf16,
        "LSTM (gates 4) / GRU (gates 3) layer, bfloat16 backward: float32 time loop, bfloat16 GEMMs; [] when not "
        "taken (CPU)");
  m.def("ln_lstm_forward", &attnkit::cpu::ln_lstm_forward, "layer-normalized LSTM layer with zoneout, forward (CPU)");
  m.def("ln_lstm_backward", &attnkit::cpu::ln_lstm_backward, "layer-normalized LSTM layer, backward (CPU)");
  m.def("ln_gru_forward", &attnkit::cpu::ln_gru_forward, "layer-normalized GRU layer with zoneout, forward (CPU)");
  m.def("ln_gru_backward", &attnkit::cpu::ln_gru_backward, "layer-normalized GRU layer, backward (CPU)");
  m.def("attention_forward", &attnkit::cpu::attention_forward, "flash attention forward, dense or varlen (CPU)");
  m.def("attention_backward", &attnkit::cpu::attention_backward, "flash attention backward, dense or varlen (CPU)");
  m.def("attention_bf16_tiles_available", &attnkit::cpu::flash::bf16_tiles_available,
        "whether the bfloat16 attention forward runs its tile GEMMs in bfloat16 on this CPU and torch");
  m.def("attention_dropout_keep_mask", &attnkit::cpu::attention_dropout_keep_mask,
        "the attention dropout keep mask (B, H, max_q, max_k) the kernels draw (CPU)");
  m.def("rotary_apply", &attnkit::cpu::rotary_apply, "rotary position embedding into out, dense or varlen (CPU)");
  m.def("attention_rotary_forward", &attnkit::cpu::attention_rotary_forward,
        "flash attention forward with fused RoPE on q and k (CPU)");
  m.def("attention_rotary_backward", &attnkit::cpu::attention_rotary_backward,
        "flash attention backward with fused RoPE on q and k (CPU)");
  m.def("additive_attention_forward", &attnkit::cpu::additive_attention_forward,
        "additive (Bahdanau) attention on the projections, forward (CPU)");
  m.def("additive_attention_backward", &attnkit::cpu::additive_attention_backward,
        "additive (Bahdanau) attention on the projections, backward (CPU)");
  m.def("attention_decode_forward", &attnkit::cpu::attention_decode_forward,
        "attention of a few new tokens against a KV cache (CPU)", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("scale"), py::arg("softcap"), py::arg("window_left"),
        py::arg("alibi_slopes"), py::arg("attn_mask") = py::none(), py::arg("key_padding_mask") = py::none());
  m.def("attention_decode_varlen_forward", &attnkit::cpu::attention_decode_varlen_forward,
        "attention of a few new tokens per packed sequence against its keys (CPU)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("scale"), py::arg("softcap"),
        py::arg("window_left"), py::arg("alibi_slopes"));
  m.def("linear_few_rows", &attnkit::cpu::linear_few_rows, "x W^T + b for a few rows of x (CPU, fp32)");
  m.def("num_threads", [] { return at::get_num_threads(); }, "threads at::parallel_for may use");
}
