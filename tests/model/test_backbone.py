"""Single-process properties of the GLM backbone: the mask leaks nothing, DeepNorm and RoPE follow
their formulas, and the model learns."""

from __future__ import annotations

import math

import pytest
import torch

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from moe_morpheus.model import build_model
from moe_morpheus.model.layer import GLMLayer
from moe_morpheus.model.rope import apply_rope
from moe_morpheus.parallel import initialize
from tests.helpers.presets import TINY_GLM
from tests.helpers.synthetic import micro_batches


@pytest.fixture(scope="module", autouse=True)
def single_process():
    initialize(ParallelConfig())


def build(**overrides):
    cfg = ModelConfig(**dict(TINY_GLM, **overrides))
    return build_model(cfg, None, ParallelConfig(), seed=11)[0], cfg


def logits(model, batch):
    inputs = {k: batch[k] for k in ("tokens", "position_ids", "block_position_ids", "segment_ids", "prefix_mask")}
    return model(**inputs, gmask=batch["gmask"])


def test_mask_leaks_nothing():
    model, cfg = build()
    model.eval()
    batch = micro_batches(1, 1, cfg.seq_length, cfg.vocab_size, seed=5)[0]
    base = logits(model, batch)[0]
    seg, prefix = batch["segment_ids"][0], batch["prefix_mask"][0]
    first = (seg == 1).nonzero().flatten()
    part_b = first[prefix[first] == 0]
    changed_at = int(part_b[len(part_b) // 2])

    # A Part-B token changes no Part-A output and no earlier Part-B output of its segment.
    edited = {k: v.clone() for k, v in batch.items()}
    edited["tokens"][0, changed_at] = (edited["tokens"][0, changed_at] + 1) % cfg.vocab_size
    out = logits(model, edited)[0]
    unaffected = torch.cat([first[prefix[first] == 1], part_b[part_b < changed_at]])
    assert torch.equal(out[unaffected], base[unaffected])
    assert not torch.allclose(out[changed_at], base[changed_at])

    # Changing every token of segment 2 changes no output of segment 1.
    second = (seg == 2).nonzero().flatten()
    edited = {k: v.clone() for k, v in batch.items()}
    edited["tokens"][0, second] = (edited["tokens"][0, second] + 7) % cfg.vocab_size
    out = logits(model, edited)[0]
    assert torch.equal(out[first], base[first])
    assert not torch.allclose(out[second], base[second])


@pytest.mark.parametrize("norm,alpha,beta", [
    ("deepnorm", lambda n: (2 * n) ** 0.5, lambda n: (2 * n) ** -0.5),
    ("deepnet", lambda n: (2 * n) ** 0.25, lambda n: (8 * n) ** -0.25),
])
def test_deepnorm_residual_and_init_scale(norm, alpha, beta):
    layers = 24
    cfg = ModelConfig(num_layers=layers, hidden_size=256, num_attention_heads=4, norm=norm)
    assert cfg.residual_alpha == pytest.approx(alpha(layers))
    from moe_morpheus.model.glm import megatron_config

    layer = GLMLayer(megatron_config(cfg, ParallelConfig(), torch.float32), cfg, None, 0)

    # Xavier normal std = gain * sqrt(2 / (fan_in + fan_out)); 256 x 704 = 180k samples: the
    # sample std is within 1% of the target with overwhelming probability.
    def xavier(weight, gain):
        return gain * math.sqrt(2.0 / sum(weight.shape))

    ffn_w = layer.ffn.value.weight
    assert ffn_w.std().item() == pytest.approx(xavier(ffn_w, beta(layers)), rel=0.02)
    assert layer.ffn.fc2.weight.std().item() == pytest.approx(xavier(layer.ffn.fc2.weight, beta(layers)), rel=0.02)
    assert layer.attention.out.weight.std().item() == pytest.approx(beta(layers) * math.sqrt(1 / 256), rel=0.02)
    qkv = layer.attention.qkv.weight.view(4, 3, 64, 256)
    assert qkv[:, 0].std().item() == pytest.approx(math.sqrt(1 / 256), rel=0.02)  # queries: gain 1
    assert qkv[:, 2].std().item() == pytest.approx(beta(layers) * math.sqrt(1 / 256), rel=0.02)  # values

    # GLM-130B's post-LN residual: x_out = alpha * LN(x) + F(LN(x)) for each sub-layer. With both
    # sub-layers returning a constant c the output is alpha * LN(alpha * LN(x) + c) + c.
    const = torch.randn(256)
    layer.attention.forward = lambda x, *args, **kwargs: const.expand_as(x)
    layer.ffn.forward = lambda x: const.expand_as(x)
    x = torch.randn(5, 2, 256)

    def ln(t):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)

    expected = alpha(layers) * ln(alpha(layers) * ln(x) + const) + const
    torch.testing.assert_close(layer(x, None, None, None), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["pre_ln", "deepnorm", "deepnet"])
@pytest.mark.parametrize("granularity", [1, 2])
def test_experts_start_at_the_dense_ffn_scale(norm, granularity):
    """MoE in every second layer: each expert matrix is drawn with the std of the dense FFN
    matrix of the same role in the next layer (measured on those weights, not from the formula):
    a MoE arm that started larger trains behind dense, which a comparison must not mistake for an
    effect of experts. Under pre-LN the experts once drew Xavier gain 1, 8.8x the dense std here."""
    cfg = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=256, norm=norm)
    moe = MoEConfig(layer_freq=2, num_experts=8, top_k=2, granularity=granularity)
    model = build_model(cfg, moe, ParallelConfig(), seed=3)[0]
    experts, dense = model.layers[1].ffn.moe.experts, model.layers[0].ffn
    assert experts.d_hidden * granularity == cfg.ffn_hidden
    # >= 131k samples per expert tensor: the sample std is within 1% of the target.
    for expert_w, dense_w in ((experts.w_value_EFD, dense.value.weight), (experts.w_out_EDF, dense.fc2.weight)):
        target = dense_w.std().item()
        if granularity > 1 and norm != "pre_ln":  # Xavier: the narrower expert has the smaller fan
            target *= math.sqrt(sum(dense_w.shape) / sum(expert_w.shape[1:]))
        assert expert_w.std().item() == pytest.approx(target, rel=0.03)


