"""Command-line plumbing shared by the GAGA scripts: where the molecules and the schedule
come from (a run folder or flags), and one-line errors for user mistakes.
"""
from __future__ import annotations

import argparse
from typing import Callable

import numpy as np

from configs.atomic_io import unwritable_reason
from configs.errors import UserInputError, cli_errors
from configs.flags import Rule, at_least, check_flags, check_plain_name, str2bool
from gaga.data import (
    GEOM_ONLY_FIELDS,
    QM9_DATADIR,
    DataSpec,
    data_spec_from_run,
    dataset_kind,
    geom_data_location,
    parse_normalize_factors,
)


_bool_flag = str2bool

# The source and schedule flags every GAGA script shares (checked before any data is read).
SOURCE_RULES = {
    "filter_n_atoms": at_least(1, optional=True),
    "conformations": at_least(1, optional=True, high=100_000),
    "filter_molecule_size": at_least(1, optional=True),
    "diffusion_steps": at_least(1, high=100_000),
    "diffusion_noise_precision": Rule(float, 0, 1, low_open=True, high_open=True),
    "n_molecules": at_least(1, optional=True),
    "seed": at_least(0, high=2**32 - 1),
}


def check_source_flags(args: argparse.Namespace, rules: dict | None = None) -> None:
    """Range checks of the shared flags (and ``rules``), the dataset name, the normalisation and
    the output folder's name: one-line UserInputError before anything is loaded."""
    check_flags(args, {**SOURCE_RULES, **(rules or {})})
    if getattr(args, "test_name", None) is not None:
        check_plain_name("--test_name", args.test_name)
    if not getattr(args, "model_path", None):
        try:
            dataset_kind(args.dataset)
        except ValueError as e:
            raise UserInputError(f"--dataset: {e}") from None
        parse_normalize_factors(args.normalize_factors)
        if hasattr(args, "diffusion_noise_schedule"):
            try:
                from gaga.schedule import gamma_table_from_flags

                gamma_table_from_flags(args.diffusion_noise_schedule, 4, args.diffusion_noise_precision)
            except ValueError as e:
                raise UserInputError(f"--diffusion_noise_schedule: {e}") from None


def check_output_folder(folder: str, flag: str = "--out_dir") -> None:
    """The results folder must take files (checked before the data is loaded)."""
    reason = unwritable_reason(folder)
    if reason:
        raise UserInputError(f"{flag}: {reason}; choose a writable folder")


def add_source_flags(parser: argparse.ArgumentParser, schedule: bool = True) -> None:
    """--model_path, or the dataset flags (and the schedule flags) with EDM's names and defaults."""
    group = parser.add_argument_group("data and schedule (a run folder, or flags)")
    group.add_argument("--model_path", default=None, help="run folder with args.pickle (outputs/<exp_name>); its dataset, normalisation and schedule are used")
    group.add_argument("--dataset", default="qm9", help="without --model_path: dataset name (qm9 or geom)")
    group.add_argument("--datadir", default=None,
                       help="data folder (default qm9/temp for QM9, data/geom or --data_file's folder for GEOM; overrides the run's)")
    group.add_argument("--split", default="train", choices=("train", "valid", "test"))
    group.add_argument("--remove_h", action="store_true", help="without --model_path: molecules without hydrogens")
    group.add_argument("--include_charges", type=_bool_flag, nargs="?", const=True, default=False,
                       help="without --model_path: append charges/10 as a channel (GAGA's config: False)")
    group.add_argument("--normalize_factors", default="[1,4,10]", help="without --model_path: positions, one-hot, charges divisors")
    group.add_argument("--filter_n_atoms", type=int, default=None, help="keep only molecules with exactly this many atoms")
    group.add_argument("--data_file", default=None, help="GEOM without --model_path: EDM's processed file (e.g. data/geom/geom_drugs_30.npy)")
    group.add_argument("--conformations", type=int, default=None,
                       help="GEOM: conformers per molecule of the build (default: the run's, else from --data_file's name, else 30)")
    group.add_argument("--filter_molecule_size", type=int, default=None, help="GEOM: keep only conformers with at most this many atoms")
    if schedule:
        group.add_argument("--diffusion_noise_schedule", default="polynomial_2")
        group.add_argument("--diffusion_steps", type=int, default=1000)
        group.add_argument("--diffusion_noise_precision", type=float, default=1e-5)


def resolve_data_spec(args: argparse.Namespace) -> DataSpec:
    """The data of a run folder (flags may narrow it: sizes, conformations), or of the dataset flags."""
    if args.model_path:
        spec = data_spec_from_run(args.model_path, datadir=args.datadir)
        overrides = {k: getattr(args, k, None) for k in ("filter_n_atoms", "filter_molecule_size", "conformations")}
        geom_run = dataset_kind(spec.dataset) == "geom"
        overrides = {k: v for k, v in overrides.items() if v is not None and (geom_run or k not in GEOM_ONLY_FIELDS)}
        if overrides:
            spec = DataSpec(**{**spec.__dict__, **overrides})
        return spec
    fields: dict = {}
    datadir = args.datadir or QM9_DATADIR
    if dataset_kind(args.dataset) == "geom":
        datadir, conformations = geom_data_location(args.datadir, args.data_file, args.conformations, bool(args.remove_h))
        fields = dict(conformations=conformations, filter_molecule_size=args.filter_molecule_size)
    return DataSpec(
        dataset=args.dataset,
        datadir=datadir,
        remove_h=bool(args.remove_h),
        include_charges=bool(args.include_charges),
        normalize_factors=parse_normalize_factors(args.normalize_factors),
        filter_n_atoms=args.filter_n_atoms,
        **fields,
    )


def resolve_gamma(args: argparse.Namespace) -> np.ndarray:
    from gaga.schedule import gamma_table_from_flags, gamma_table_from_run  # imports torch: only when needed

    if args.model_path:
        return gamma_table_from_run(args.model_path)
    return gamma_table_from_flags(args.diffusion_noise_schedule, args.diffusion_steps, args.diffusion_noise_precision)


def source_record(args: argparse.Namespace, spec: DataSpec) -> dict:
    """What the numbers were computed from, for the JSON outputs."""
    fields = {k: v for k, v in spec.__dict__.items() if not (k in GEOM_ONLY_FIELDS and v is None)}  # QM9 records stay as they were
    record = {"model_path": args.model_path, "split": args.split, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}}
    if hasattr(args, "diffusion_steps") and not args.model_path:
        record.update(
            diffusion_noise_schedule=args.diffusion_noise_schedule,
            diffusion_steps=args.diffusion_steps,
            diffusion_noise_precision=args.diffusion_noise_precision,
        )
    return record


def one_line_errors(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Turn user mistakes (bad values, missing files, unwritable folders) into 'error: ...' on stderr
    and exit status 2 (1 for the environment): the shared ``configs.errors.cli_errors``."""
    return cli_errors(main)
