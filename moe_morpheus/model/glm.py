"""The GLM model: a Megatron-Core ``LanguageModule`` built from tensor-parallel layers.

One instance is one pipeline chunk: the first chunk owns the word embedding, the last the final
LayerNorm, the tied output projection and the loss. Tensors flow in Megatron's [s, b, h] layout.
Parallel groups come from Megatron-Core's ``parallel_state``; nothing else about the layout
lives here.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from moe_morpheus.model import init
from moe_morpheus.model.layer import GLMLayer, mark_sequence_parallel
from moe_morpheus.model.mask import glm_attention_mask
from moe_morpheus.model.rope import rope_tables
from moe_morpheus.moe.layer import FMoE


def _backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def _recompute_fields(recompute: str) -> dict:
    """``trainer.recompute`` as Megatron-Core's fields. full: every layer is one recompute unit
    (uniform, 1 layer), so a layer keeps only its [s, b, h] input; selective: Megatron's default
    module, the core attention (Korthikanti et al. 2022, sec. 4.2: the 5 a s / h part of the
    34 + 5 a s / h bytes per token and hidden unit)."""
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if recompute == "none":
        return {}
    raise ValueError(f"recompute={recompute!r}: choose none, selective or full")


def megatron_config(model_cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                    recompute: str = "none") -> TransformerConfig:
    """The Megatron-Core config the tensor-parallel layers and the pipeline schedule read."""
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        ffn_hidden_size=model_cfg.ffn_hidden,
        tensor_model_parallel_size=parallel.tp,
        # Needed for correct layer offsets and checkpoint keys under PP (docs/design.md#cpu-compatibility).
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp if parallel.vpp > 1 else None,
        # Activations between the TP regions (LayerNorms, dropout, residual, MoE routing) are split
        # along the sequence: column-parallel layers all-gather their input, row-parallel ones
        # reduce-scatter their output (Korthikanti et al. 2022, sec. 4.2.2).
        sequence_parallel=parallel.sequence_parallel,
        **_recompute_fields(recompute),
        # Initialise the full master weight on the CPU, then slice: every TP layout starts from
        # the same model for the same seed (TP=1 vs TP=2 tests, checkpoint resharding).
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Losses arrive already normalised per target token of the global batch (train/step.py):
        # the schedule must neither divide by the number of micro-batches nor DDP average.
        calculate_per_token_loss=True,
        gradient_accumulation_fusion=False,
        # gloo's batch_isend_irecv posts ops one by one without tags; with 2 stages the next and
        # previous rank are the same peer, so the interleaved schedule's activation and gradient
        # messages (same shape) can pair up crossed. Megatron's unbatched path orders sends and
        # receives by rank parity, which keeps them matched. NCCL groups the batch and is safe.
        batch_p2p_comm=_backend() != "gloo",
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        layernorm_epsilon=model_cfg.layernorm_epsilon,
        add_bias_linear=True,
        apply_query_key_layer_scaling=model_cfg.query_layer_scaling,
        attention_softmax_in_fp32=True,
        init_method=init.normal(model_cfg.init_std),
    )


class GLMEmbedding(torch.nn.Module):
    """Vocab-parallel word embedding with GLM-130B's embedding gradient shrink (EGS)."""

    def __init__(self, config: TransformerConfig, model_cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            model_cfg.padded_vocab_size, model_cfg.hidden_size, init_method=init.embedding_init(model_cfg),
            config=config,
        )
        self.grad_shrink = model_cfg.embedding_grad_shrink
        self.sequence_parallel = config.sequence_parallel

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        emb_BSH = self.word_embeddings(tokens_BS)
        if self.grad_shrink < 1.0:
            # Forward value unchanged; gradient into the embedding scaled by alpha (0.1 in GLM-130B,
            # whose embedding gradients ran orders of magnitude above the other layers').
            emb_BSH = emb_BSH * self.grad_shrink + emb_BSH.detach() * (1.0 - self.grad_shrink)
        emb_SBH = emb_BSH.transpose(0, 1).contiguous()
        if self.sequence_parallel:
            # This TP rank's s / tp positions; the backward all-gathers (Megatron's GPT embedding).
            emb_SBH = tensor_parallel.scatter_to_sequence_parallel_region(emb_SBH)
        return emb_SBH


