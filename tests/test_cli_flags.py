"""One flag vocabulary across ``python -m ddm.assemble``, ``ddm.generate`` and ``ddm.evaluate``: the canonical
``--num-steps``, ``--cfg-scale``, ``--num-frames`` and the deprecated old spellings ``--steps``, ``--cfg``,
``--frames`` parse to the same attribute and value (argument parsing only; nothing is generated)."""
from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from ddm.evaluate import build_parser as evaluate_parser
from ddm.assemble import build_parser as export_parser
from ddm.generate import parse_args as generate_parse_args

# (canonical, old, value, the attribute the CLI's code reads)
GENERATE_FLAGS = [("--num-steps", "--steps", "7", "steps", 7), ("--cfg-scale", "--cfg", "2.5", "cfg", 2.5),
                  ("--num-frames", "--frames", "13", "frames", 13)]
EVALUATE_FLAGS = [("--num-steps", "--steps", "7", "steps", 7), ("--cfg-scale", "--cfg", "2.5", "cfg", 2.5),
                  ("--num-frames", "--frames", "13", "num_frames", 13)]
EXPORT_FLAGS = [("--num-steps", "--steps", "7", "num_steps", 7), ("--cfg-scale", "--cfg", "2.5", "cfg_scale", 2.5)]


def _generate(extra: list[str]) -> argparse.Namespace:
    return generate_parse_args(["--model", "m", "--prompt", "a cat", *extra])


def _evaluate(extra: list[str]) -> argparse.Namespace:
    return evaluate_parser().parse_args(["--model", "a=m", "--baseline", "a", "--out", "o", *extra])


def _export(extra: list[str]) -> argparse.Namespace:
    return export_parser().parse_args(["--runs", "r", "--out", "o", *extra])


CASES = ([(_generate, *f) for f in GENERATE_FLAGS] + [(_evaluate, *f) for f in EVALUATE_FLAGS]
         + [(_export, *f) for f in EXPORT_FLAGS])


@pytest.mark.parametrize("parse,new,old,text,dest,value", CASES,
                         ids=[f"{c[0].__name__[1:]}{c[1]}" for c in CASES])
def test_old_and_new_spelling_parse_to_the_same_value(parse, new, old, text, dest, value):
    default = getattr(parse([]), dest)
    assert default is None  # unset: the model folder's default applies, so the value below really came from argv
    assert getattr(parse([new, text]), dest) == value
    assert getattr(parse([old, text]), dest) == value


def _generate_help() -> str:
    # parse_args builds its parser inside: --help prints the text to stdout and exits
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        generate_parse_args(["--help"])
    return buffer.getvalue()


@pytest.mark.parametrize("help_text,flags", [(_generate_help, GENERATE_FLAGS),
                                             (lambda: evaluate_parser().format_help(), EVALUATE_FLAGS),
                                             (lambda: export_parser().format_help(), EXPORT_FLAGS)],
                         ids=["generate", "evaluate", "export"])
def test_help_names_the_canonical_flag_first_and_marks_the_old_one_deprecated(help_text, flags):
    text = " ".join(help_text().split())  # argparse wraps lines: compare word streams
    for new, old, *_ in flags:
        assert f"{new} " in text and f"{old} is a deprecated alias" in text
        assert text.index(f"{new} ") < text.index(f"{old} ")  # the canonical spelling is the one shown first


def test_the_old_assemble_name_still_runs_with_a_deprecation_note(tmp_path):
    """``python -m ddm.export`` (this CLI's name before it became ``ddm.assemble``) warns and runs the same CLI."""
    import importlib
    import subprocess
    import sys
    import warnings

    sys.modules.pop("ddm.export", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("ddm.export")
    assert any(issubclass(w.category, DeprecationWarning) and "ddm.assemble" in str(w.message) for w in caught)
    from ddm.assemble import main

    assert old.main is main
    res = subprocess.run([sys.executable, "-m", "ddm.export", "--runs", str(tmp_path / "none"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "use python -m ddm.assemble" in res.stderr
    assert "no expert" in res.stderr.lower() or str(tmp_path / "none") in res.stderr  # the real CLI ran and refused
    assert not (tmp_path / "out").exists()
