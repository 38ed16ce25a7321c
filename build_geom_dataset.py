"""Build EDM's GEOM-Drugs files from GEOM's drugs_crude.msgpack (see qm9/data/geom.py).

    python build_geom_dataset.py --data_dir data/geom [--conformations 30] [--remove_h]

Writes geom_drugs_{C}.npy, geom_drugs_n_{C}.npy and geom_drugs_smiles.txt beside the input
(or into --out_dir); with --remove_h, geom_drugs_no_h_{C}.npy and geom_drugs_n_no_h_{C}.npy.
"""
from __future__ import annotations

import argparse
import time

from configs.errors import UserInputError, cli_errors
from configs.flags import at_least, check_flags, compact_errors
from qm9.data.geom import DEFAULT_CONFORMATIONS, DEFAULT_DATA_FILE, DEFAULT_DATADIR, build_geom_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = compact_errors(argparse.ArgumentParser(description="Convert GEOM's drugs_crude.msgpack into EDM's conformer files."))
    parser.add_argument("--data_dir", default=DEFAULT_DATADIR, help="folder holding the msgpack file (default: %(default)s)")
    parser.add_argument("--data_file", default=DEFAULT_DATA_FILE, help="msgpack file name inside --data_dir (default: %(default)s)")
    parser.add_argument("--conformations", type=int, default=DEFAULT_CONFORMATIONS,
                        help="lowest-energy conformers kept per molecule (default: %(default)s)")
    parser.add_argument("--remove_h", action="store_true", help="drop hydrogen atoms (rows with Z == 1)")
    parser.add_argument("--out_dir", default=None, help="output folder (default: --data_dir)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    check_flags(args, {"conformations": at_least(1, high=100_000)})
    if not str(args.data_file).strip() or not str(args.data_dir).strip():
        raise UserInputError("--data_dir and --data_file must not be empty")
    return args


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    result = build_geom_dataset(args.data_dir, args.data_file, args.conformations, args.remove_h, args.out_dir,
                                progress=not args.no_progress)
    print(f"{result['molecules']} molecules, {result['conformers']} conformers, {result['atoms']} atoms "
          f"in {time.perf_counter() - start:.1f} s:")
    for path in result["paths"].values():
        print(f"  {path}")


if __name__ == "__main__":
    main()
