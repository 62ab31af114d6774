"""attnkit.nn positional modules: RotaryEmbedding vs Hugging Face's LlamaRotaryEmbedding
and apply_rotary_pos_emb for each scaling, ALiBi slopes vs the published values and
HF BLOOM, the sinusoidal encoding vs the PyTorch tutorial's, learned embeddings."""
import math

import pytest
import torch
from helpers import forced

import attnkit
from attnkit.nn import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding, alibi_slopes

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

HEAD_DIM, MAX_POS = 32, 64
# (our keyword arguments, HF rope_parameters)
SCALINGS = {
    "default": (dict(), dict(rope_type="default")),
    "linear": (dict(scaling="linear", scaling_factor=2.5), dict(rope_type="linear", factor=2.5)),
    "dynamic_ntk": (dict(scaling="dynamic_ntk", scaling_factor=3.0), dict(rope_type="dynamic", factor=3.0)),
    "yarn": (dict(scaling="yarn", scaling_factor=2.0, original_max_position_embeddings=32),
             dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=32)),
    "yarn-mscale": (dict(scaling="yarn", scaling_factor=4.0, original_max_position_embeddings=16, mscale=0.707,
                         mscale_all_dim=1.0, beta_fast=16.0, truncate=False),
                    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.707,
                         mscale_all_dim=1.0, beta_fast=16.0, truncate=False)),
}


def pair(name, base=10000.0):
    ours, theirs = SCALINGS[name]
    config = LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=MAX_POS,
                         rope_parameters=dict(theirs, rope_theta=base))
    return RotaryEmbedding(HEAD_DIM, base=base, max_position_embeddings=MAX_POS, **ours), LlamaRotaryEmbedding(config)


def hf_tables(hf, length):
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("name", list(SCALINGS))
def test_tables_match_hugging_face(name):
    ours, hf = pair(name, base=500000.0 if name == "linear" else 10000.0)
    # dynamic NTK is stateful in HF: grow past max_position_embeddings, stay, shrink back.
    for length in (16, 100, 80, 30, 150, 64):
        cos, sin = ours.cos_sin(length)
        hf_cos, hf_sin = hf_tables(hf, length)
        half = HEAD_DIM // 2
        for table, full in ((cos, hf_cos), (sin, hf_sin)):
            assert table.shape == (length, half)
            torch.testing.assert_close(table, full[:, :half], atol=1e-6, rtol=0)
            torch.testing.assert_close(table, full[:, half:], atol=1e-6, rtol=0)
    assert ours.attention_scaling == pytest.approx(hf.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("name", ["default", "yarn", "dynamic_ntk"])
def test_forward_matches_apply_rotary_pos_emb(name):
    ours, hf = pair(name)
    q, k = torch.randn(2, 4, 9, HEAD_DIM), torch.randn(2, 2, 9, HEAD_DIM)  # HF layout, GQA
    position_ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6, 70, 71]])
    cos, sin = hf(q, position_ids)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    with attnkit.use_backend("reference", op="rotary"):
        q_ours, k_ours = ours(q, k, position_ids=position_ids, layout="bhnd")
    torch.testing.assert_close(q_ours, q_hf, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_ours, k_hf, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["default", "dynamic_ntk"])
def test_negative_position_ids_rotate_backwards_as_hugging_face(name):
    """HF computes every id's angles: -1 is a rotation by -theta (the table lookup wrapped around)."""
    ours, hf = pair(name)
    q = torch.randn(2, 4, 5, HEAD_DIM)
    position_ids = torch.tensor([[-3, -1, 0, 1, 2], [-40, -39, 5, 6, 7]])
    cos, sin = hf(q, position_ids)
    q_hf, _ = apply_rotary_pos_emb(q, q, cos, sin)
    with attnkit.use_backend("reference", op="rotary"):
        q_ours, _ = ours(q, position_ids=position_ids, layout="bhnd")
    torch.testing.assert_close(q_ours, q_hf, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), ("triton", "cpu")])
