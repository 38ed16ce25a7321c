"""configs/flags.py: the one parser of booleans and number lists (training and gaga), range rules, one-line errors."""
from __future__ import annotations

import argparse
import math

import pytest

from configs.errors import CliExit, EnvironmentProblem, RunFolderError, UserInputError, cli_errors
from configs.flags import (
    Rule, at_least, check_flags, check_plain_name, compact_errors, number_list, parse_bool, parse_normalize_factors,
    parse_number_list, positive, str2bool,
)

# Every spelling either old parser accepted (training/args.py str2bool, gaga/data.py parse_bool).
TRUE_SPELLINGS = ["True", "true", "TRUE", "t", "yes", "y", "1", "on", " True "]
FALSE_SPELLINGS = ["False", "false", "f", "no", "n", "0", "off", "none", "None"]


@pytest.mark.parametrize("text", TRUE_SPELLINGS)
def test_true_spellings(text):
    assert parse_bool(text) is True and str2bool(text) is True


@pytest.mark.parametrize("text", FALSE_SPELLINGS)
def test_false_spellings(text):
    assert parse_bool(text) is False and str2bool(text) is False


def test_bools_pass_through_and_nonsense_is_refused():
    assert parse_bool(True) is True and parse_bool(False) is False
    with pytest.raises(UserInputError, match="expected True or False, got 'maybe'"):
        parse_bool("maybe")
    with pytest.raises(argparse.ArgumentTypeError, match="expected True or False"):
        str2bool("2")


@pytest.mark.parametrize("text", ["[1,4,10]", "[1, 4, 10]", "(1,4,10)", "1,4,10", "1 4 10", [1, 4, 10], (1, 4, 10)])
def test_number_list_spellings(text):
    assert parse_number_list(text) == [1, 4, 10] and number_list(text) == [1, 4, 10]
    assert parse_normalize_factors(text) == (1.0, 4.0, 10.0)


@pytest.mark.parametrize("text", ["[1,4,True]", "abc", "[1,'4',10]", "__import__('os')", "[[1],2,3]", "{1:2}"])
def test_number_list_refuses_anything_but_numbers(text):
    with pytest.raises(UserInputError, match="not a list of numbers"):
        parse_number_list(text)
    with pytest.raises(argparse.ArgumentTypeError):
        number_list(text)


@pytest.mark.parametrize("value", ["[1,0,10]", "[1,-4,10]", [1, math.nan, 10], [1, math.inf, 10], "[1,4]", "[1,4,10,1]"])
def test_normalize_factors_must_be_three_finite_positive_numbers(value):
    with pytest.raises(UserInputError, match="must be three finite positive numbers"):
        parse_normalize_factors(value)


def test_rules_reject_nan_inf_bools_and_out_of_range_values():
    rules = {"nf": at_least(1, high=8), "lr": positive(), "decay": Rule(float, 0, 1, high_open=True), "cut": at_least(1, optional=True)}
    check_flags({"nf": 8, "lr": 1e-4, "decay": 0.0, "cut": None}, rules)
    for bad, message in [
        ({"nf": 0}, "--nf must be an integer >= 1 and <= 8, got 0"), ({"nf": 9}, "--nf must be"), ({"nf": 2.0}, "--nf must be an integer"),
        ({"nf": True}, "--nf must be"), ({"lr": math.nan}, "--lr must be a finite number > 0, got nan"),
        ({"lr": math.inf}, "--lr must be"), ({"lr": 0.0}, "--lr must be"), ({"decay": 1.0}, "< 1"), ({"cut": 0}, "--cut must be"),
    ]:
        with pytest.raises(UserInputError, match=message):
            check_flags(bad, rules)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "/abs", "a/b", "a\\b", "~", " x", "x" * 300])
def test_plain_names_cannot_escape_their_folder(name):
    with pytest.raises(UserInputError, match="plain folder name"):
        check_plain_name("--exp_name", name)


def test_argparse_errors_are_one_line(capsys):
    parser = compact_errors(argparse.ArgumentParser(prog="tool.py"))
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--n", "x"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: tool.py: argument --n: invalid int value: 'x' (see --help)\n"


def test_cli_errors_maps_exceptions_to_one_line_and_status(capsys):
    def raiser(error):
        @cli_errors
        def main():
            raise error
        return main

    for error, code in [(UserInputError("bad flag"), 2), (RunFolderError("bad\n folder"), 2), (EnvironmentProblem("pip"), 1),
                        (ValueError("plain"), 2), (FileNotFoundError("missing"), 2)]:
        with pytest.raises(CliExit) as stop:
            raiser(error)()
        assert stop.value.code == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "\n " not in err
    with pytest.raises(KeyError):  # a bug keeps its traceback
        raiser(KeyError("bug"))()
