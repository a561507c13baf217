"""Consolidated export: a distributed checkpoint of any layout -> one safetensors file, a JSON
config and the tokenizer (docs/export_format.md), loadable without Megatron-Core by
:mod:`moe_morpheus.inference.reference_model`.

``python -m moe_morpheus.inference.export checkpoint=DIR out=DIR`` where ``checkpoint`` is a ``step_*`` folder
written by the trainer (moe_morpheus/train/checkpoint/). The checkpoint's keys name global
tensors, so loading it into a world of one (tp = pp = ep = 1) through ``dist_checkpointing``
reassembles every TP, PP and EP shard; the tensors are then written under their parameter names
in that model. The ``safetensors`` package is not a dependency: the format (a little-endian u64
header length, a JSON header, raw tensors) is written here and read back by either.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_morpheus.config import ConfigError, ModelConfig, MoEConfig
from moe_morpheus.config.cli import fail, option, parse_options
from moe_morpheus.inference.reference_model import FORMAT  # the reader decides which exports it computes

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Tensors in name order, contiguous; the header padded with spaces to a multiple of 8 bytes
    (the format's alignment rule)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        blob = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for blob in blobs:
            out.write(blob)


def export_config(model: ModelConfig, moe: MoEConfig | None, tokenizer_file: str | None) -> dict:
    """What :class:`~moe_morpheus.inference.reference_model.ReferenceGLM` needs (docs/export_format.md)."""
    config = {
        "format": FORMAT,
        "num_layers": model.num_layers, "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_attention_heads, "ffn_hidden_size": model.ffn_hidden,
        "vocab_size": model.vocab_size, "padded_vocab_size": model.padded_vocab_size,
        "seq_length": model.seq_length, "norm": model.norm, "residual_alpha": model.residual_alpha,
        "rope": model.rope, "rope_base": model.rope_base, "layernorm_epsilon": model.layernorm_epsilon,
        "query_layer_scaling": model.query_layer_scaling, "tied_embeddings": True,
        "tokenizer": tokenizer_file,
    }
    if moe is not None and moe.enabled:
        config["moe"] = {"layer_freq": moe.layer_freq, "num_experts": moe.num_experts, "top_k": moe.top_k,
                         "expert_hidden_size": moe.expert_hidden(model),
                         "gate": moe.gate, "softmax_before_topk": moe.softmax_before_topk}
    return config


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of a whole (tp = pp = ep = 1) model by name: the export's tensor names."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def configs_from_manifest(manifest: dict) -> tuple[ModelConfig, MoEConfig | None, dict]:
    """The model and MoE configs a checkpoint was written with (its checkpoint.json)."""
    from omegaconf import OmegaConf

    config = manifest["config"]
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), config["model"]))
    moe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MoEConfig), config["moe"]))
    return model, moe if moe.enabled else None, config


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the tokenizer of ``checkpoint`` (a step
    folder, a run's checkpoints folder or its run folder: ``find_checkpoint``) into ``out_dir``.
    Runs as a world of one (call it outside any other process group)."""

    from moe_morpheus.config import ParallelConfig
    from moe_morpheus.config.data import resolve_path
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.train.checkpoint import (
        CheckpointError,
        find_checkpoint,
        load_model_weights,
        read_manifest,
    )

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"out={out_dir} is a file: name a folder to write the export into")
    initialize(ParallelConfig())  # a world of one: verifying and loading are collectives
    checkpoint = find_checkpoint(checkpoint)  # before the model is built: a wrong path costs nothing
    model_cfg, moe_cfg, config = configs_from_manifest(read_manifest(checkpoint))
    (model,) = build_model(model_cfg, moe_cfg, ParallelConfig())
    load_model_weights(checkpoint, [model])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = config.get("data", {}).get("tokenizer")
    tokenizer_name = None
    if tokenizer and resolve_path(tokenizer).is_file():
        tokenizer_name = "tokenizer.model"
        shutil.copyfile(resolve_path(tokenizer), out_dir / tokenizer_name)
    export = export_config(model_cfg, moe_cfg, tokenizer_name)
    write_safetensors(out_dir / "model.safetensors", model_tensors(model),
                      {"format": FORMAT, "source": str(checkpoint.resolve())})
    (out_dir / "config.json").write_text(json.dumps(export, indent=1))
    return out_dir


@dataclass
class ExportOptions:
    checkpoint: str = option(help="a run folder, its checkpoints folder (the newest valid checkpoint) or one "
                                  "step_* folder")
    out: str = option(help="the folder to write model.safetensors, config.json and tokenizer.model to")


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_morpheus.inference.export checkpoint=DIR out=DIR``: one safetensors file, a JSON
    config and the tokenizer, from a checkpoint of any parallel layout. ``DIR`` is a run folder,
    its ``checkpoints`` folder (the newest valid checkpoint) or one ``step_*`` folder."""
    from moe_morpheus.train.checkpoint import CheckpointError

    try:
        args, _ = parse_options(ExportOptions, sys.argv[1:] if argv is None else argv,
                                prog="moe_morpheus.inference.export", summary=main.__doc__)
        out = export_checkpoint(args.checkpoint, args.out)
    except (ConfigError, CheckpointError) as error:
        return fail(error)
    print(f"exported {args.checkpoint} -> {out}/model.safetensors, config.json"
          + (", tokenizer.model" if (out / "tokenizer.model").exists() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
