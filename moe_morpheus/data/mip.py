"""Multi-task instruction pretraining (MIP) from en-zh pairs: translation both ways.

Each example is a ``[gMASK]`` sequence-to-sequence sample: Part A = prompt + ``[gMASK]``,
Part B = ``<sop>`` + answer, targets = answer + ``<eos>`` (the model learns to stop). A prompt
is ``prefix + source + suffix`` of a template, each part tokenised separately (the tokenizer has
no dummy prefix, so the parts decode to the concatenated string).

Zero-shot evaluation holds out both templates and pairs: training uses the four ``heldout=False``
templates of each direction on the training pairs; ``mip_heldout`` uses the two held-out
templates of each direction on the validation pairs (the same content-hash split as the
infilling data, so no held-out pair is ever trained on, as MIP or as text).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_morpheus.data.infilling import Sample, build_gmask_sample
from moe_morpheus.data.tokenizer import EOS_ID, GMASK_ID, SOP_ID, Tokenizer

DIRECTIONS = ("en-zh", "zh-en")


@dataclass(frozen=True)
class Template:
    direction: str
    prefix: str
    suffix: str
    heldout: bool = False


TEMPLATES = (
    Template("en-zh", "Translate the following English text into Chinese.\n\n", "\n\nChinese: "),
    Template("en-zh", "把下面的英文翻译成中文：\n", "\n译文："),
    Template("en-zh", "English: ", "\nChinese: "),
    Template("en-zh", "英文：", "\n中文："),
    Template("en-zh", "How would you say this in Chinese?\n", "\n", heldout=True),
    Template("en-zh", "请用中文表达下面这段话的意思：", "\n", heldout=True),
    Template("zh-en", "Translate the following Chinese text into English.\n\n", "\n\nEnglish: "),
    Template("zh-en", "把下面的中文翻译成英文：\n", "\n译文："),
    Template("zh-en", "Chinese: ", "\nEnglish: "),
    Template("zh-en", "中文：", "\n英文："),
    Template("zh-en", "What does this Chinese text mean in English?\n", "\n", heldout=True),
    Template("zh-en", "这段中文的英文译文是什么？\n", "\n", heldout=True),
)


class MipTemplates:
    """The templates with their prefix/suffix tokens, split into training and held-out."""

    def __init__(self, tokenizer: Tokenizer):
        self.prefix = [np.asarray(tokenizer.encode(t.prefix), dtype=np.int64) for t in TEMPLATES]
        self.suffix = [np.asarray(tokenizer.encode(t.suffix), dtype=np.int64) for t in TEMPLATES]
        self.overhead = np.array([len(p) + len(s) for p, s in zip(self.prefix, self.suffix)])
        # ids[(direction, heldout)] = template indices
        self.ids = {(d, h): np.array([i for i, t in enumerate(TEMPLATES) if t.direction == d and t.heldout == h])
                    for d in DIRECTIONS for h in (False, True)}

    def example_length(self, template: int, src_len: int, tgt_len: int) -> int:
        """Tokens of the packed sample: prompt + [gMASK] + <sop> + answer (targets: answer + <eos>)."""
        return int(self.overhead[template]) + src_len + 1 + tgt_len + 1

    def build(self, template: int, en: np.ndarray, zh: np.ndarray) -> Sample:
        src, tgt = (en, zh) if TEMPLATES[template].direction == "en-zh" else (zh, en)
        prompt = np.concatenate([self.prefix[template], src, self.suffix[template]])
        return build_gmask_sample(np.concatenate([prompt, tgt, [EOS_ID]]), len(prompt),
                                  gmask_id=GMASK_ID, sop_id=SOP_ID)
