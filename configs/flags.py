"""Parsing and checking of command-line values, shared by training, gaga and every script.

* ``parse_bool`` / ``str2bool``: the spellings EDM's ``type=eval`` flags and stored
  ``args.pickle`` files use (True/False, and yes/no, y/n, t/f, 1/0, on/off, none).
* ``parse_number_list`` / ``number_list`` / ``parse_normalize_factors``: '[1,4,10]',
  '[1, 4, 10]', '(1,4,10)', '1,4,10', '1 4 10' or a list; numbers only, never eval.
* ``Rule`` and ``check_flags``: range checks of parsed flags, done before any data is read
  or any model built, each failure a one-line ``UserInputError`` naming the flag.
* ``compact_errors``: argparse's own errors (unknown flag, not an integer) on one line.
"""
from __future__ import annotations

import argparse
import ast
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from configs.errors import UserInputError

_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off", "none"}


def parse_bool(value: object) -> bool:
    """A bool from a bool or any accepted spelling; UserInputError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UserInputError(f"expected True or False, got {value!r}")


def str2bool(text: str | bool) -> bool:
    """``parse_bool`` as an argparse ``type=`` (argparse shows the message)."""
    try:
        return parse_bool(text)
    except UserInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_number_list(value: object, what: str = "value") -> list[float | int]:
    """Numbers from '[1,4,10]', '(1,4,10)', '1,4,10', '1 4 10' or a sequence; ints stay ints."""
    parsed: Any = value
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith(("[", "(")):
            text = "[" + (text if "," in text else ",".join(text.split())) + "]"
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise UserInputError(f"{what} {value!r} is not a list of numbers such as [1,4,10]") from None
        if isinstance(parsed, (int, float)):
            parsed = [parsed]
    if not isinstance(parsed, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in parsed
    ):
        raise UserInputError(f"{what} {value!r} is not a list of numbers such as [1,4,10]")
    return list(parsed)


def number_list(text: str | Sequence[float]) -> list[float | int]:
    """``parse_number_list`` as an argparse ``type=``."""
    try:
        return parse_number_list(text)
    except UserInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_normalize_factors(value: object) -> tuple[float, float, float]:
    """Three finite positive divisors (positions, one-hot, charges); one-line error otherwise."""
    numbers = parse_number_list(value, "--normalize_factors")
    if len(numbers) != 3 or not all(math.isfinite(f) and f > 0 for f in numbers):
        raise UserInputError(
            f"--normalize_factors {value!r} must be three finite positive numbers (positions, one-hot, charges), e.g. [1,4,10]"
        )
    return tuple(float(f) for f in numbers)  # type: ignore[return-value]


@dataclass(frozen=True)
class Rule:
    """What a numeric flag may hold. ``low``/``high`` are inclusive unless ``*_open``."""

    kind: type = float  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None allowed

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return noun + (" " + " and ".join(parts) if parts else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def at_least(low: float, kind: type = int, optional: bool = False, high: float | None = None) -> Rule:
    return Rule(kind, low, high, optional=optional)


def positive(kind: type = float, optional: bool = False, high: float | None = None) -> Rule:
    return Rule(kind, 0, high, low_open=True, optional=optional)


def finite(optional: bool = False) -> Rule:
    return Rule(float, optional=optional)


def check_flags(args: argparse.Namespace | Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Raise a one-line UserInputError for the first flag that breaks its rule (flags absent are skipped)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    for name, rule in rules.items():
        if name not in values:
            continue
        value = values[name]
        if not rule.accepts(value):
            raise UserInputError(f"--{name} must be {rule.describe()}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise UserInputError(f"--{name} {value!r} is not one of: {', '.join(map(str, choices))}")


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+,@-]*$")


def check_plain_name(flag: str, value: str) -> str:
    """A name that becomes one folder or file name: no separators, no '..', not empty."""
    if not isinstance(value, str) or not _PLAIN_NAME.match(value) or value in (".", "..") or len(value) > 200:
        raise UserInputError(
            f"{flag} {value!r} must be a plain folder name (letters, digits, _ . - =, no '/' or '..'), e.g. edm_qm9"
        )
    return value


def compact_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser``'s own errors one line on stderr (``error: <prog>: <message> (see --help)``), status 2."""
    from configs.errors import CliExit

    def error(message: str) -> None:  # argparse calls this for unknown flags, bad types, missing values
        text = f"{parser.prog}: {' '.join(message.split())} (see --help)"
        print(f"error: {text}", file=sys.stderr, flush=True)
        raise CliExit(2, text)

    parser.error = error  # type: ignore[method-assign]
    return parser