def _layer_norm(x, norm):
    """LayerNorm written out: (x - mean) / sqrt(biased variance + eps) * weight + bias."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _glm130b_block(layer, h, num_layers, mask, cos, sin):
    """GLM-130B / ChatGLM-6B ``GLMBlock.forward``, line by line, with the layer's own attention and
    FFN as Attn and MLP (LN_in = attention_norm, LN_post = ffn_norm)."""
    alpha = (2 * num_layers) ** 0.5
    a = _layer_norm(h, layer.attention_norm)
    h = alpha * a + layer.attention(a, mask, cos, sin)
    m = _layer_norm(h, layer.ffn_norm)
    return alpha * m + layer.ffn(m)


def _pre_ln_block(layer, h, num_layers, mask, cos, sin):
    h = h + layer.attention(_layer_norm(h, layer.attention_norm), mask, cos, sin)
    return h + layer.ffn(_layer_norm(h, layer.ffn_norm))


def _randomise_norms(model, seed):
    """LayerNorm weights and biases away from (1, 0), each its own: a swapped or missing norm shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))


def _relative_error(a, ref):
    return float((a - ref).abs().max() / ref.abs().max())


def _masks_and_rope(batch, cfg):
    from moe_morpheus.model.mask import glm_attention_mask
    from moe_morpheus.model.rope import rope_tables

    mask = glm_attention_mask(batch["segment_ids"], batch["prefix_mask"])
    return (mask, *rope_tables(batch["position_ids"], batch["block_position_ids"], cfg.rope, cfg.head_dim))


