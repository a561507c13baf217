"""Bilingual SentencePiece tokenizer with GLM's special tokens at fixed ids.

Ids 0..7 are fixed for every tokenizer the project trains (checked when a model is loaded):

    0 <pad>   1 <unk>   2 <eos>   3 [MASK]   4 [gMASK]   5 [sMASK]   6 <sop>   7 <eop>

then the 256 byte-fallback pieces (<0x00>..<0xFF>, ids 8..263), then the learned pieces.
``<unk>`` exists because SentencePiece requires it, but byte fallback means no text ever maps
to it. The mask/sop/eop tokens are *control* symbols: text that contains the string "[MASK]"
is tokenised as ordinary characters, so a corpus cannot inject a special token.

How the tokenizer is trained, and why with these settings: moe_morpheus/data/train_tokenizer.py.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
MASK_ID, GMASK_ID, SMASK_ID, SOP_ID, EOP_ID = 3, 4, 5, 6, 7
SPECIAL_PIECES = {
    PAD_ID: "<pad>", UNK_ID: "<unk>", EOS_ID: "<eos>", MASK_ID: "[MASK]", GMASK_ID: "[gMASK]",
    SMASK_ID: "[sMASK]", SOP_ID: "<sop>", EOP_ID: "<eop>",
}
NUM_BYTE_PIECES = 256
# 8 specials + 256 bytes + at least 64 learned pieces: below that BPE cannot learn even the
# most frequent character pairs and every token is a byte.
MIN_VOCAB_SIZE = len(SPECIAL_PIECES) + NUM_BYTE_PIECES + 64


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or does not have the project's layout."""


class Tokenizer:
    """A loaded SentencePiece model with the fixed special ids checked."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer model {path} not found: train one with "
                f"`python -m moe_morpheus.data.train_tokenizer data_config=conf/data/demo.yaml "
                f"output={path}` or set data.tokenizer")
        self.path = path
        model_bytes = path.read_bytes()
        # The fingerprint keys cached corpora: same bytes -> same token ids.
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        for idx, piece in SPECIAL_PIECES.items():
            if self.sp.id_to_piece(idx) != piece:
                raise TokenizerError(
                    f"tokenizer {path}: id {idx} is {self.sp.id_to_piece(idx)!r}, expected {piece!r}; "
                    f"it was not trained by this project (train one with `python -m moe_morpheus.data.train_tokenizer`)")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_with_masks(self, text: str) -> list[int]:
        """Like ``encode``, but the literal markers ``[MASK]`` and ``[gMASK]`` in the text become
        the mask tokens (``encode`` keeps them as text: corpora may contain those strings)."""
        ids: list[int] = []
        for piece in re.split(r"(\[g?MASK\])", text):
            if piece == "[MASK]":
                ids.append(MASK_ID)
            elif piece == "[gMASK]":
                ids.append(GMASK_ID)
            elif piece:
                ids.extend(self.encode(piece))
        return ids

    def encode_batch(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        """Same ids as ``encode`` on each text, 5x faster on long documents: no piece contains
        "\n" (the trainer sees single lines), so the lines can be encoded separately and in
        parallel (a 2.3 M-character Austen record: 3.1 s whole, 0.64 s by lines). ``threads``:
        SentencePiece threads (default one per core; 1 in each worker of a process pool)."""
        lines = [text.splitlines(keepends=True) for text in texts]
        ids = self.sp.encode([line for parts in lines for line in parts], num_threads=threads or os.cpu_count() or 1)
        out, at = [], 0
        for parts in lines:
            out.append([i for piece_ids in ids[at:at + len(parts)] for i in piece_ids])
            at += len(parts)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; special tokens decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, idx: int) -> str:
        return self.sp.id_to_piece(int(idx))