def test_forward_with_offsets_matches_position_ids(backend, device):
    ours, hf = pair("default")
    q = torch.randn(2, 5, 3, 40)  # (B, N, H, D): head dim 40 > rotary dim 32, the rest passes through
    offsets = torch.tensor([0, 7], dtype=torch.int32)
    positions = torch.arange(5)[None] + offsets.long()[:, None]
    cos, sin = hf(q, positions)
    q_hf, _ = apply_rotary_pos_emb(q[..., :HEAD_DIM], q[..., :HEAD_DIM], cos, sin, unsqueeze_dim=2)
    with forced("rotary", backend, device):
        by_offsets, none = ours(q, seqlen_offset=offsets)
        by_int, _ = ours(q[1:], seqlen_offset=7)
    assert none is None
    torch.testing.assert_close(by_offsets[..., :HEAD_DIM], q_hf, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(by_offsets[..., HEAD_DIM:], q[..., HEAD_DIM:], atol=0, rtol=0)
    torch.testing.assert_close(by_int, by_offsets[1:], atol=0, rtol=0)


@pytest.mark.parametrize("n_q,interleaved", [(6, False), (1, True)])
def test_rotary_op_then_attention_equals_fused_rope(n_q, interleaved):
    # The standalone op and flash_attention(rotary_cos=...) share one convention: the same
    # tables give the same attention (queries sit at the bottom-right positions, as the decode step).
    rope = RotaryEmbedding(16, interleaved=interleaved)
    q, k, v = torch.randn(2, 4, n_q, 24), torch.randn(2, 2, 6, 24), torch.randn(2, 2, 6, 24)
    offsets = torch.tensor([0, 3], dtype=torch.int32)
    cos, sin = rope.cos_sin(16)
    with attnkit.use_backend("reference"):
        fused = attnkit.ops.flash_attention(q, k, v, causal=True, rotary_cos=cos, rotary_sin=sin,
                                            rotary_interleaved=interleaved, rotary_seqlen_offsets=offsets)
        q_rot, _ = rope(q, seqlen_offset=offsets + (6 - n_q), layout="bhnd")
        k_rot, _ = rope(k, seqlen_offset=offsets, layout="bhnd")
        unfused = attnkit.ops.flash_attention(q_rot, k_rot, v, causal=True)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)


def test_tables_are_cached_per_device_and_dtype_and_grown():
    rope = RotaryEmbedding(8)
    cos, _ = rope.cos_sin(10)
    assert rope.cos_sin(4)[0].data_ptr() == cos.data_ptr()  # a view of the cached table
    half, _ = rope.cos_sin(10, dtype=torch.float16)
    assert half.dtype == torch.float16 and len(rope._tables) == 2
    longer, _ = rope.cos_sin(30)
    torch.testing.assert_close(longer[:10], cos, atol=0, rtol=0)


def test_tables_follow_inv_freq_edited_or_replaced_after_a_call():
    """HF's rotary modules read inv_freq at every call; the cached tables went stale."""
    rope = RotaryEmbedding(8)
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=8, num_attention_heads=1))
    q = torch.randn(1, 6, 1, 8)
    first, _ = rope(q)
    with torch.no_grad():
        rope.inv_freq.mul_(2)
        hf.inv_freq.mul_(2)
    cos = hf(q, torch.arange(6)[None])[0][0, :, :4]
    torch.testing.assert_close(rope.cos_sin(6)[0], cos)
    assert not torch.equal(rope(q)[0], first)
    rope.inv_freq = torch.ones(4)
    torch.testing.assert_close(rope.cos_sin(6)[0], torch.arange(6.0)[:, None].cos().expand(6, 4))
    tables = rope._tables[(torch.device("cpu"), torch.float32)]
    rope.cos_sin(6)
    assert rope._tables[(torch.device("cpu"), torch.float32)] is tables  # unchanged inv_freq: kept


def test_tables_survive_half_and_inference_mode():
    rope = RotaryEmbedding(16, scaling="dynamic_ntk", scaling_factor=2.0, max_position_embeddings=8)
    cos, sin = (t.clone() for t in rope.cos_sin(40))
    rope.half()  # rounds the inv_freq buffer; the tables are still made from float32 frequencies
    rope._tables.clear()
    torch.testing.assert_close(rope.cos_sin(40)[0], cos, atol=0, rtol=0)
    with torch.inference_mode():
        rope._tables.clear()
        rope.cos_sin(40)
    q = torch.randn(1, 4, 2, 16, requires_grad=True)
    rope(q)[0].sum().backward()  # would fail on a table made under inference_mode
    assert q.grad is not None


def test_forward_packed_matches_dense():
    rope = RotaryEmbedding(8)
    q = torch.randn(2, 5, 3, 8)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    packed, _ = rope(q.reshape(10, 3, 8), cu_seqlens=cu, max_seqlen=5, seqlen_offset=torch.tensor([0, 4]))
    dense, _ = rope(q, seqlen_offset=torch.tensor([0, 4]))
    torch.testing.assert_close(packed, dense.reshape(10, 3, 8), atol=0, rtol=0)


