"""A stand-alone GLM forward in plain PyTorch (no Megatron-Core, no moe_morpheus imports) that
loads a consolidated export (``python -m moe_morpheus.inference.export``; docs/export_format.md) and
computes the training model's logits.

Usage::

    from moe_morpheus.inference.reference_model import ReferenceGLM
    model = ReferenceGLM.load("export_dir")
    logits = model(tokens, position_ids, block_position_ids, segment_ids, prefix_mask, gmask)  # [b, s, V]

It reads ``model.safetensors`` with :func:`read_safetensors` (the format is a JSON header and raw
little-endian tensors; the ``safetensors`` package reads the same file) and ``config.json``.
Inputs are GLM's [b, s] batch tensors (docs/design.md#packing, #positions).
Routing is dropless top-k of the router logits (the ``naive`` gate; ``softmax_before_topk``
honoured), which is what the training model does at evaluation without a capacity factor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file: u64 little-endian header length N, N bytes of JSON
    ``{name: {dtype, shape, data_offsets: [begin, end]}}`` (offsets into the data after the
    header), then the data."""
    raw = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + length])
    data = memoryview(raw)[8 + length:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def attention_mask(segment_ids: torch.Tensor, prefix_mask: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] True where query q may see key k: same segment, and k in Part A or k <= q."""
    seq = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return (same & (causal[None] | prefix_mask.bool()[:, None, :]))[:, None]


def _rotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on x [b, s, n, d] by positions [b, s] (GPT-NeoX rotate_half pairing)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * angles.cos() + rotated * angles.sin()


# The export format this forward computes (written by moe_morpheus.inference.export). v3: the GeGLU's
# activated projection is named ``gate_proj`` (v1 and v2: ``gelu``); v2: post-LN layers in GLM-130B's
# order (v1 normalised after the residual sum).
FORMAT = "moe_morpheus-glm-v3"
_GLM130B_ORDER = ("moe_morpheus-glm-v2", FORMAT)
_V2_NAMES = {"gelu": "gate_proj", "w_gelu_EFD": "w_gate_proj_EFD", "b_gelu_EF": "b_gate_proj_EF"}


class ReferenceGLM:
    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]):
        # Exports before v2 came from the old post-LN order x = LN(alpha x + F(x)); their post-LN
        # weights mean something else in GLM-130B's order computed here (pre-LN is unchanged).
        if config.get("format") not in _GLM130B_ORDER and config["norm"] != "pre_ln":
            raise ValueError(f"this export ({config.get('format')}, norm {config['norm']}) was written with the old "
                             f"DeepNorm order (LN after the residual); this forward computes GLM-130B's block "
                             f"({FORMAT}): retrain the model or use the moe_morpheus commit that exported it")
        if config.get("format") != FORMAT:  # v1 and v2 tensor names
            tensors = {".".join(_V2_NAMES.get(part, part) for part in name.split(".")): tensor
                       for name, tensor in tensors.items()}
        self.cfg, self.t = config, tensors

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceGLM:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        return cls(config, read_safetensors(directory / "model.safetensors"))

    def _ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.t[f"{name}.weight"], self.t[f"{name}.bias"],
                            self.cfg["layernorm_epsilon"])

    def _linear(self, x, name):
        return F.linear(x, self.t[f"{name}.weight"], self.t.get(f"{name}.bias"))

    def _rope(self, x, pos, block):
        cfg = self.cfg
        if cfg["rope"] == "1d":
            return _rotate(x, pos, cfg["rope_base"])
        half = x.shape[-1] // 2
        return torch.cat((_rotate(x[..., :half], pos, cfg["rope_base"]),
                          _rotate(x[..., half:], block, cfg["rope_base"])), dim=-1)

    def _attention(self, x, mask, pos, block, index):
        cfg, p = self.cfg, f"layers.{index}.attention"
        b, s, h = x.shape
        heads = cfg["num_attention_heads"]
        d = h // heads
        # Fused QKV rows are ordered head by head: (q_0, k_0, v_0, q_1, ...).
        qkv = self._linear(x, f"{p}.qkv").view(b, s, heads, 3, d)
        q, k, v = qkv.unbind(dim=3)
        q, k = self._rope(q, pos, block), self._rope(k, pos, block)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, n, s, d]
        coeff = float(index + 1) if cfg["query_layer_scaling"] else 1.0
        scores = torch.matmul(q / (math.sqrt(d) * coeff), k.transpose(-1, -2)).float() * coeff
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        context = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        return self._linear(context.transpose(1, 2).reshape(b, s, h), f"{p}.out")

    def _geglu(self, x, prefix):
        return self._linear(self._linear(x, f"{prefix}.value") * F.gelu(self._linear(x, f"{prefix}.gate_proj")),
                            f"{prefix}.fc2")

    def _moe(self, x, index):
        moe, p = self.cfg["moe"], f"layers.{index}.ffn.moe"
        if moe["gate"] != "naive":
            raise ValueError(f"the reference forward routes with the naive gate, not {moe['gate']!r}")
        x_td = x.reshape(-1, x.shape[-1])
        logits = F.linear(x_td, self.t[f"{p}.gate.gate.weight"], self.t.get(f"{p}.gate.gate.bias")).float()
        if moe["softmax_before_topk"]:
            score, idx = logits.softmax(dim=-1).topk(moe["top_k"], dim=-1)
        else:
            top, idx = logits.topk(moe["top_k"], dim=-1)
            score = top.softmax(dim=-1)
        w_value, b_value = self.t[f"{p}.experts.w_value_EFD"], self.t[f"{p}.experts.b_value_EF"]
        w_gate, b_gate = self.t[f"{p}.experts.w_gate_proj_EFD"], self.t[f"{p}.experts.b_gate_proj_EF"]
        w_out, b_out = self.t[f"{p}.experts.w_out_EDF"], self.t[f"{p}.experts.b_out_ED"]
        out = torch.zeros_like(x_td)
        for e in range(w_value.shape[0]):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            rows = x_td[token]
            act = F.linear(rows, w_value[e], b_value[e]) * F.gelu(F.linear(rows, w_gate[e], b_gate[e]))
            y = F.linear(act, w_out[e], b_out[e])
            out.index_add_(0, token, y * score[token, slot][:, None].to(y.dtype))
        return out.view_as(x)

    def _ffn(self, x, index):
        moe = self.cfg.get("moe")
        if moe and moe["layer_freq"] > 0 and (index + 1) % moe["layer_freq"] == 0:
            return self._moe(x, index)
        return self._geglu(x, f"layers.{index}.ffn")

    @torch.no_grad()
    def __call__(self, tokens, position_ids, block_position_ids, segment_ids, prefix_mask, gmask=None):
        """Logits [b, s, padded vocabulary] (fp32 for an fp32 export)."""
        cfg = self.cfg
        if cfg["rope"] == "2d":
            pos, block = position_ids, block_position_ids
        else:  # 1D RoPE: [gMASK] rows continue linearly into Part B (docs/design.md#rope)
            if gmask is None:
                raise ValueError("1D RoPE needs the per-token gmask flag")
            pos, block = position_ids + block_position_ids * gmask.to(position_ids.dtype), None
        mask = attention_mask(segment_ids, prefix_mask)
        x = F.embedding(tokens, self.t["embedding.word_embeddings.weight"])
        alpha, pre_ln = cfg["residual_alpha"], cfg["norm"] == "pre_ln"
        for i in range(cfg["num_layers"]):
            if pre_ln:
                x = x + self._attention(self._ln(x, f"layers.{i}.attention_norm"), mask, pos, block, i)
                x = x + self._ffn(self._ln(x, f"layers.{i}.ffn_norm"), i)
            else:  # DeepNorm in GLM-130B's order: x = alpha LN(x) + F(LN(x)), one LN per sub-layer
                a = self._ln(x, f"layers.{i}.attention_norm")
                x = alpha * a + self._attention(a, mask, pos, block, i)
                m = self._ln(x, f"layers.{i}.ffn_norm")
                x = alpha * m + self._ffn(m, i)
        x = self._ln(x, "final_norm")
        return F.linear(x, self.t["embedding.word_embeddings.weight"])  # tied output projection
