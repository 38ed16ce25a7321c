"""Issue 10's failures, one test each (every one failed on the code before the fix).

| item | case | command | expected now |
|---|---|---|---|
| 1 | quickstart deletes a folder it did not make | `quickstart.py --exp_name <real run>` (also "", "..", /abs: tests/test_bad_inputs.py) | `error: outputs/<run> exists and was not made by quickstart.py`; folder intact |
| 2 | a new run over an existing one | `main_qm9.py --exp_name <existing run>` | `error: ... already holds a training run (...); continue it with --resume ..., replace it with --overwrite` |
| 2 | --overwrite replaces it | `main_qm9.py --exp_name <existing run> --overwrite` | passes the check (goes on to load data) |
| 3 | --resume after a write cut mid-row | `Gaussianity_test.py ... --resume` | the cut row's chunk is recomputed; results equal an uninterrupted run |
| 3 | --resume on a file with glued rows, twice | `Gaussianity_test.py ... --resume` (x2) | malformed rows dropped, complete chunks kept, nothing deleted |
| 4 | stale temp files of killed atomic writes | any atomic write into the folder | `.<name>.<dead pid>.*.tmp` removed; a live writer's kept |
| 5 | a pass cell edited to 'x' | `GAGA_step_estimation.py --data_root <folder>` | `error: <file>, line 3, column 'pass': 'x' is not 0 or 1` |
| 5 | pass cells "0"/"1" as text | `GAGA_step_estimation.py` | "0" is False (was True via astype(bool)) |
| 6 | edited training-SMILES cache | novelty of eval_analyze / GAGA_test | the cache's own SMILES are checked (sha1); an edit is recomputed |
| 6 | --normalize_factors [1,0,10], --dataset_var nan/inf/0, --checkpoint_every_steps -1 | main_qm9 / GAGA_test | one-line errors (tests/test_bad_inputs.py) |
| 7 | every flag of every script | all scripts | tests/test_bad_inputs.py (matrix, no data or model touched) |
| 8 | read-only run folder | `GAGA_test.py --model_path <read-only run>` | prints the table, `note: ... not writable`, exit 0 |
| 8 | --out_dir | `GAGA_test.py --model_path <run> --out_dir <dir>` | report and log in <dir>, nothing written in the run |
| 8 | read-only run folder | `eval_analyze.py --model_path <read-only run>` | metrics printed, `note: ...`, exit 0 |
| 9 | GEOM record with atomic number 200 | `build_geom_dataset.py --data_dir <dir>` | `error: <file>: record 0, molecule 'X': conformer 0 has atomic number(s) [200] ...` |
| 10 | weights of another size than args.pickle | `GAGA_test.py --model_path <run>` | `error: checkpoint ... holds a network with nf=32 ...` before any model is built |
| 10 | args.pickle with datadir=/elsewhere | `GAGA_test.py --model_path <run>` | caches stay in qm9/temp (or --datadir) |
| 10 | malicious weights | `GAGA_test.py --model_path <run>` | full reason (posix.system), never "weights_only=False" |
| 11 | full disk | `GAGA_step_estimation.py` writing gaga_step.json | `error: cannot write <path>: the disk is full; ...` (exit 1) |
| 11 | full disk during a checkpoint | training's atomic torch.save | OSError ENOSPC naming resume_state.pt (not torch's RuntimeError), no temp left |
| 11 | NaN stop hint | training with --output_root elsewhere | hint names `--resume <output_root>/<exp_name>` (tests/test_training.py) |
| 11 | --compare with a bad stride | `GAGA_test.py --compare --ddim_stride 3` | names --ddim_stride (tests/test_bad_inputs.py) |
| 11 | corrupt config.json on --resume | `Gaussianity_test.py --resume` | `error: <out_dir>/config.json is unreadable (...)` |
| 11 | legacy resume with a foreign optim.npy | `main_qm9.py --resume <legacy run>` | `error: <run>/optim.npy does not fit this model's optimiser (...)` |
| 11 | first novelty cache | eval_analyze / GAGA_test | `computing the SMILES of N training molecules for novelty (once; cached in ...)` on stderr |
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pandas as pd
import pytest
import torch

import GAGA_step_estimation
import GAGA_test
import eval_analyze
import quickstart
from configs import atomic_io
from configs.datasets_config import get_dataset_info
from configs.errors import CheckpointError, DataError, RunFolderError
from configs.run_args import save_run_args
from gaga.data import Features, centre_per_molecule
from gaga.gaussianity import GaussianityConfig
from gaga.gaussianity_run import run_gaussianity_test
from gaga.schedule import gamma_table_from_flags
from gaga.step_estimation import load_results
from qm9.models import get_model
from training.args import default_args


def tiny_args(**changes) -> argparse.Namespace:
    args = default_args("qm9")
    fields = dict(nf=16, n_layers=1, diffusion_steps=20, max_t=10, dataset_var=0.848, zero_center_h=True,
                  include_charges=False, diffusion_noise_schedule="polynomial_2", ema_decay=0.999)
    for key, value in {**fields, **changes}.items():
        setattr(args, key, value)
    return args


def tiny_run(folder: Path, weights_args: argparse.Namespace | None = None, **changes) -> Path:
    """args.pickle and weights of an untrained tiny model (weights of ``weights_args`` if given)."""
    args = tiny_args(**changes)
    torch.manual_seed(0)
    model, _, _ = get_model(weights_args or args, "cpu", get_dataset_info("qm9", False), None)
    save_run_args(folder, args)
    torch.save(model.state_dict(), folder / "generative_model_ema.npy")
    torch.save(model.state_dict(), folder / "generative_model.npy")
    return folder


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------ item 1


def test_1_quickstart_never_deletes_a_folder_it_did_not_make(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real = tmp_path / "outputs" / "edm_qm9_GA_550"
    real.mkdir(parents=True)
    (real / "generative_model_ema.npy").write_bytes(b"months of training")
    with pytest.raises(SystemExit) as stop:
        quickstart.main(["--exp_name", "edm_qm9_GA_550"])
    assert stop.value.code == 2
    assert "exists and was not made by quickstart.py" in one_error_line(capsys.readouterr().err)
    assert (real / "generative_model_ema.npy").read_bytes() == b"months of training"
    # A folder an earlier quick start made (it holds the marker) is rebuilt.
    ours = tmp_path / "outputs" / "qs"
    ours.mkdir()
    (ours / quickstart.MARKER).write_text("")
    (ours / "report.md").write_text("old")
    quickstart.claim_run_folder(ours)
    assert sorted(p.name for p in ours.iterdir()) == [quickstart.MARKER]


# ------------------------------------------------------------------ item 2


def test_2_a_new_run_never_overwrites_an_existing_one(tmp_path, capsys, monkeypatch):
    import main_qm9
    import qm9.dataset

    run = tmp_path / "edm_qm9"
    save_run_args(run, tiny_args())
    (run / "generative_model.npy").write_bytes(b"best model")
    argv = ["--exp_name", "edm_qm9", "--output_root", str(tmp_path), "--diffusion_noise_schedule", "polynomial_2"]
    with pytest.raises(SystemExit) as stop:
        main_qm9.main(argv)
    line = one_error_line(capsys.readouterr().err)
    assert stop.value.code == 2 and "already holds a training run" in line and "--resume" in line and "--overwrite" in line
    assert (run / "generative_model.npy").read_bytes() == b"best model"

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(qm9.dataset, "retrieve_dataloaders", reached)
    with pytest.raises(Reached):  # --overwrite gets past the check, on to loading the data
        main_qm9.main([*argv, "--overwrite"])


# ------------------------------------------------------------------ item 3

GAMMA = gamma_table_from_flags("polynomial_2", 1000, 1e-5)


def small_features() -> Features:
    rng = np.random.default_rng(0)
    sizes = rng.integers(4, 8, size=24)
    mask = np.arange(8)[None, :] < sizes[:, None]
    values = centre_per_molecule(rng.normal(size=(24, 8, 8)) * mask[..., None], mask)
    return Features(values, mask, sizes, np.arange(24), {"positions": slice(0, 3), "atom_types": slice(3, 8)})


def _table(folder: Path) -> pd.DataFrame:
    return load_results(folder).sort_values(["index", "t"]).reset_index(drop=True)


def test_3_resume_repairs_a_cut_tail_and_never_deletes_results(tmp_path):
    features, config = small_features(), GaussianityConfig(timesteps=(300, 500, 700))
    run = dict(chunk_size=3, progress=False)
    run_gaussianity_test(features, GAMMA, config, tmp_path / "whole", **run)
    reference = _table(tmp_path / "whole")

    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    path = sorted(cut.glob("results_atoms_*.csv"))[0]
    text = path.read_text()
    path.write_text(text[: len(text) - 7])  # a write cut inside the last row: the row count may still look whole
    summary = run_gaussianity_test(features, GAMMA, config, cut, resume=True, **run)
    assert summary["n_computed"] > 0
    pd.testing.assert_frame_equal(reference, _table(cut))

    glued = tmp_path / "glued"
    shutil.copytree(tmp_path / "whole", glued)
    path = sorted(glued.glob("results_atoms_*.csv"))[0]
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2].rstrip("\n") + lines[-1])  # two rows glued into one
    for _ in range(2):  # a second resume must not delete anything either
        run_gaussianity_test(features, GAMMA, config, glued, resume=True, **run)
        pd.testing.assert_frame_equal(reference, _table(glued))


def test_3_a_file_cut_before_its_first_row_is_moved_aside_not_deleted(tmp_path):
    features, config = small_features(), GaussianityConfig(timesteps=(300, 500, 700))
    run_gaussianity_test(features, GAMMA, config, tmp_path, chunk_size=3, progress=False)
    path = sorted(tmp_path.glob("results_atoms_*.csv"))[0]
    path.write_text("index,split_ro")
    run_gaussianity_test(features, GAMMA, config, tmp_path, chunk_size=3, progress=False, resume=True)
    assert path.with_name(path.name + ".partial").read_text() == "index,split_ro"
    assert path.is_file()  # recomputed


# ------------------------------------------------------------------ item 4


def test_4_stale_temp_files_of_killed_writes_are_removed(tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: never a live process
    stale = tmp_path / f".resume_state.pt.{dead_pid}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".resume_state.pt.{os.getpid()}.xyz789.tmp"
    live.write_bytes(b"being written")
    foreign = tmp_path / "notes.tmp"
    foreign.write_text("not ours")
    atomic_io.atomic_write_bytes(tmp_path / "resume_state.pt", b"new")
    assert not stale.exists() and live.exists() and foreign.exists()
    stale.write_bytes(b"again")
    assert atomic_io.remove_stale_temp_files(tmp_path) == [stale]


# ------------------------------------------------------------------ item 5


def _results_folder(folder: Path, pass_cells: list[str]) -> Path:
    folder.mkdir()
    rows = ["index,split_row,n_atoms,chunk,t,pass"]
    for mol in range(2):
        for t, cell in zip((300, 350, 400), pass_cells):
            rows.append(f"{mol},{mol},5,0,{t},{cell}")
    (folder / "results_atoms_5.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_5_step_estimation_reads_the_pass_columns_with_a_schema(tmp_path, capsys):
    folder = _results_folder(tmp_path / "ok", ["0", "1", "1"])
    assert GAGA_step_estimation.main(["--data_root", str(folder), "--no_plot"]) == 0
    assert json.loads((folder / "gaga_step.json").read_text())["t_star"]["pass"]["t_star_mean"] == 350.0  # "0" is False
    bad = _results_folder(tmp_path / "bad", ["0", "x", "1"])
    with pytest.raises(SystemExit) as stop:
        GAGA_step_estimation.main(["--data_root", str(bad), "--no_plot"])
    line = one_error_line(capsys.readouterr().err)
    assert stop.value.code == 2 and f"{bad / 'results_atoms_5.csv'}, line 3, column 'pass': 'x' is not 0 or 1" in line


# ------------------------------------------------------------------ item 6


def test_6_an_edited_training_smiles_cache_is_recomputed(tmp_path, capsys):
    from qm9.rdkit_functions import get_training_smiles

    info = get_dataset_info("qm9", False)
    positions = np.array([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.2], [0.0, 0.0, 0.0]]])  # C=O... any structure
    train = {"positions": positions, "num_atoms": np.array([2]), "atom_types": np.array([[1, 3, 0]])}
    path = tmp_path / "smiles.json"
    first = get_training_smiles(info, train, path)
    assert "computing the SMILES of 1 training molecules for novelty" in capsys.readouterr().err
    assert get_training_smiles(info, train, path) == first and capsys.readouterr().err == ""  # cached: silent
    record = json.loads(path.read_text())
    record["smiles"] = ["CCO"]  # an edit that keeps the input fingerprint
    path.write_text(json.dumps(record))
    assert get_training_smiles(info, train, path) == first


# ------------------------------------------------------------------ item 8


def _make_unwritable(monkeypatch, folder: Path) -> None:
    """Root ignores file modes, so a read-only folder is simulated where the scripts probe it."""
    real = atomic_io.unwritable_reason

    def probe(path):
        if Path(path).resolve() == folder.resolve():
            return f"{path} is not writable (Read-only file system)"
        return real(path)

    for module in ("configs.atomic_io", "GAGA_test", "eval_analyze"):
        monkeypatch.setattr(f"{module}.unwritable_reason", probe)


def test_8_gaga_test_prints_when_the_run_folder_is_read_only_and_honours_out_dir(tmp_path, monkeypatch, capsys):
    run = tiny_run(tmp_path / "published")
    before = sorted(p.name for p in run.iterdir())
    _make_unwritable(monkeypatch, run)
    flags = ["--model_path", str(run), "--no-cuda", "--no_novelty", "--n_samples", "2", "--batch_size_gen", "2",
             "--iteration", "1", "--GA_timestep", "10"]
    (result,) = GAGA_test.main(flags)
    out = capsys.readouterr()
    assert "not writable" in out.err and "| " in out.out and result["n_samples"] == 2
    assert sorted(p.name for p in run.iterdir()) == before
    GAGA_test.main([*flags, "--out_dir", str(tmp_path / "reports")])
    assert {p.name for p in (tmp_path / "reports").iterdir()} == {
        "GAGA_test_QM9_GA.md", "GAGA_test_QM9_GA.json", "EDM_GA-T=10-Shortcut_log.txt"}
    assert sorted(p.name for p in run.iterdir()) == before


def test_8_eval_analyze_prints_when_the_run_folder_is_read_only(tmp_path, monkeypatch, capsys):
    run = tiny_run(tmp_path / "published")
    before = sorted(p.name for p in run.iterdir())
    _make_unwritable(monkeypatch, run)
    record = eval_analyze.main(["--model_path", str(run), "--no-cuda", "--no_novelty", "--n_samples", "2"])
    out = capsys.readouterr()
    assert "not writable" in out.err and "mol_stable" in out.out and record["n_samples"] == 2
    assert sorted(p.name for p in run.iterdir()) == before


# ------------------------------------------------------------------ item 9


def test_9_geom_builder_rejects_unknown_elements_naming_the_record(tmp_path, capsys):
    import build_geom_dataset

    molecule = {"conformers": [{"totalenergy": -1.0, "xyz": [[200, 0.0, 0.0, 0.0], [6, 1.0, 0.0, 0.0]]}]}
    (tmp_path / "drugs_crude.msgpack").write_bytes(msgpack.packb({"X": molecule}, use_bin_type=True))
    with pytest.raises(SystemExit) as stop:
        build_geom_dataset.main(["--data_dir", str(tmp_path), "--no_progress"])
    line = one_error_line(capsys.readouterr().err)
    assert stop.value.code == 2 and "record 0" in line and "'X'" in line and "atomic number(s) [200]" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drugs_crude.msgpack"]


# ------------------------------------------------------------------ item 10


def test_10_weights_are_checked_against_args_before_a_model_is_built(tmp_path, monkeypatch):
    import qm9.models
    from training.evaluate import load_run

    run = tiny_run(tmp_path / "mixed", weights_args=tiny_args(nf=32))
    monkeypatch.setattr(qm9.models, "get_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(CheckpointError, match="holds a network with nf=32, n_layers=1, but the run's args.pickle says nf=16"):
        load_run(run, torch.device("cpu"))


def test_10_an_args_pickle_does_not_choose_where_caches_go(tmp_path, capsys):
    from training.evaluate import read_run_args

    run = tiny_run(tmp_path / "run", datadir=str(tmp_path / "anywhere"))
    assert read_run_args(run).datadir == "qm9/temp"
    assert "outside the working folder" in capsys.readouterr().err
    assert read_run_args(run, datadir="my/data").datadir == "my/data"
    assert read_run_args(tiny_run(tmp_path / "rel", datadir="data/qm9")).datadir == "data/qm9"
    assert read_run_args(tiny_run(tmp_path / "up", datadir="../../etc")).datadir == "qm9/temp"


class _RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_10_malicious_weights_give_the_whole_reason_and_no_advice_to_disable_the_safe_loader(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    torch.save({"w": _RunsCommand()}, run / "generative_model_ema.npy")
    with pytest.raises(SystemExit) as stop:
        GAGA_test.main(["--model_path", str(run), "--no-cuda", "--no_novelty", "--n_samples", "2", "--batch_size_gen", "2"])
    line = one_error_line(capsys.readouterr().err)
    assert stop.value.code == 2 and "posix.system" in line and "refused" in line
    assert "weights_only" not in line


# ------------------------------------------------------------------ item 11


def test_11_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    folder = _results_folder(tmp_path / "r", ["0", "1", "1"])
    target = folder / "gaga_step.json"

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SystemExit) as stop:
        GAGA_step_estimation.main(["--data_root", str(folder), "--no_plot"])
    assert stop.value.code == 1
    assert one_error_line(capsys.readouterr().err) == f"error: cannot write {target}: the disk is full; free space or choose another output folder"


def test_11_a_corrupt_config_json_is_named(tmp_path):
    features, config = small_features(), GaussianityConfig(timesteps=(300, 500, 700))
    run_gaussianity_test(features, GAMMA, config, tmp_path, chunk_size=3, progress=False)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DataError, match=f"{tmp_path / 'config.json'} is unreadable"):
        run_gaussianity_test(features, GAMMA, config, tmp_path, chunk_size=3, progress=False, resume=True)


def test_11_a_legacy_resume_with_a_foreign_optimiser_file_is_one_line(tmp_path, qm9_datadir, one_thread):
    from training.run import main

    run = tmp_path / "legacy"
    args = tiny_args(exp_name="legacy", datadir=str(qm9_datadir), data_subset=16, batch_size=8, n_epochs=1,
                     visualize_every_batch=0, n_stability_samples=0, output_root=str(tmp_path))
    tiny_run(run, **vars(args))
    torch.save({"state": {}, "param_groups": [{"params": [0]}]}, run / "optim.npy")  # another model's optimiser
    with pytest.raises(CheckpointError, match=f"{run / 'optim.npy'} does not fit this model's optimiser"):
        main(["--resume", str(run)])
    (run / "optim.npy").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"{run / 'optim.npy'} is unreadable"):
        main(["--resume", str(run)])


# ------------------------------------------------------------------ issue 11: library errors are exceptions


def test_library_errors_are_catchable_exceptions_not_system_exit(tmp_path):
    from training.evaluate import load_run

    with pytest.raises(RunFolderError, match="does not exist"):
        load_run(tmp_path / "bad", torch.device("cpu"))
    try:
        load_run("bad", torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - what a notebook writes
        assert isinstance(e, RunFolderError)


LIBRARY_ROOMS = ("configs", "egnn", "equivariant_diffusion", "qm9", "training", "gaga")


def test_no_system_exit_in_library_code():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for room in LIBRARY_ROOMS:
        for path in (root / room).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if ("raise SystemExit" in line or "sys.exit(" in line) and "CliExit" not in line:
                    offenders.append(f"{path.relative_to(root)}:{number}")
    assert offenders == []


def test_bond_tables_are_read_on_first_use_not_at_import():
    import importlib

    import qm9.bond_analyze as bond_analyze

    importlib.reload(bond_analyze)
    assert bond_analyze._tables.cache_info().currsize == 0
    assert bond_analyze.margin1 == 10 and bond_analyze._tables.cache_info().currsize == 1


def test_11_a_full_disk_during_a_checkpoint_names_the_checkpoint_not_a_temp_file(tmp_path, monkeypatch):
    """torch.save turns write()'s OSError into a RuntimeError; the atomic write recovers it."""
    from training.checkpoint import atomic_torch_save

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(atomic_io.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as error:
        atomic_torch_save({"w": torch.zeros(1000)}, tmp_path / "resume_state.pt")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "resume_state.pt")
    assert list(tmp_path.iterdir()) == []  # no temp file left behind
