"""Tokenizer: fixed special ids, exact zh/en round trips, training, clear errors."""

from __future__ import annotations

import gzip
import io
import json

import pytest
import sentencepiece as spm

from moe_morpheus.config.data import DataConfig, resolve_path
from moe_morpheus.data import tokenizer as T
from moe_morpheus.data import train_tokenizer as TT

MIXED = [
    "话说天下大势，分久必合，合久必分。 Emma Woodhouse, handsome, clever, and rich.",
    "  leading spaces,\ttabs,\n\nblank lines\r\nand CRLF  ",
    "全角（括号）与ｆｕｌｌ-width ＡＢＣ１２３ and ligature ﬁ, e\u0301 vs é",
    "emoji 😀 and rare 龘 䨻 and [MASK] <eos> typed as text",
    "数字 3.14159 and 2024年12月31日",
]


def test_special_ids_are_fixed(demo_tokenizer):
    expected = ["<pad>", "<unk>", "<eos>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]
    assert [demo_tokenizer.id_to_piece(i) for i in range(8)] == expected
    assert (T.PAD_ID, T.UNK_ID, T.EOS_ID, T.MASK_ID, T.GMASK_ID, T.SMASK_ID, T.SOP_ID, T.EOP_ID) == tuple(range(8))
    assert demo_tokenizer.id_to_piece(8) == "<0x00>" and demo_tokenizer.id_to_piece(263) == "<0xFF>"
    assert demo_tokenizer.vocab_size == 8192


@pytest.mark.parametrize("text", MIXED)
def test_round_trip_exact(demo_tokenizer, text):
    ids = demo_tokenizer.encode(text)
    assert demo_tokenizer.decode(ids) == text
    assert T.UNK_ID not in ids
    # Special-token strings in text stay text: a corpus cannot inject control tokens.
    assert not set(ids) & {T.MASK_ID, T.GMASK_ID, T.SMASK_ID, T.SOP_ID, T.EOP_ID, T.EOS_ID, T.PAD_ID}


def test_round_trip_corpus_documents(demo_tokenizer):
    docs = []
    for name in ("en_austen", "zh_sanguo"):
        with gzip.open(resolve_path(f"data/demo_corpus/{name}.jsonl.gz"), "rt") as f:
            docs += [json.loads(line)["text"] for _, line in zip(range(5), f)]
    ids = demo_tokenizer.encode_batch(docs)
    assert [demo_tokenizer.decode(x) for x in ids] == docs
    # Line-wise batch encoding gives exactly the ids of whole-text encoding.
    assert ids == [demo_tokenizer.encode(d) for d in docs]


def test_chinese_is_compressed(demo_tokenizer):
    text = "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。"
    ids = demo_tokenizer.encode(text)
    assert len(ids) < len(text)  # multi-character pieces, not one byte token per UTF-8 byte
    assert not any(demo_tokenizer.sp.is_byte(i) for i in ids)


def test_train_small_tokenizer(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。"] * 50
    tok = TT.train_tokenizer(texts, tmp_path / "t.model", vocab_size=T.MIN_VOCAB_SIZE)
    assert [tok.id_to_piece(i) for i in range(8)] == list(T.SPECIAL_PIECES.values())
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically


def test_vocab_too_small(tmp_path):
    with pytest.raises(T.TokenizerError, match=r"vocab_size=100 is too small.*special tokens.*byte"):
        TT.train_tokenizer(["some text"], tmp_path / "t.model", vocab_size=100)
    # Big enough for our check but more than SentencePiece can fill from 9 characters.
    with pytest.raises(T.TokenizerError, match="SentencePiece could not train a vocabulary of 5000"):
        TT.train_tokenizer(["some text"], tmp_path / "t.model", vocab_size=5000)


def test_foreign_model_and_missing_file(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 20), model_writer=model,
                                   vocab_size=12, minloglevel=2)
    (tmp_path / "foreign.model").write_bytes(model.getvalue())
    with pytest.raises(T.TokenizerError, match="expected '<pad>'"):
        T.Tokenizer(tmp_path / "foreign.model")
    with pytest.raises(T.TokenizerError, match="not found: train one"):
        T.Tokenizer(tmp_path / "missing.model")


def test_blend_follows_weights():
    cfg = DataConfig()
    shares = cfg.tokenizer_shares()
    assert shares == pytest.approx({"en": 0.45, "zh": 0.315, "parallel": 0.235})
    samples = TT.sample_blend(cfg, max_chars=200_000)
    # Every demo source has more than its share of 200k: each gives exactly its share, held-out included.
    assert {s.name: s.chars for s in samples} == {name: int(share * 200_000) for name, share in shares.items()}
    texts = TT.blend_texts(cfg, max_chars=200_000)
    assert 0.85 * 200_000 <= sum(map(len, texts)) < 200_000  # about 5% held out
    zh = sum(len(t) for t in texts if any("\u4e00" <= c <= "\u9fff" for c in t[:50]))
    assert zh > 0.3 * 200_000  # Sanguo plus the Chinese halves of the pairs


def test_train_command(tmp_path, capsys):
    out = tmp_path / "cli.model"
    demo = resolve_path("data/tokenizer/demo_8k.model")
    assert TT.main([f"data_config={resolve_path('conf/data/demo.yaml')}", "vocab_size=3000", "max_chars=100000",
                    f"output={out}", f"compare={demo}"]) == 0
    tok = T.Tokenizer(out)
    captured = capsys.readouterr()
    assert tok.vocab_size == 3000 and "vocab 3000" in captured.err
    # The table is printed for the new model and the compared one, and written next to the model.
    assert captured.out.count("\nall           en ") == 2 and f"the same text with {demo}" in captured.out
    report = json.loads((tmp_path / "cli.model.json").read_text())
    assert report["settings"]["vocab_size"] == 3000 and report["settings"]["character_coverage"] == 0.9995
    assert report["settings"]["byte_fallback"] is True and report["vocab_size"] == 3000
    assert set(report["sample"]) == {"en", "zh", "parallel"}
    assert sum(s["train_chars"] + s["heldout_chars"] for s in report["sample"].values()) <= 100_000
    assert report["git"] is None or len(report["git"]["commit"]) == 40
    assert [(r["source"], r["lang"]) for r in report["compare"]["compression"]] == \
        [(r["source"], r["lang"]) for r in report["compression"]]
    assert TT.main(["vocab_size=100", f"output={out}"]) == 2
    assert "vocab_size=100 is too small" in capsys.readouterr().err