def layer_range(model_cfg: ModelConfig, parallel: ParallelConfig, pp_rank: int, vp_stage: int | None) -> range:
    """Global layer indices of one pipeline chunk (interleaved: chunk v of rank p)."""
    vpp = parallel.vpp
    per_chunk = model_cfg.num_layers // (parallel.pp * vpp)
    start = (vp_stage or 0) * (model_cfg.num_layers // vpp) + pp_rank * per_chunk
    return range(start, start + per_chunk)


@contextlib.contextmanager
def _seeded(seed: int):
    # Initialisation runs on the CPU generator (use_cpu_initialization), so only it is forked.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _run_counted_once(layer: GLMLayer, *inputs):
    """Run ``layer``; in the recompute pass of a full-recompute backward (grad enabled inside
    Megatron's checkpoint) its MoE routing statistics are not recorded again: the first pass,
    which ran without grad, already counted this micro-batch."""
    moe = getattr(layer.ffn, "moe", None)
    if not (torch.is_grad_enabled() and isinstance(moe, FMoE)):  # FastMoE's own layer keeps no stats
        return layer(*inputs)
    moe.record_stats = False
    try:
        return layer(*inputs)
    finally:
        moe.record_stats = True


class GLMModel(LanguageModule):
    def __init__(
        self,
        config: TransformerConfig,
        model_cfg: ModelConfig,
        moe_cfg: MoEConfig | None,
        parallel: ParallelConfig,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        seed: int = 1234,
    ):
        super().__init__(config=config)
        self.model_cfg = model_cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = True
        self.model_type = ModelType.encoder_or_decoder  # read by the pipeline schedules
        self.input_tensor = None
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.layer_indices = layer_range(model_cfg, parallel, pp_rank, vp_stage)
        # Each part draws its initial weights from its own seed, so the model is the same whatever
        # pipeline stage builds it (PP=2 must equal PP=1; checkpoints reshard across layouts).
        if pre_process:
            with _seeded(seed):
                self.embedding = GLMEmbedding(config, model_cfg)
        layers = []
        for i in self.layer_indices:
            with _seeded(seed + 1 + i):
                layers.append(GLMLayer(config, model_cfg, moe_cfg, i))
        self.layers = torch.nn.ModuleList(layers)
        if post_process:
            self.final_norm = torch.nn.LayerNorm(model_cfg.hidden_size, eps=model_cfg.layernorm_epsilon)
            mark_sequence_parallel(self.final_norm, config)
            # Logits use the word-embedding matrix (tied). On a last stage without the embedding,
            # Megatron keeps a copy here that setup_embeddings_and_output_layer() syncs from the
            # first stage, and finalize_model_grads all-reduces its gradient with the original.
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                model_cfg.hidden_size, model_cfg.padded_vocab_size, config=config,
                init_method=init.embedding_init(model_cfg), bias=False, gather_output=False,
                skip_weight_param_allocation=pre_process,
            )
        self.setup_embeddings_and_output_layer()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """This chunk's entries for Megatron-Core ``dist_checkpointing``, keyed independently of
        the layout (loading reshards by key and global offset, so TP / PP / EP may change).

        Megatron's default would flatten ``layers`` (a ModuleList) and the GLMEmbedding (a plain
        module) into unsharded tensors: TP shards would be saved as whole tensors and a PP stage's
        local ``layers.0`` would collide with the other stage's. Here: layers by global index,
        TP shards by Megatron's parallel layers, experts by global expert index
        (``MoEFeedForward.sharded_state_dict``), the tied output weight of a last stage without the
        embedding as a replica of ``embedding.word_embeddings.weight`` (LanguageModule's rule).
        ``_extra_state`` entries (Transformer Engine FP8 metadata; always None here) are left out.
        """
        if sharded_offsets:
            raise ValueError("GLMModel is a whole pipeline chunk: it takes no outer sharded_offsets")
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        entries = {}
        if self.pre_process:
            entries.update(self.embedding.word_embeddings.sharded_state_dict(
                f"{prefix}embedding.word_embeddings.", (), metadata))
        for index, layer in zip(self.layer_indices, self.layers):
            entries.update(layer.sharded_state_dict(f"{prefix}layers.{index}.", (), metadata))
        if self.post_process:
            entries.update(sharded_state_dict_default(self.final_norm, f"{prefix}final_norm.", (), metadata,
                                                      tp_group=parallel_state.get_tensor_model_parallel_group()))
            entries.update(self.output_layer.sharded_state_dict(f"{prefix}output_layer.", (), metadata))
            self.tie_embeddings_and_output_weights_state_dict(
                entries, f"{prefix}output_layer.weight", f"{prefix}embedding.word_embeddings.weight", metadata)
        return {key: value for key, value in entries.items() if not key.endswith("_extra_state")}

    def set_input_tensor(self, input_tensor) -> None:
        """Called by the pipeline schedule with the previous stage's output."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def rope_positions(self, position_ids, block_position_ids, gmask):
        """Position ids for RoPE (docs/design.md#positions)."""
        if self.model_cfg.rope == "2d":
            return position_ids, block_position_ids
        if gmask is None:
            raise ValueError(
                "1D RoPE needs the per-token `gmask` flag: [gMASK] rows use position_ids + "
                "block_position_ids (linear continuation), [MASK] rows position_ids"
            )
        return position_ids + block_position_ids * gmask.to(position_ids.dtype), None

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        block_position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None,
        prefix_mask: torch.Tensor | None,
        targets: torch.Tensor | None = None,
        gmask: torch.Tensor | None = None,
        kv_caches: list[dict] | None = None,
    ) -> torch.Tensor:
        """All inputs [b, s]. Returns per-token cross entropy [b, s] on the last stage when
        ``targets`` are given, logits [b, s, vocab / tp] on the last stage otherwise, and the
        hidden states [s, b, h] on other stages.

        Generation (moe_morpheus.inference.generate) passes ``kv_caches``, one dict per layer: the new
        tokens attend to the cached ones too. ``segment_ids`` None means every new token may
        attend to every cached token and to itself (a decoding step after the context)."""
        hidden = self.embedding(tokens) if self.pre_process else self.input_tensor
        mask = glm_attention_mask(segment_ids, prefix_mask) if segment_ids is not None else None
        cfg = self.model_cfg
        rope_cos, rope_sin = rope_tables(*self.rope_positions(position_ids, block_position_ids, gmask), cfg.rope,
                                         cfg.head_dim, cfg.rope_base)
        full_recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            if full_recompute:
                # Keeps only the layer's input; its forward (MoE token exchange included) runs again
                # in backward with the RNG states of the first pass (Megatron-Core's checkpoint).
                hidden = tensor_parallel.checkpoint(
                    functools.partial(_run_counted_once, layer), False, hidden, mask, rope_cos, rope_sin)
            else:
                cache = kv_caches[index] if kv_caches is not None else None
                hidden = layer(hidden, mask, rope_cos, rope_sin, kv_cache=cache)
        if not self.post_process:
            return hidden
        # The output's only normalisation: a post-LN layer ends with alpha * m + FFN(m) (GLM-130B).
        hidden = self.final_norm(hidden)
        logits_SBV, _ = self.output_layer(hidden, weight=self.shared_embedding_or_output_weight())
        if targets is None:
            return logits_SBV.transpose(0, 1)
        loss_SB = tensor_parallel.vocab_parallel_cross_entropy(logits_SBV.float(), targets.t().contiguous())
        return loss_SB.t()


def build_model(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig | None,
    parallel: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    seed: int = 1234,
    recompute: str = "none",
) -> list[GLMModel]:
    """Build this rank's model chunks (one, or ``virtual_pp`` for the interleaved schedule).

    Call after :func:`moe_morpheus.parallel.initialize`. The initial weights depend only on
    ``seed``, not on the parallel layout. ``recompute``: none, selective or full (``trainer.recompute``).
    """
    config = megatron_config(model_cfg, parallel, dtype, recompute)
    vpp = parallel.vpp
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        chunks.append(GLMModel(
            config, model_cfg, moe_cfg, parallel,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
            seed=seed,
        ))
    if torch.cuda.is_available():
        chunks = [chunk.cuda() for chunk in chunks]
    return chunks
