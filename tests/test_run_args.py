"""args.pickle: safe loading of our runs and of legacy EDM / GAGA-fork runs."""
from __future__ import annotations

import argparse
import os
import pickle

import pytest

from configs.errors import RunFolderError
from configs.run_args import infer_zero_center_h, load_run_args, loads_args, resolved_max_t, save_run_args


class _RunsCommand:
    """A pickle payload that would execute a command when unpickled."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_round_trip(tmp_path):
    args = argparse.Namespace(exp_name="x", nf=64, normalize_factors=[1, 4, 10], max_t=550, zero_center_h=True)
    save_run_args(tmp_path, args)
    loaded = load_run_args(tmp_path)
    assert vars(loaded) == vars(args)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_malicious_pickle_is_refused(tmp_path):
    (tmp_path / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(evil=_RunsCommand())))
    with pytest.raises(ValueError, match="(posix|os)\\.system.*refusing to unpickle"):
        load_run_args(tmp_path)


def test_corrupt_and_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        load_run_args(tmp_path / "nope")
    with pytest.raises(RunFolderError, match="args.pickle is missing"):
        load_run_args(tmp_path)
    (tmp_path / "args.pickle").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable args pickle"):
        load_run_args(tmp_path)
    with pytest.raises(ValueError, match="expected an argparse.Namespace"):
        loads_args(pickle.dumps([1, 2, 3]))


def test_mode_inference_for_legacy_runs():
    edm = argparse.Namespace(diffusion_steps=1000)
    gaga = argparse.Namespace(diffusion_steps=1000, max_t=550)
    assert infer_zero_center_h(edm) is False and resolved_max_t(edm) == 1000
    assert infer_zero_center_h(gaga) is True and resolved_max_t(gaga) == 550
    explicit = argparse.Namespace(diffusion_steps=1000, max_t=550, zero_center_h=False)
    assert infer_zero_center_h(explicit) is False
