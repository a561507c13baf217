"""Generation: the key/value cache gives the same tokens as full recomputation, [MASK] filling keeps
the text around the blanks, bad prompts fail clearly, and TP=2 generates what TP=1 does."""

from __future__ import annotations

import pytest
import torch

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from moe_morpheus.data.tokenizer import EOP_ID, EOS_ID, GMASK_ID, MASK_ID
from moe_morpheus.inference.generate import GenerationError, Generator, Sampling, _filter, main, marked_text
from tests.helpers.distributed import run_distributed
from tests.helpers.presets import TINY_GLM

MODEL = dict(TINY_GLM, vocab_size=300, seq_length=96)
PROMPTS = {
    "gmask": list(range(20, 40)),
    "masks": [21, 22, MASK_ID, 23, 24, 25, MASK_ID, 26],
}


def _generator(rope: str = "2d", moe: dict | None = None, tp: int = 1, seed: int = 3) -> Generator:
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize

    cfg = ModelConfig(**dict(MODEL, rope=rope))
    parallel = ParallelConfig(tp=tp)
    initialize(parallel, cfg)
    model = build_model(cfg, MoEConfig(**moe) if moe else None, parallel, seed=seed)[0]
    return Generator(model, vocab_size=cfg.vocab_size, seq_length=cfg.seq_length)


@pytest.mark.parametrize("rope,moe", [("2d", None), ("1d", None), ("2d", dict(layer_freq=1, num_experts=4))],
                         ids=["2d", "1d", "moe"])
@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=12), Sampling(12, temperature=1.0, top_k=50, seed=4)],
                         ids=["greedy", "sampled"])
def test_cache_equals_recomputation(rope, moe, sampling):
    generator = _generator(rope, moe)
    for prompt in PROMPTS.values():
        cached = generator.generate(prompt, sampling, use_cache=True)
        full = generator.generate(prompt, sampling, use_cache=False)
        assert cached == full
        assert any(cached[1])  # something was generated


def test_mask_filling_keeps_the_text_around_the_blanks():
    text, spans = _generator().generate(PROMPTS["masks"], Sampling(max_new_tokens=5))
    assert len(spans) == 2
    first, second = spans
    assert text == [21, 22, *first, 23, 24, 25, *second, 26]
    assert all(t not in (EOP_ID, EOS_ID, MASK_ID, GMASK_ID) for t in first + second)


def test_gmask_is_appended_when_the_prompt_has_no_mask():
    text, spans = _generator().generate(PROMPTS["gmask"], Sampling(max_new_tokens=6))
    assert text == PROMPTS["gmask"] + spans[0]


def test_bad_prompts():
    generator = _generator()
    with pytest.raises(GenerationError, match="the prompt is empty"):
        generator.generate([])
    with pytest.raises(GenerationError, match="needs 130 positions but the model was trained with seq_length=96"):
        generator.generate(list(range(10, 90)), Sampling(max_new_tokens=48))


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(_filter(logits, 2, 1.0)).tolist() == [True, True, False, False]
    # The smallest prefix reaching 0.7 is {0.5, 0.3}.
    assert torch.isfinite(_filter(logits, 0, 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(_filter(logits, 0, 0.4)).tolist() == [True, False, False, False]


def _generate_at(tp: int):
    generator = _generator(tp=tp)
    return [generator.generate(p, Sampling(10, temperature=0.8, top_p=0.9, seed=2)) for p in PROMPTS.values()]


@pytest.mark.slow
def test_tensor_parallel_generation_equals_one_process():
    reference = run_distributed(_generate_at, 1, 1)[0]
    for result in run_distributed(_generate_at, 2, 2):
        assert result == reference


def test_prompt_markers_become_mask_tokens(demo_tokenizer):
    tokenizer = demo_tokenizer
    ids = tokenizer.encode_with_masks("Elizabeth [MASK] Darcy. 天下大势[gMASK]")
    assert ids.count(MASK_ID) == 1 and ids[-1] == GMASK_ID
    assert tokenizer.decode(ids) == "Elizabeth  Darcy. 天下大势"
    assert tokenizer.encode("[MASK]") != [MASK_ID]  # plain encode keeps the text


def test_fills_are_marked_in_the_printed_text(demo_tokenizer):
    tok = demo_tokenizer
    prompt = tok.encode_with_masks("The capital of France is [MASK], and of Italy [MASK].")
    spans = [tok.encode("Paris"), tok.encode("Rome")]
    assert marked_text(tok, prompt, spans) == "The capital of France is [[Paris]], and of Italy [[Rome]]."
    # A continuation after the implicit [gMASK]; the space before it stays outside the marks.
    assert marked_text(tok, tok.encode("Once upon a"), [tok.encode(" time there was")]) == \
        "Once upon a [[time there was]]"
    assert marked_text(tok, prompt, [[], spans[1]]) == "The capital of France is [[]], and of Italy [[Rome]]."


@pytest.mark.parametrize("args,message", [
    (["prompt="], "the prompt is empty: give the text to continue or to fill"),
    (["prompt=   "], "the prompt is empty"),
    (["file=nowhere.txt"], "file=nowhere.txt: no such file; give a text file with one prompt per line"),
    (["prompt=a", "file=b"], "give exactly one of prompt=TEXT or file=PATH"),
], ids=["empty", "blank", "no-file", "both"])
def test_prompt_mistakes_are_one_line_before_any_checkpoint_is_read(tmp_path, capsys, args, message):
    # The checkpoint does not exist either: the prompt is checked first, before anything is loaded.
    assert main([f"checkpoint={tmp_path / 'nowhere'}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