def test_rotary_embedding_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="scaling must be"):
        RotaryEmbedding(8, scaling="ntk")
    with pytest.raises(ValueError, match="scaling_factor"):
        RotaryEmbedding(8, scaling="linear", scaling_factor=0)
    with pytest.raises(ValueError, match="rotary_dim"):  # head dim 4 < rotary dim 8
        RotaryEmbedding(8)(torch.randn(1, 3, 2, 4))
    q = torch.randn(2, 3, 1, 8)
    for bad in (torch.tensor([[0, 1]]), torch.arange(3).expand(3, 3), torch.zeros(1, 1, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"position_ids must be \(3,\) or \(B or 1, 3\) with B = 2"):
            RotaryEmbedding(8)(q, position_ids=bad)
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        RotaryEmbedding(8)(q, position_ids=torch.zeros(3))


def test_alibi_slopes_published_values():
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    twelve = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve), atol=0, rtol=1e-7)
    assert alibi_slopes(8).dtype == torch.float32


@pytest.mark.parametrize("heads", [1, 3, 5, 8, 12, 16, 20, 24, 40, 64, 96])
def test_alibi_slopes_match_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # BLOOM's bias is slope * key position (B*H, 1, N); at position 1 it is the slope.
    bloom = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(heads), bloom, atol=0, rtol=1e-6)


def test_alibi_module_feeds_flash_attention():
    alibi = ALiBi(4)
    q, k, v = (torch.randn(2, 4, n, 16) for n in (5, 7, 7))
    with attnkit.use_backend("reference", op="flash_attention"):
        out = attnkit.ops.flash_attention(q, k, v, causal=True, alibi_slopes=alibi())
        per_batch = attnkit.ops.flash_attention(q, k, v, causal=True, alibi_slopes=alibi(2))
    causal = torch.ones(5, 7, dtype=torch.bool).tril(diagonal=2)
    bias = alibi.bias(5, 7).masked_fill(~causal, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_batch, out, atol=0, rtol=0)
    assert "slopes" not in alibi.state_dict()
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        attnkit.ops.flash_attention(q, k, v, alibi_slopes=ALiBi(3)())
    with pytest.raises(ValueError, match="n_heads"):
        ALiBi(0)


class TutorialPositionalEncoding(torch.nn.Module):
    """The PyTorch tutorial's PositionalEncoding (transformer_tutorial), the ground truth."""

    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = torch.nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return self.dropout(x + self.pe[: x.size(0)])


def test_sinusoidal_matches_tutorial_and_formula():
    ours, theirs = SinusoidalPositionalEncoding(16, max_len=50, dropout=0.0), TutorialPositionalEncoding(16, 0.0, 50)
    ours.load_state_dict(theirs.state_dict())  # same buffer name and shape
    x = torch.randn(10, 3, 16)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
    pos, i = 7, 3
    assert ours.pe[pos, 0, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert ours.pe[pos, 0, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    batch_first = SinusoidalPositionalEncoding(16, max_len=50, dropout=0.0, batch_first=True)
    torch.testing.assert_close(batch_first(x.transpose(0, 1), offset=0), ours(x).transpose(0, 1))
    torch.testing.assert_close(ours(x[4:], offset=4), ours(x)[4:])
    odd = SinusoidalPositionalEncoding(5, max_len=8, dropout=0.0)
    assert odd.pe[3, 0, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 5)), abs=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        ours(torch.randn(51, 1, 16))
    for offset in (-5, -2, 1.0):
        with pytest.raises(ValueError, match="offset must be an int >= 0"):
            ours(x, offset=offset)
    ours.train()
    torch.manual_seed(0)
    assert (SinusoidalPositionalEncoding(16, dropout=0.5)(torch.ones(4, 2, 16)) == 0).any()


def test_learned_positional_embedding():
    emb = LearnedPositionalEmbedding(10, 4)
    input_ids = torch.zeros(2, 3, dtype=torch.long)
    torch.testing.assert_close(emb(input_ids), emb.weight[:3][None])
    torch.testing.assert_close(emb(input_ids, past_length=5), emb.weight[5:8][None])
    assert list(emb.state_dict()) == ["weight"]
    opt_style = LearnedPositionalEmbedding(10, 4, offset=2)
    assert opt_style.weight.shape == (12, 4)
    torch.testing.assert_close(opt_style(input_ids, position_ids=torch.tensor([[0, 1, 2], [4, 5, 6]])),
                               opt_style.weight[torch.tensor([[2, 3, 4], [6, 7, 8]])])
    with pytest.raises(ValueError, match="num_positions"):
        emb(input_ids, past_length=8)
    with pytest.raises(ValueError, match="past_length must be an int >= 0"):
        emb(input_ids, past_length=-1)
