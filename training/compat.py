"""Flags accepted for EDM/GeoLDM compatibility that change nothing here.

Published EDM and GeoLDM commands pass some of them (``--trace hutch``, ``--sequential``, ...),
so they must keep parsing; but a researcher who sets one expecting an effect should be told.
``warn_no_op_flags`` warns once per flag and process when one has a non-default value.
"""
from __future__ import annotations

import argparse
import warnings

# flag -> (EDM's default, why it does nothing)
NO_OP_FLAGS: dict[str, tuple[object, str]] = {
    "brute_force": (False, "EDM's normalising-flow option; the diffusion model never reads it"),
    "actnorm": (True, "EDM's normalising-flow option; the diffusion model never reads it"),
    "trace": ("hutch", "EDM's normalising-flow trace estimator; the diffusion model never reads it"),
    "dequantization": ("argmax_variational", "EDM's flow dequantization; the diffusion model never reads it"),
    "sequential": (False, "batches are always shuffled"),
    "generate_epochs": (1, "EDM parses it but never reads it"),
}

_warned: set[str] = set()


def warn_no_op_flags(args: argparse.Namespace) -> list[str]:
    """Warn (once per flag) about no-op flags set to a non-default value; returns those flags."""
    given = [name for name, (default, _) in NO_OP_FLAGS.items()
             if hasattr(args, name) and getattr(args, name) != default]
    for name in given:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"--{name} {getattr(args, name)!r} has no effect here ({NO_OP_FLAGS[name][1]}); "
                "accepted for EDM compatibility", UserWarning, stacklevel=3,
            )
    return given
