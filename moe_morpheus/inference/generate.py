"""Blank filling and continuation with a trained GLM (Du et al. 2022; docs/design.md#inference).

- ``[gMASK]``: the input is ``text [gMASK] <sop>``; the context up to the mask is bidirectional
  (Part A); generated tokens take (mask position, 1, 2, ...) as 2D positions, or continue the
  positions linearly with 1D RoPE (GLM-130B).
- ``[MASK]``: ``a [MASK] c <sop>``; the generated span takes the mask's position (and block
  positions 1, 2, ... in 2D). Several masks are filled left to right, each span after the
  previous one in Part B (as in training), and spliced back into the text.
- Stops at ``<eop>`` or ``<eos>``; greedy, temperature, top-k and top-p sampling.
- A cache of past keys and values makes each new token one step; ``use_cache=False`` runs the
  whole sequence each time (the reference the tests compare with).

``python -m moe_morpheus.inference.generate checkpoint=DIR prompt="..."``: see ``main``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import tensor_parallel

from moe_morpheus.config import ConfigError
from moe_morpheus.config.cli import fail, option, parse_options
from moe_morpheus.data.tokenizer import EOP_ID, EOS_ID, GMASK_ID, MASK_ID, SOP_ID


class GenerationError(ValueError):
    """A prompt that cannot be generated from; the message says why and what to change."""


@dataclass
class Sampling:
    max_new_tokens: int = 48
    # 0: greedy. Otherwise logits / temperature, then top-k and top-p (nucleus) filtering.
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


class Generator:
    """Generation with one model chunk (pipeline parallelism 1; any tensor parallelism)."""

    def __init__(self, model, vocab_size: int, seq_length: int):
        self.model = model
        self.vocab_size = vocab_size  # the tokenizer's: padded embedding rows are never sampled
        self.seq_length = seq_length
        self.device = next(model.parameters()).device

    def _next_token(self, logits_BSV: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
        # Vocab-parallel logits: every TP rank gathers the whole row and draws the same token
        # (same logits, same seeded generator).
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits_BSV[:, -1:])[0, -1]
        logits = logits[: self.vocab_size].float()
        if sampling.temperature <= 0:
            return int(torch.argmax(logits))
        logits = _filter(logits / sampling.temperature, sampling.top_k, sampling.top_p)
        return int(torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator))

    def _forward(self, tokens, positions, blocks, gmask, prefix_len, caches, fed):
        """Logits after the last token. Without a cache: the whole sequence with GLM's mask.
        With one: the context (Part A and <sop>) first, then the tokens not yet cached one at a
        time, each attending to everything cached and to itself (causal, like Part B)."""
        def window(values, start, end):
            return torch.tensor([values[start:end]], dtype=torch.long, device=self.device)

        if caches is None or fed == 0:
            segment = torch.ones(1, len(tokens), dtype=torch.long, device=self.device)
            prefix = (torch.arange(len(tokens), device=self.device) < prefix_len).long()[None]
            return self.model(window(tokens, 0, None), window(positions, 0, None), window(blocks, 0, None),
                              segment, prefix, gmask=window(gmask, 0, None), kv_caches=caches)
        for i in range(fed, len(tokens)):
            logits = self.model(window(tokens, i, i + 1), window(positions, i, i + 1), window(blocks, i, i + 1),
                                None, None, gmask=window(gmask, i, i + 1), kv_caches=caches)
        return logits

    def room(self, prompt_ids: list[int]) -> int:
        """The most new tokens per span that ``generate`` can give ``prompt_ids`` within the
        trained ``seq_length`` (each span also takes its <sop>); < 1: the prompt leaves no room."""
        masks = sum(t in (MASK_ID, GMASK_ID) for t in prompt_ids)
        length = len(prompt_ids) + (masks == 0)  # a [gMASK] is added to a prompt without a mask
        return (self.seq_length - length) // max(masks, 1) - 1

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], sampling: Sampling | None = None, *, use_cache: bool = True
                 ) -> tuple[list[int], list[list[int]]]:
        """Fill every ``[MASK]`` of ``prompt_ids`` (or continue after a final ``[gMASK]``, added
        when the prompt has no mask). Returns (the text with the spans spliced in, the spans)."""
        sampling = sampling or Sampling()
        if not prompt_ids:
            raise GenerationError("the prompt is empty: give some text to continue or to fill")
        part_a = list(prompt_ids)
        if not any(t in (MASK_ID, GMASK_ID) for t in part_a):
            part_a.append(GMASK_ID)
        masks = [i for i, t in enumerate(part_a) if t in (MASK_ID, GMASK_ID)]
        needed = len(part_a) + len(masks) * (1 + sampling.max_new_tokens)
        if needed > self.seq_length:
            raise GenerationError(
                f"the prompt has {len(part_a)} tokens; with {len(masks)} span(s) of up to "
                f"{sampling.max_new_tokens} new tokens it needs {needed} positions but the model was trained "
                f"with seq_length={self.seq_length}: shorten the prompt or lower max_new_tokens")
        self.model.eval()
        generator = torch.Generator().manual_seed(sampling.seed)
        tokens, positions, blocks = list(part_a), list(range(len(part_a))), [0] * len(part_a)
        gmask = [0] * len(part_a)
        caches = [{} for _ in self.model.layers] if use_cache else None
        fed = 0  # tokens already in the cache
        spans = []
        for mask_position in masks:
            is_gmask = int(part_a[mask_position] == GMASK_ID)
            tokens.append(SOP_ID)
            positions.append(mask_position)
            blocks.append(1)
            gmask.append(is_gmask)
            span = []
            for step in range(sampling.max_new_tokens):
                logits = self._forward(tokens, positions, blocks, gmask, len(part_a), caches, fed)
                fed = len(tokens)
                token = self._next_token(logits, sampling, generator)
                if token in (EOP_ID, EOS_ID):
                    break
                span.append(token)
                tokens.append(token)
                positions.append(mask_position)
                blocks.append(step + 2)
                gmask.append(is_gmask)
            spans.append(span)
        text = []
        for i, token in enumerate(part_a):
            text.extend(spans[masks.index(i)] if i in masks else [token])
        return text, spans


def marked_text(tokenizer, prompt_ids: list[int], spans: list[list[int]], marks: tuple[str, str] = ("[[", "]]")
                ) -> str:
    """The prompt with every mask replaced by its generated span between ``marks`` (a continuation
    after ``[gMASK]`` too), so what the model wrote is told apart from what was given. Pieces are
    decoded as differences of growing prefixes: decoding them one by one would drop the spaces at
    the seams (SentencePiece strips a leading one)."""
    pieces: list[tuple[list[int], bool]] = [([], False)]
    spans_left = iter(spans)
    for token in prompt_ids + ([] if any(t in (MASK_ID, GMASK_ID) for t in prompt_ids) else [GMASK_ID]):
        if token in (MASK_ID, GMASK_ID):
            pieces += [(next(spans_left), True), ([], False)]
        else:
            pieces[-1][0].append(token)
    out, seen, before = [], [], ""
    for ids, generated in pieces:
        seen += ids
        text = tokenizer.decode(seen)
        piece = text[len(before):] if text.startswith(before) else tokenizer.decode(ids)
        before = text
        if generated:  # spaces around a fill stay outside the marks
            core = piece.strip()
            lead, trail = piece[:len(piece) - len(piece.lstrip())], piece[len(piece.rstrip()):]
            piece = f"{lead}{marks[0]}{core}{marks[1]}{trail}"
        out.append(piece)
    return "".join(out)


@dataclass
class GenerateOptions:
    checkpoint: str = option(help="a run folder, its checkpoints folder (the newest valid checkpoint) or one "
                                  "step_* folder")
    prompt: str | None = option(None, help="the text; [MASK] marks a blank, else the text is continued")
    file: str | None = option(None, help="a text file with one prompt per line (instead of prompt)")
    marks: bool = option(True, help="put what the model wrote between [[ and ]]; false: plain text")
    max_new_tokens: int = option(48, help="tokens generated per span at most")
    temperature: float = option(0.0, help="0 = greedy")
    top_k: int = option(0, help="sample from the k likeliest tokens (0 = all)")
    top_p: float = option(1.0, help="nucleus sampling mass")
    seed: int = option(0, help="sampling seed")

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.file is None):
            raise ConfigError("give exactly one of prompt=TEXT or file=PATH")

    def prompts(self) -> list[str]:
        """The prompts, checked before any model is built."""
        if self.prompt is not None:
            if not self.prompt.strip():
                raise ConfigError(EMPTY_PROMPT)
            return [self.prompt]
        path = Path(self.file)
        if not path.is_file():
            raise ConfigError(f"file={path}: no such file; give a text file with one prompt per line")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"file={path} holds no prompt: write one prompt per line")
        return prompts


EMPTY_PROMPT = "the prompt is empty: give the text to continue or to fill, e.g. prompt='Paris is the [MASK] of France.'"


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_morpheus.inference.generate checkpoint=CKPT (prompt=TEXT | file=F) [key=value]``.

    ``CKPT`` is a run folder (``outputs/<name>/<run>``), its ``checkpoints`` folder (the newest
    valid checkpoint is used) or one ``step_*`` folder. Put ``[MASK]`` in the text to fill blanks;
    otherwise the text is continued after ``[gMASK]``. What the model wrote is printed between
    ``[[`` and ``]]`` (``marks=false``: plain text).
    """
    import sys

    from moe_morpheus.inference.load import load_for_inference
    from moe_morpheus.train.checkpoint import CheckpointError

    argv = sys.argv[1:] if argv is None else argv
    try:
        if "prompt=" in argv:  # the parser reads an empty value as "not given"
            raise ConfigError(EMPTY_PROMPT)
        args, _ = parse_options(GenerateOptions, argv, prog="moe_morpheus.inference.generate", summary=main.__doc__)
        prompts = args.prompts()
        model, tokenizer, exp = load_for_inference(args.checkpoint)
    except (ConfigError, CheckpointError, OSError) as error:
        return fail(error)
    generator = Generator(model, tokenizer.vocab_size, exp.model.seq_length)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    for prompt in prompts:
        ids = tokenizer.encode_with_masks(prompt)
        try:
            text, spans = generator.generate(ids, sampling)
        except GenerationError as error:
            return fail(error)
        shown = marked_text(tokenizer, ids, spans) if args.marks else tokenizer.decode(text)
        print(f">>> {prompt}\n{shown}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
