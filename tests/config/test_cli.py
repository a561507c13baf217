"""The one command-line style (moe_morpheus/config/cli.py): key=value arguments against a small
dataclass, typed values, text taken as written, the nearest key suggested, ``--help`` listing
every key, and a prefix that separates a tool's options from the experiment's Hydra overrides."""

from dataclasses import dataclass

import pytest

from moe_morpheus.config import ConfigError
from moe_morpheus.config.cli import option, parse_options


@dataclass
class Options:
    checkpoint: str = option(help="where to read from")
    prompt: str | None = option(None, help="a text")
    items: int = option(32, help="how many")
    rate: float = option(0.5, help="a share")
    verbose: bool = option(False, help="say more")
    seeds: list[int] = option(factory=lambda: [1, 2], help="several")


def parse(*argv: str, prefix: str | None = None):
    return parse_options(Options, list(argv), prog="tool", summary="A tool.", prefix=prefix)


def test_values_are_typed_and_defaults_fill_the_rest():
    options, rest = parse("checkpoint=a/b", "items=4", "rate=1", "verbose=true", "seeds=[3,4,5]")
    assert options == Options("a/b", None, 4, 1.0, True, [3, 4, 5]) and rest == []
    assert isinstance(options.rate, float)
    assert parse("checkpoint=x")[0] == Options("x")
    assert parse("checkpoint=x", "rate=1e-3")[0].rate == 0.001  # YAML 1.1 would read "1e-3" as text
    assert parse("checkpoint=x", "prompt=null")[0].prompt is None  # a field that may be empty


def test_text_is_taken_as_written_not_as_yaml():
    # "[MASK] is ..." is not YAML, and "a: b" would become a mapping if it were read as YAML.
    for text in ("[MASK] is the capital", "Note: yes, no", "天下大势，[MASK]久必合。", "3"):
        assert parse("checkpoint=x", f"prompt={text}")[0].prompt == text


@pytest.mark.parametrize(("argv", "message"), [
    (["checkpoint=x", "itemz=3"], "unknown config key itemz: did you mean items?"),
    (["checkpoint=x", "items=many"], "items=many: expected int"),
    (["checkpoint=x", "items=true"], "items=true: expected int"),
    (["checkpoint=x", "seeds=3"], r"seeds=3: expected a list, e.g. seeds=\[1,2\]"),
    (["checkpoint=x", "seeds=[1,x]"], "seeds=x: expected int"),
    (["checkpoint=null"], "checkpoint=null: checkpoint needs a value, it cannot be empty"),
    (["checkpoint=x", "items="], "items=: items needs a value"),
    (["checkpoint=x", "items=1", "items=2"], "items is given twice: give it once"),
    (["items=3"], r"missing checkpoint=\.\.\. \(python -m tool --help lists the keys\)"),
    (["--checkpoint", "x"], r"--checkpoint: arguments are key=value, e.g. checkpoint=\.\.\."),
])
def test_bad_arguments_name_the_problem_and_the_fix(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_a_prefix_separates_the_tools_keys_from_hydra_overrides():
    options, rest = parse("+experiment=dense", "tool.checkpoint=c", "trainer.steps=5", "~trainer.lr", "tool.items=2",
                          prefix="tool")
    assert (options.checkpoint, options.items) == ("c", 2)
    assert rest == ["+experiment=dense", "trainer.steps=5", "~trainer.lr"]
    # The old positional form is refused with the key=value form, not handed to Hydra.
    with pytest.raises(ConfigError, match=r"outputs/dense: arguments are key=value, e.g. tool.checkpoint="):
        parse("outputs/dense", "tool.checkpoint=c", prefix="tool")
    with pytest.raises(ConfigError, match=r"unknown key tool.itemz: did you mean tool.items\? \(keys of tool: "):
        parse("tool.checkpoint=c", "tool.itemz=2", prefix="tool")


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as stop:
        parse("--help")
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m tool key=value ...") and "A tool." in text
    for line in ("checkpoint", "where to read from (required)"), ("prompt", "(default null)"), ("seeds", "[1, 2]"):
        assert any(all(part in row for part in line) for row in text.splitlines()), line


def test_every_tool_answers_help_and_rejects_a_flag(capsys):
    """Each ``python -m moe_morpheus.<tool>`` parses through the same function."""
    from moe_morpheus.data import train_tokenizer
    from moe_morpheus.inference import evaluate, export, generate
    from moe_morpheus.planning import plan
    from moe_morpheus.report import __main__ as report
    from moe_morpheus.upcycle import __main__ as upcycle
    from moe_morpheus.upcycle import sweep

    tools = [train_tokenizer, evaluate, export, generate, plan, report, upcycle, sweep]
    for tool in tools:
        with pytest.raises(SystemExit) as stop:
            tool.main(["--help"])
        assert stop.value.code == 0 and "keys:" in capsys.readouterr().out, tool.__name__
        assert tool.main(["--bogus"]) == 2, tool.__name__
        assert "arguments are key=value" in capsys.readouterr().err, tool.__name__
    # planning.budget has no keys of its own: its help names the overrides it takes.
    from moe_morpheus.planning import budget

    assert budget.main(["--help"]) == 0 and "Hydra overrides" in capsys.readouterr().out