@pytest.mark.parametrize("norm,block", [("deepnorm", _glm130b_block), ("pre_ln", _pre_ln_block)])
def test_layer_equals_the_written_out_block(norm, block):
    """One layer (the second of three, fp64) against the block's equations; deepnorm is GLM-130B's
    order, which normalises the layer's input, not its output."""
    from moe_morpheus.model.glm import megatron_config

    cfg = ModelConfig(**dict(TINY_GLM, num_layers=3, norm=norm))
    layer = GLMLayer(megatron_config(cfg, ParallelConfig(), torch.float32), cfg, None, 1).double().eval()
    _randomise_norms(layer, 3)
    batch = micro_batches(1, 2, cfg.seq_length, cfg.vocab_size, seed=4)[0]
    mask, cos, sin = _masks_and_rope(batch, cfg)
    x = 3 * torch.randn(cfg.seq_length, 2, cfg.hidden_size, dtype=torch.float64) + 1
    with torch.no_grad():
        expected = block(layer, x, cfg.num_layers, mask, cos, sin)
        assert _relative_error(layer(x, mask, cos, sin), expected) <= 1e-12


def test_deepnorm_model_normalises_embeddings_and_output_once():
    """The whole model (fp64) equals embeddings -> GLM-130B blocks -> one final LayerNorm -> tied
    logits, written out: layer 0 normalises the raw embeddings, nothing else touches the output."""
    model, cfg = build(embedding_grad_shrink=1.0)
    model = model.double().eval()
    _randomise_norms(model, 5)
    batch = micro_batches(1, 2, cfg.seq_length, cfg.vocab_size, seed=6)[0]
    mask, cos, sin = _masks_and_rope(batch, cfg)
    embeddings = model.embedding.word_embeddings.weight
    with torch.no_grad():
        h = embeddings[batch["tokens"]].transpose(0, 1)
        for layer in model.layers:
            h = _glm130b_block(layer, h, cfg.num_layers, mask, cos, sin)
        expected = (_layer_norm(h, model.final_norm) @ embeddings.t()).transpose(0, 1)
        assert _relative_error(logits(model, batch), expected) <= 1e-12


def test_rope_depends_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(p_q, p_k):
        rq = apply_rope(q, torch.tensor([[p_q]]), None, "1d")
        rk = apply_rope(k, torch.tensor([[p_k]]), None, "1d")
        return float((rq * rk).sum())

    assert score(3, 1) == pytest.approx(score(103, 101), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_rope_2d_uses_block_positions_on_the_second_half():
    x = torch.randn(1, 1, 2, 16)
    pos, block = torch.tensor([[5]]), torch.tensor([[2]])
    out = apply_rope(x, pos, block, "2d")
    torch.testing.assert_close(out[..., :8], apply_rope(x[..., :8], pos, None, "1d"))
    torch.testing.assert_close(out[..., 8:], apply_rope(x[..., 8:], block, None, "1d"))
    assert not torch.allclose(out, apply_rope(x, pos, torch.tensor([[3]]), "2d"))


def test_1d_rope_continues_positions_in_gmask_rows():
    model, cfg = build(rope="1d")
    pos, block = torch.tensor([[0, 1, 2, 2, 2]]), torch.tensor([[0, 0, 0, 1, 2]])
    rope_pos, _ = model.rope_positions(pos, block, torch.ones_like(pos))
    assert rope_pos.tolist() == [[0, 1, 2, 3, 4]]
    rope_pos, _ = model.rope_positions(pos, block, torch.zeros_like(pos))
    assert rope_pos.tolist() == pos.tolist()
    with pytest.raises(ValueError, match="gmask"):
        model.rope_positions(pos, block, None)


def test_embedding_gradient_shrink_scales_only_the_gradient():
    model_full, cfg = build(embedding_grad_shrink=1.0)
    model_shrunk, _ = build(embedding_grad_shrink=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    out_full, out_shrunk = model_full.embedding(tokens), model_shrunk.embedding(tokens)
    torch.testing.assert_close(out_full, out_shrunk)
    out_full.sum().backward()
    out_shrunk.sum().backward()
    g_full = model_full.embedding.word_embeddings.weight.grad
    torch.testing.assert_close(model_shrunk.embedding.word_embeddings.weight.grad, 0.1 * g_full)


def test_model_learns_a_fixed_batch():
    model, cfg = build()
    batch = micro_batches(1, 4, cfg.seq_length, cfg.vocab_size, seed=1)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        inputs = {k: batch[k] for k in ("tokens", "position_ids", "block_position_ids", "segment_ids", "prefix_mask")}
        per_token = model(**inputs, targets=batch["targets"])
        loss = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
