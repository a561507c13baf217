"""Consolidated export: a checkpoint written at EP=2 (x DP=2) becomes one safetensors file, a JSON
config and the tokenizer; the plain-PyTorch reference forward reproduces the training model's
logits (relative 1e-5, fp32)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.numerics import relative_error
from tests.helpers.presets import TINY_GLM, TINY_MOE
from tests.helpers.synthetic import micro_batches


def _save_and_logits(directory: str):
    """Train one step at ep=2, save a checkpoint, return the model's full logits. (TP=2: the
    checkpoint module cannot save it yet, final_norm's TP replicas share replica id 0.)"""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from omegaconf import OmegaConf

    from moe_morpheus.config.experiment import ExperimentConfig
    from moe_morpheus.model import build_model
    from moe_morpheus.moe import set_aux_loss_scale
    from moe_morpheus.parallel import initialize
    from moe_morpheus.train.checkpoint import TrainState, layout, model_shape, save_checkpoint
    from moe_morpheus.train.optim import Optimizer
    from moe_morpheus.train.step import MODEL_INPUTS, forward_backward, wrap_ddp

    exp = ExperimentConfig(model=ModelConfig(**TINY_GLM), moe=MoEConfig(**TINY_MOE), parallel=ParallelConfig(ep=2))
    initialize(exp.parallel, exp.model)
    chunks = wrap_ddp(build_model(exp.model, exp.moe, exp.parallel, seed=2))
    optimizer = Optimizer(chunks, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0)
    batches = micro_batches(2, 2, exp.model.seq_length, exp.model.vocab_size, seed=6)
    set_aux_loss_scale(0.5)
    forward_backward(chunks, batches)
    optimizer.step()
    manifest = {"config": OmegaConf.to_container(OmegaConf.structured(exp)), "layout": layout(exp.parallel),
                "model_shape": model_shape(exp.model, exp.moe)}
    path = save_checkpoint(directory, TrainState(step=1), chunks, optimizer, manifest=manifest, keep=1,
                           checksums=False)
    model = chunks[0].module.eval()
    batch = batches[0]
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in MODEL_INPUTS}, gmask=batch["gmask"])  # [b, s, V / tp]
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return str(path), torch.cat(shards, dim=-1), batch


@pytest.mark.slow
def test_export_reproduces_training_logits(tmp_path):
    from moe_morpheus.inference.export import main
    from moe_morpheus.inference.reference_model import ReferenceGLM, read_safetensors

    path, logits, batch = run_distributed(_save_and_logits, 2, str(tmp_path / "ckpt"))[0]
    out = tmp_path / "export"
    # The checkpoints folder, as generate and evaluate take it: its newest checkpoint is exported.
    assert main([f"checkpoint={tmp_path / 'ckpt'}", f"out={out}"]) == 0
    assert path.endswith("step_00000001")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.model"}
    config = json.loads((out / "config.json").read_text())
    assert config["moe"]["num_experts"] == 4 and config["padded_vocab_size"] == 256
    tensors = read_safetensors(out / "model.safetensors")
    assert tensors["layers.1.ffn.moe.experts.w_value_EFD"].shape == (4, 96, 64)  # both EP shards
    assert tensors["layers.0.attention.qkv.weight"].shape == (192, 64)
    reference = ReferenceGLM.load(out)
    ref_logits = reference(batch["tokens"], batch["position_ids"], batch["block_position_ids"],
                           batch["segment_ids"], batch["prefix_mask"], batch["gmask"])
    assert ref_logits.shape == logits.shape == (2, 32, 256)
    assert relative_error(ref_logits, logits) <= 1e-5
    # A v2 export (before the GeGLU rename) names the gate projection ``gelu``: read the same.
    v2 = {name.replace(".gate_proj.", ".gelu.").replace("_gate_proj_", "_gelu_"): t for name, t in tensors.items()}
    assert "layers.0.ffn.gelu.weight" in v2 and "layers.1.ffn.moe.experts.w_gelu_EFD" in v2
    old = ReferenceGLM({**config, "format": "moe_morpheus-glm-v2"}, v2)
    assert torch.equal(old(batch["tokens"], batch["position_ids"], batch["block_position_ids"],
                           batch["segment_ids"], batch["prefix_mask"], batch["gmask"]), ref_logits)


def test_reference_refuses_a_post_ln_export_of_the_old_block_order():
    """v1 exports computed x = LN(alpha x + F(x)); their post-LN weights are refused, pre-LN ones
    (the same block in both formats) are read."""
    import pytest

    from moe_morpheus.inference.reference_model import FORMAT, ReferenceGLM

    assert FORMAT == "moe_morpheus-glm-v3"
    for norm in ("deepnorm", "deepnet"):
        with pytest.raises(ValueError, match=r"old DeepNorm order \(LN after the residual\)"):
            ReferenceGLM({"format": "moe_morpheus-glm-v1", "norm": norm}, {})
    assert ReferenceGLM({"format": "moe_morpheus-glm-v1", "norm": "pre_ln"}, {}).cfg["norm"] == "pre_ln"
    assert ReferenceGLM({"format": FORMAT, "norm": "deepnorm"}, {}).cfg["format"] == FORMAT
    assert ReferenceGLM({"format": "moe_morpheus-glm-v2", "norm": "deepnorm"}, {}).cfg["norm"] == "deepnorm"


def test_safetensors_layout_follows_the_format(tmp_path):
    from moe_morpheus.inference.export import write_safetensors
    from moe_morpheus.inference.reference_model import read_safetensors

    tensors = {"b": torch.arange(6, dtype=torch.float32).view(2, 3), "a": torch.tensor([7], dtype=torch.int64),
               "e": torch.zeros(0)}
    write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "x"})
    raw = (tmp_path / "t.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + length])
    assert length % 8 == 0 and header["__metadata__"] == {"format": "x"}
    assert header["a"] == {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}
    assert header["b"]["data_offsets"] == [8, 32] and len(raw) == 8 + length + 32
    back = read_safetensors(tmp_path / "t.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    # The reference implementation reads our file, and ours reads its file.
    from safetensors.torch import load_file, save_file

    official = load_file(str(tmp_path / "t.safetensors"))
    assert set(official) == set(tensors) and all(torch.equal(official[k], v) for k, v in tensors.items())
    save_file(tensors, str(tmp_path / "official.safetensors"))
    assert all(torch.equal(read_safetensors(tmp_path / "official.safetensors")[k], v) for k, v in tensors.items())


def test_export_usage_and_bad_checkpoint(tmp_path, capsys):
    from moe_morpheus.inference.export import main

    assert main([]) == 2
    assert "missing checkpoint=..., out=..." in capsys.readouterr().err
    assert main([f"checkpoint={tmp_path}", f"out={tmp_path / 'out'}"]) == 2
    assert "holds no complete checkpoint (step_*/checkpoint.json): pass a run's checkpoints folder, the run " \
           "folder above it or one step_* folder in it" in capsys.readouterr().err
