"""Every verb and sub-verb of `avatar` prints its help (a bare % in a help string used to crash `avatar bench --help`)."""
from __future__ import annotations

import argparse

import pytest

from engine.cli import build_parser


def _verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _verbs(sub, prefix + (name,))
    return out


@pytest.mark.parametrize("verb", _verbs(build_parser()), ids=lambda v: " ".join(v) or "avatar")
def test_help_prints(verb: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*verb, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
