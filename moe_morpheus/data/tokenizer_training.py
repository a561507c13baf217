"""Training a bilingual SentencePiece tokenizer on the blend of a data config.

Settings and why (measured on the demo corpus, vocab 8192, 2 cores):
- BPE, not unigram: the same held-out compression (en 3.80 vs 3.69 chars/token, zh 1.10 vs
  1.11, en-zh help pages 3.08 vs 3.07) but trains in 2 s instead of 29 s.
- identity normalisation, ``remove_extra_whitespaces=False``, ``add_dummy_prefix=False``:
  decode(encode(text)) == text exactly (NFKC would rewrite full-width Chinese punctuation
  such as "，" and "（"), and tokenising two strings separately then concatenating decodes to
  the concatenated string (MIP prompts are assembled that way).
- ``character_coverage=0.9995`` with byte fallback: rare Chinese characters become 3 byte
  tokens instead of eating the vocabulary (0.9999 halves byte tokens on held-out Sanguo but
  costs 2% of English compression).
- ``split_by_whitespace`` stays on: Chinese has no spaces, so a Chinese run is one "word" and
  BPE learns multi-character pieces inside it; ``split_by_unicode_script`` keeps Han and Latin
  apart.

Remake the committed demo tokenizer (the command is also in data/tokenizer/README.md)::

    python -m moe_morpheus.data.tokenizer_training data_config=conf/data/demo.yaml \\
        vocab_size=8192 output=data/tokenizer/demo_8k.model
"""

from __future__ import annotations

import io
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from moe_morpheus.config import ConfigError
from moe_morpheus.config.cli import fail, option, parse_options
from moe_morpheus.data.corpus import read_documents
from moe_morpheus.data.tokenizer import (
    EOP_ID,
    EOS_ID,
    GMASK_ID,
    MASK_ID,
    MIN_VOCAB_SIZE,
    NUM_BYTE_PIECES,
    PAD_ID,
    SMASK_ID,
    SOP_ID,
    SPECIAL_PIECES,
    UNK_ID,
    Tokenizer,
    TokenizerError,
)


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    # SentencePiece trains on lines; newlines inside a document become the byte piece <0x0A>.
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(texts: Iterable[str], output: str | os.PathLike, *, vocab_size: int,
                    character_coverage: float = 0.9995, seed: int = 0) -> Tokenizer:
    """Train a BPE model on ``texts`` and write it atomically to ``output``."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: the {len(SPECIAL_PIECES)} special tokens and "
            f"{NUM_BYTE_PIECES} byte-fallback pieces need {len(SPECIAL_PIECES) + NUM_BYTE_PIECES} ids; "
            f"use at least {MIN_VOCAB_SIZE}")
    sentences = list(_sentences(texts))
    if not sentences:
        raise TokenizerError("no text to train the tokenizer on: check the configured sources")
    # SentencePiece samples input_sentence_size lines itself; a fixed shuffle makes the model
    # depend only on the inputs and seed.
    random.Random(seed).shuffle(sentences)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=character_coverage, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=EOS_ID, pad_piece="<pad>", eos_piece="<eos>",
            control_symbols=[SPECIAL_PIECES[i] for i in (MASK_ID, GMASK_ID, SMASK_ID, SOP_ID, EOP_ID)],
            # Sanguo paragraphs reach 2,442 characters (7 KB of UTF-8); the default 4,192-byte
            # limit would silently drop them.
            max_sentence_length=1 << 16, shuffle_input_sentence=False, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as err:
        raise TokenizerError(f"SentencePiece could not train a vocabulary of {vocab_size}: {err}") from err
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, output)
    return Tokenizer(output)


def blend_texts(data_cfg, max_chars: int, seed: int = 0) -> list[str]:
    """Documents for tokenizer training: each source's share of ``max_chars`` follows its blend
    weight (MIP counts with the parallel sources); a source smaller than its share gives all it has."""
    shares = data_cfg.tokenizer_shares()
    texts: list[str] = []
    for name, src in data_cfg.sources.items():
        flat = [part for doc in read_documents(name, src, warn=False)
                for part in (doc if isinstance(doc, tuple) else (doc,))]
        random.Random(f"{seed}-{name}").shuffle(flat)
        left = int(shares[name] * max_chars)
        for text in flat:
            if left <= 0:
                break
            # Cut the last document: one Austen record is up to 0.5 M characters.
            texts.append(text[:left])
            left -= len(texts[-1])
    return texts


@dataclass
class TokenizerOptions:
    output: str = option(help="path of the .model file to write")
    data_config: str = option("conf/data/demo.yaml", help="a data config YAML (DataConfig keys) whose blend is read")
    vocab_size: int = option(8192, help="vocabulary size, special tokens included")
    max_chars: int = option(3_000_000, help="characters sampled from the blend (3M: 2 s of BPE training)")
    character_coverage: float = option(0.9995, help="share of characters the vocabulary covers")
    seed: int = option(0, help="sampling and training seed")


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_morpheus.data.tokenizer_training output=PATH [data_config=YAML] [key=value]``:
    train a tokenizer on the blend of a data config."""
    from omegaconf import OmegaConf

    from moe_morpheus.config.data import DataConfig

    start = time.perf_counter()
    try:  # every failure here is a user input problem: the message, not a traceback
        args, _ = parse_options(TokenizerOptions, sys.argv[1:] if argv is None else argv,
                                prog="moe_morpheus.data.tokenizer_training", summary=main.__doc__)
        if not Path(args.data_config).is_file():
            raise ConfigError(f"data config {args.data_config} not found: pass data_config=PATH (e.g. conf/data/demo.yaml)")
        cfg = DataConfig.from_dict(OmegaConf.to_container(OmegaConf.load(args.data_config), resolve=True))
        texts = blend_texts(cfg, args.max_chars, args.seed)
        tok = train_tokenizer(texts, args.output, vocab_size=args.vocab_size,
                              character_coverage=args.character_coverage, seed=args.seed)
    except (ValueError, OSError) as error:  # ConfigError is a ValueError
        return fail(error)
    print(f"wrote {args.output}: vocab {tok.vocab_size}, {sum(map(len, texts)):,} characters, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
