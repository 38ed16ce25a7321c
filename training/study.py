"""The equal-budget CPU study: EDM and EDM+GAGA trained identically but for GAGA's switches.

Two run folders under ``outputs/equal_budget/`` (``qm9_edm_small``, ``qm9_gaga_small``) are
trained by ``main_qm9.py`` subprocesses, one thread each, side by side. The runs differ only in
GAGA's flags (``--max_t``, ``--dataset_var``; ``--max_t`` also switches the centred one-hot on);
architecture, seed, batch size, learning rate, EMA and number of optimiser steps are shared.

A session of training ends after ``--hours`` (the runs are stopped and resume exactly from
their last checkpoint, written every ``checkpoint_every_steps`` steps) or when both reach
``--epochs``. Because a later session may run on a fresh machine, each run's resumable state
(``resume_state.pt``, ``args.pickle``, ``metrics.jsonl``, ``train.log``) is copied to
``pretrained/training_state/<run>/`` (committed), and restored from there when the live folder
is missing.

The machinery is generic: a ``Study`` is a set of ``Run``s, each naming the script that trains it
(``main_qm9.py`` for a generator, ``main_qm9_prop.py`` for a property classifier), its flags, its
live folder and where it ships. ``python equal_budget.py`` drives the QM9 study above (the
default); ``python equal_budget.py --study cond_alpha ...`` drives the conditional (alpha) study
of ``training/conditional_study.py`` with the same commands.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence, Union

from configs.atomic_io import atomic_write_bytes
from configs.errors import RunFolderError, UserInputError
from training.study_projection import compare_at_equal_steps, project, stability_points

REPO = Path(__file__).resolve().parents[1]
LIVE_ROOT = Path("outputs/equal_budget")
STATE_ROOT = REPO / "pretrained" / "training_state"
STATE_FILES = ("args.pickle", "resume_state.pt", "metrics.jsonl", "train_summary.log")
# Issue 15's bar for the EDM run's full chain (molecule stability >= 20% needs more atom stability still).
ATOM_STABILITY_BAR = 0.90
MOLECULE_STABILITY_BAR = 0.20  # the bar for EDM's full chain, with the atom one, over 3 x 1,000 molecules
# Lines of train.log worth keeping in the committed summary (the log itself is mostly progress bars).
SUMMARY_MARKERS = ("=== ", "Resuming", "Run folder", "Epoch ", "Val loss", "Best val loss", "Stability at epoch", "stopped")

# The recipe shared by both runs (EDM's QM9 flags with GAGA's README values where they differ:
# no charges, normalize_factors [1,4,10]); the width, depth and learning rate come from the pilot.
COMMON_FLAGS: dict[str, str] = {
    "diffusion_noise_schedule": "polynomial_2",
    "diffusion_noise_precision": "1e-5",
    "diffusion_steps": "1000",
    "diffusion_loss_type": "l2",
    "normalize_factors": "[1,4,10]",
    "include_charges": "False",
    "nf": "64",
    "n_layers": "4",
    "batch_size": "64",
    "lr": "5e-4",
    "ema_decay": "0.999",
    "seed": "1",
    "test_epochs": "2",
    "n_stability_samples": "256",
    "checkpoint_every_steps": "250",
    "no_wandb": "True",
    "no-cuda": "",
}
# The QM9 study's lr decay, decided at epoch 70 when EDM had stopped improving at 5e-4 (both runs
# switch at the same step to EDM's own QM9 lr; pretrained/README.md, "EDM's plateau"), and again
# at epoch 90 when EDM's full chain sat 0.33 points under the molecule bar at 1e-4.
QM9_LR_SCHEDULE = "70:1e-4,90:2e-5"
# Flags a resumed generator is given again, so that a recipe's later addition reaches the run.
RESUME_FLAGS = ("lr_schedule",)
GAGA_T_STAR = 550  # our Gaussianity test's T* on QM9 (README, "Reproduction")
GAGA_DATASET_VAR = 0.848

RUNS: dict[str, dict[str, str]] = {
    "qm9_edm_small": {},
    "qm9_gaga_small": {"max_t": str(GAGA_T_STAR), "dataset_var": str(GAGA_DATASET_VAR)},
}

GENERATOR, CLASSIFIER = "generator", "classifier"
CLASSIFIER_STATE_FILES = ("args.pickle", "resume_state.pt", "losess.json", "best_checkpoint.npy", "train_summary.log")
CLASSIFIER_SUMMARY_MARKERS = ("=== ", "Resuming", "Epoch ", "egnn for", "numnodes for", "stopped")


@dataclass(frozen=True)
class Run:
    """One run of a study: the script that trains it, a fresh start's flags, its live folder's
    parent and where ``ship`` writes it (relative to ``pretrained/``).

    A generator (``main_qm9.py``) trains to the study's ``--epochs`` and resumes at the exact step;
    a classifier (``main_qm9_prop.py``) trains to its own ``fixed_epochs`` (its ``--epochs`` is the
    cosine period, so it cannot change) and resumes at the last finished epoch.
    """
    name: str
    flags: dict
    live_root: Path = LIVE_ROOT
    kind: str = GENERATOR
    fixed_epochs: int | None = None
    ship_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (GENERATOR, CLASSIFIER):
            raise ValueError(f"run {self.name}: kind must be {GENERATOR!r} or {CLASSIFIER!r}")
        if self.kind == CLASSIFIER and not self.fixed_epochs:
            raise ValueError(f"classifier run {self.name} needs fixed_epochs (its cosine period)")

    @property
    def script(self) -> Path:
        return REPO / ("main_qm9.py" if self.kind == GENERATOR else "qm9/property_prediction/main_qm9_prop.py")

    @property
    def state_files(self) -> tuple[str, ...]:
        return STATE_FILES if self.kind == GENERATOR else CLASSIFIER_STATE_FILES

    @property
    def summary_markers(self) -> tuple[str, ...]:
        return SUMMARY_MARKERS if self.kind == GENERATOR else CLASSIFIER_SUMMARY_MARKERS

    def target_epochs(self, epochs: int) -> int:
        """The epoch this run trains to when the study trains to ``epochs``."""
        return epochs if self.fixed_epochs is None else self.fixed_epochs

    def with_flags(self, **flags: str) -> "Run":
        """A copy with some flags replaced (tests: tiny data); ``fixed_epochs`` follows ``epochs``."""
        fixed = int(flags["epochs"]) if self.kind == CLASSIFIER and "epochs" in flags else self.fixed_epochs
        return replace(self, flags={**self.flags, **flags}, fixed_epochs=fixed)

    def command(self, epochs: int, resume: bool, live_root: Path | None = None,
                overrides: dict[str, str] | None = None) -> list[str]:
        """The command line that starts or continues the run."""
        root = self.live_root if live_root is None else live_root
        if self.kind == GENERATOR:
            if resume:
                flags = {**self.flags, **(overrides or {})}
                argv = ["--resume", str(root / self.name), "--n_epochs", str(epochs),
                        *flag_list({k: flags[k] for k in RESUME_FLAGS if k in flags})]
            else:
                argv = ["--exp_name", self.name, "--output_root", str(root), "--n_epochs", str(epochs),
                        *flag_list({**self.flags, **(overrides or {})})]
        elif resume:  # the stored args decide; --outf and --no-cuda may be given again
            argv = ["--exp_name", self.name, "--outf", str(root), "--resume", "--no-cuda"]
        else:
            flags = {**self.flags, **(overrides or {}), "epochs": str(self.fixed_epochs)}
            argv = ["--exp_name", self.name, "--outf", str(root), *flag_list(flags)]
        return [sys.executable, str(self.script), *argv]


QM9_RUNS = tuple(Run(name, {**COMMON_FLAGS, "lr_schedule": QM9_LR_SCHEDULE, **flags}) for name, flags in RUNS.items())


def find_run(run: Union[str, Run]) -> Run:
    """A run given by name (of any study) or as a Run."""
    if isinstance(run, Run):
        return run
    for candidate in QM9_RUNS:  # the QM9 study never needs the other studies' modules
        if candidate.name == run:
            return candidate
    for study in studies().values():
        for candidate in study.runs:
            if candidate.name == run:
                return candidate
    raise UserInputError(f"unknown run {run!r}")


def flag_list(flags: dict[str, str]) -> list[str]:
    out = []
    for key, value in flags.items():
        out += [f"--{key}"] + ([value] if value != "" else [])
    return out


def training_command(run: Union[str, Run], epochs: int, resume: bool, live_root: Path | None = None,
                     overrides: dict[str, str] | None = None) -> list[str]:
    """The command line that starts or continues ``run`` (main_qm9.py or main_qm9_prop.py)."""
    return find_run(run).command(epochs, resume, live_root, overrides)


def _copy_atomic(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, src.read_bytes())


def write_log_summary(run_dir: Path, markers: tuple[str, ...] = SUMMARY_MARKERS) -> Path | None:
    """train_summary.log: the epoch, evaluation and session lines of train.log (no progress bars)."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    keep = []
    for line in log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines():
        line = line.strip()
        if line.startswith(markers):
            keep.append(line)
    return atomic_write_bytes(run_dir / "train_summary.log", ("\n".join(keep) + "\n").encode())


def _live(run: Run, live_root: Path | None) -> Path:
    return (run.live_root if live_root is None else live_root) / run.name


def snapshot(run: Union[str, Run], live_root: Path | None = None, state_root: Path = STATE_ROOT) -> list[Path]:
    """Copy the run's resumable files to the committed state folder; returns what was copied."""
    run = find_run(run)
    live = _live(run, live_root)
    write_log_summary(live, run.summary_markers)
    copied = []
    for name in run.state_files:
        src = live / name
        if src.is_file():
            _copy_atomic(src, state_root / run.name / name)
            copied.append(state_root / run.name / name)
    return copied


def restore(run: Union[str, Run], live_root: Path | None = None, state_root: Path = STATE_ROOT) -> bool:
    """Fill a missing live run folder from the committed state; True if the run can resume."""
    run = find_run(run)
    live = _live(run, live_root)
    if (live / "resume_state.pt").is_file():
        return True
    saved = state_root / run.name
    if not (saved / "resume_state.pt").is_file():
        return False
    for name in run.state_files:
        if (saved / name).is_file():
            _copy_atomic(saved / name, live / name)
    if (saved / "train_summary.log").is_file():  # the log goes on from the summary of earlier sessions
        _copy_atomic(saved / "train_summary.log", live / "train.log")
    print(f"restored {live} from {saved}")
    return True


def run_progress(run_dir: Path) -> dict | None:
    """Where a run folder's resume state is (None without one): epoch / step_in_epoch / global_step
    of a generator; epoch, best_epoch, best_val, best_test of a classifier."""
    path = run_dir / "resume_state.pt"
    if not path.is_file():
        return None
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    if "state" in saved:
        state = saved["state"]
        return {k: int(state[k]) for k in ("epoch", "step_in_epoch", "global_step")}
    log = saved["log"]  # a classifier's (train_classifier.py)
    return {"epoch": int(saved["epoch"]), "best_epoch": int(log["best_epoch"]), "best_val": float(log["best_val"]),
            "best_test": float(log["best_test"])}


def _folder(run: Run, live_root: Path | None, state_root: Path) -> Path:
    """The live folder when it holds a resume state, else the committed state."""
    live = _live(run, live_root)
    return live if (live / "resume_state.pt").is_file() else state_root / run.name


@dataclass
class _Child:
    run: Run
    process: subprocess.Popen
    log: object
    started: float = field(default_factory=time.time)


def _single_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = "1"
    return env


def running_elsewhere(run: Run, live_root: Path | None = None) -> int | None:
    """The id of another process already training ``run`` in this checkout (a run started by hand,
    or another ``train``), else None: two writers on one run folder would corrupt it. Linux /proc."""
    live = _live(run, live_root)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if not any(a.endswith(run.script.name) for a in argv):
            continue
        named = run.name in argv or any(a.rstrip("/").endswith(f"/{run.name}") for a in argv)
        root_flag = "--output_root" if run.kind == GENERATOR else "--outf"
        root = argv[argv.index(root_flag) + 1] if root_flag in argv[:-1] else str(run.live_root)
        if run.kind == GENERATOR and "--resume" in argv[:-1]:
            folder = cwd / argv[argv.index("--resume") + 1]
        else:
            folder = cwd / root / run.name
        if named and folder.resolve() == (REPO / live).resolve():
            return int(entry.name)
    return None


def train(runs: Sequence[Union[str, Run]], epochs: int, hours: float, nice: int = 10, live_root: Path | None = None,
          state_root: Path = STATE_ROOT, overrides: dict[str, str] | None = None, poll_seconds: float = 10.0) -> dict[str, int]:
    """Train (or continue) the runs side by side, one thread each, for at most ``hours``.

    Generators train to ``epochs``, classifiers to their own fixed epochs. Returns each run's exit
    code (0: reached its epochs; -15 or a clean stop: stopped at the deadline). The resumable
    state is snapshotted to ``state_root`` at the end, also on Ctrl-C. ``live_root`` (tests) puts
    every run under one folder instead of its own.
    """
    runs = [find_run(r) for r in runs]
    for run in runs:
        pid = running_elsewhere(run, live_root)
        if pid is not None:
            raise RunFolderError(f"{run.name} is already being trained by process {pid}; let it finish (or stop it "
                                 f"and train again: it resumes), or leave it out with --runs")
    children: list[_Child] = []
    deadline = time.time() + hours * 3600.0
    codes: dict[str, int] = {}
    try:
        for run in runs:
            live = _live(run, live_root)
            target = run.target_epochs(epochs)
            resume = restore(run, live_root, state_root)
            progress = run_progress(live) if resume else None
            if progress is not None and progress["epoch"] >= target:
                print(f"{run.name}: already at epoch {progress['epoch']} >= {target}; nothing to train")
                codes[run.name] = 0
                continue
            live.mkdir(parents=True, exist_ok=True)
            command = run.command(target, resume, live_root, overrides)
            log = open(live / "train.log", "a", encoding="utf-8")
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log.flush()
            print(f"{run.name}: {'continuing' if resume else 'starting'} ({progress or 'new run'}) to epoch {target}; "
                  f"log {log.name}")
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_single_thread_env(),
                preexec_fn=(lambda: os.nice(nice)) if nice else None,
            )
            children.append(_Child(run, process, log))
        while children and any(c.process.poll() is None for c in children):
            if time.time() >= deadline:
                print(f"deadline of {hours} h reached; stopping (the runs resume from their last checkpoint)")
                break
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        print("interrupted; stopping the runs (they resume from their last checkpoint)")
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            child.log.close()
            codes[child.run.name] = child.process.returncode
            hours_used = (time.time() - child.started) / 3600.0
            print(f"{child.run.name}: exit {child.process.returncode} after {hours_used:.2f} h; "
                  f"progress {run_progress(_live(child.run, live_root))}")
        for run in runs:
            snapshot(run, live_root, state_root)
    return codes


_EPOCH_TIME = re.compile(r"Epoch \d+: train NLL \S+, took ([\d.]+) s")
_SAMPLING_TIME = re.compile(r"Stability at epoch \d+: .*\(([\d.]+) s\)")


def logged_hours(folder: Path) -> dict[str, float] | None:
    """The time a run's log records, in hours: ``train`` (its epochs of optimiser steps, redone
    steps after a crash included) and ``sampling`` (its in-training stability samples). Each run
    is one thread, so this is the wall clock of one core: its CPU time while it had a core to
    itself, more on a shared machine. Validation and test NLL passes, start-up and steps lost to
    a stop before a checkpoint are not logged. None without a log."""
    for name in ("train.log", "train_summary.log"):
        if (folder / name).is_file():
            text = (folder / name).read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
            return {"train": sum(map(float, _EPOCH_TIME.findall(text))) / 3600.0,
                    "sampling": sum(map(float, _SAMPLING_TIME.findall(text))) / 3600.0}
    return None


def status(runs: Sequence[Union[str, Run]], live_root: Path | None = None, state_root: Path = STATE_ROOT) -> list[str]:
    """One line per run: where it is and its latest evaluation."""
    from training.metrics_log import read_records

    lines = []
    generators: list[tuple[str, list[dict]]] = []
    for run in map(find_run, runs):
        folder = _folder(run, live_root, state_root)
        progress = run_progress(folder)
        if run.kind == CLASSIFIER:
            if progress is None:
                lines.append(f"{run.name}: not started (classifier, {run.fixed_epochs} epochs)")
            else:
                lines.append(f"{run.name}: epoch {progress['epoch']} of {run.fixed_epochs}; best valid MAE "
                             f"{progress['best_val']:.4f} at epoch {progress['best_epoch']} (test MAE {progress['best_test']:.4f})")
            continue
        records = read_records(folder)
        generators.append((run.name, records))
        last = records[-1] if records else None
        text = f"{run.name}: {progress or 'not started'}"
        if last:
            stab = last.get("stability") or {}
            text += (f"; epoch {last['epoch']} val NLL {last.get('val_nll')}, atom stab {stab.get('atm_stable')}, "
                     f"mol stab {stab.get('mol_stable')}")
        hours = logged_hours(folder)
        if hours is not None:
            text += (f"\n    logged time (one thread): {hours['train']:.2f} h of training + {hours['sampling']:.2f} h "
                     "of in-training sampling")
        projection = project(records, target=ATOM_STABILITY_BAR, lr_of_epoch=run_lr_of_epoch(folder))
        if projection is not None:
            text += "\n    " + projection.describe(steps_per_epoch=steps_per_epoch(records))
        lines.append(text)
    if len(generators) == 2:  # a study's baseline and its GAGA twin
        (a, records_a), (b, records_b) = generators
        comparison = compare_at_equal_steps(records_a, records_b)
        if comparison is not None:
            lines.append(comparison.describe(a, b))
    return lines


def plot_curves(run_dirs: dict[str, Path], out: Path, budgets: dict[str, list[dict]] | None = None) -> Path:
    """Validation NLL and atom / molecule stability against optimiser steps, one line per run;
    ``budgets`` (``study_eval.measured_budgets``): the study's evaluations of each run's own chain,
    drawn as error bars over the in-training points."""
    fig = curves_figure(run_dirs, budgets)  # selects the Agg backend
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def curves_figure(run_dirs: dict[str, Path], budgets: dict[str, list[dict]] | None = None):
    """The figure of ``plot_curves`` (a matplotlib Figure; four panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    from training.metrics_log import read_records

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    panels = [("val_nll", "validation NLL", None), ("atm_stable", "atom stability (%)", 100.0),
              ("mol_stable", "molecule stability (%)", 100.0)]
    switches: set[tuple[int, float]] = set()
    for label, folder in run_dirs.items():
        records = read_records(folder)
        colour = None
        for ax, (key, title, scale) in zip(axes, panels):
            points = []
            for r in records:
                value = r.get(key) if scale is None else (r.get("stability") or {}).get(key)
                if value is not None:
                    points.append((r["step"], value * (scale or 1.0)))
            if points:
                xs, ys = zip(*points)
                colour = ax.plot(xs, ys, marker="o", markersize=3, label=label, color=colour)[0].get_color()
        for ax, key in ((axes[1], "atm_stable"), (axes[2], "mol_stable")):
            measured = (budgets or {}).get(label, [])
            if measured and records:
                values = [[100.0 * it[key] for it in b["iterations"]] for b in measured]
                ax.errorbar([b["epoch"] * steps_per_epoch(records) for b in measured], [np.mean(v) for v in values],
                            yerr=[np.std(v) for v in values], fmt="s", markersize=6, capsize=4, color=colour,
                            markeredgecolor="k", label=f"{label}: {len(measured[-1]['iterations'])} x "
                                                       f"{measured[-1]['n_samples']:,} molecules, mean ± std")
        lr_of_epoch = run_lr_of_epoch(folder)
        _plot_projection(axes[3], label, records, lr_of_epoch)
        switches |= lr_switch_steps(records, lr_of_epoch)
    for step, lr in sorted(switches):
        for ax in axes:
            ax.axvline(step, color="grey", linestyle="--", linewidth=1, label=f"lr {lr:g} from step {step:,}")
    for ax, (_, title, _) in zip(axes, panels):
        ax.set_xlabel("optimiser steps")
        ax.set_title(title)
    axes[3].axhline(100.0 * (1.0 - ATOM_STABILITY_BAR), color="k", linestyle=":", linewidth=1,
                    label=f"bar: {ATOM_STABILITY_BAR:.0%} atom stability")
    if budgets:
        for ax, bar in ((axes[1], ATOM_STABILITY_BAR), (axes[2], MOLECULE_STABILITY_BAR)):
            ax.axhline(100.0 * bar, color="k", linestyle=":", linewidth=1, label=f"bar for EDM's full chain: {bar:.0%}")
    axes[3].set_xscale("log")
    axes[3].set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    for axis in (axes[3].xaxis, axes[3].yaxis):
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[3].set_xlabel("optimiser steps (log)")
    axes[3].set_title("unstable atoms (%, log): power-law fit\nof the last evaluations, extrapolated (dashed)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def steps_per_epoch(records: Sequence[dict]) -> int:
    """A run's optimiser steps per epoch, from its latest record (validation records are written at epoch ends)."""
    return records[-1]["step"] // (records[-1]["epoch"] + 1)


def run_lr_of_epoch(folder: Path) -> Callable[[int], float] | None:
    """The run's learning rate by epoch, from its args.pickle (--lr and --lr_schedule); None without a
    readable one."""
    from configs.run_args import load_run_args
    from training.lr_schedule import lr_at_epoch, parse_schedule

    if not (folder / "args.pickle").is_file():
        return None
    try:
        args = load_run_args(folder)
        schedule = parse_schedule(getattr(args, "lr_schedule", None))
    except ValueError:  # an unreadable args.pickle (RunFolderError, UserInputError)
        return None
    return lambda epoch: lr_at_epoch(args.lr, schedule, epoch)


def lr_switch_steps(records: Sequence[dict], lr_of_epoch: Callable[[int], float] | None) -> set[tuple[int, float]]:
    """(step, new lr) of each lr change the run has reached (``lr_of_epoch``: ``run_lr_of_epoch``)."""
    if not records or lr_of_epoch is None:
        return set()
    per_epoch, last_epoch = steps_per_epoch(records), records[-1]["epoch"]
    # Up to the epoch after the last record: the one the run starts next, at its last step.
    return {(epoch * per_epoch, lr_of_epoch(epoch)) for epoch in range(1, last_epoch + 2)
            if lr_of_epoch(epoch) != lr_of_epoch(epoch - 1) and epoch * per_epoch <= records[-1]["step"]}


def _plot_projection(ax, label: str, records: Sequence[dict], lr_of_epoch: Callable[[int], float] | None) -> None:
    """1 - atom stability against steps (log-log), with the power-law fit extended to the bar."""
    import numpy as np

    points = [(s, v) for s, v in stability_points(records) if v < 1.0]
    if not points:
        return
    steps, values = zip(*points)
    line, = ax.plot(steps, [100.0 * (1.0 - v) for v in values], marker="o", markersize=3, linestyle="none", label=label)
    projection = project(records, target=ATOM_STABILITY_BAR, lr_of_epoch=lr_of_epoch)
    if projection is None:
        return
    end = projection.steps_at_target
    end = min(end, 20 * projection.last_step) if math.isfinite(end) else 20 * projection.last_step
    xs = np.geomspace(projection.first_step, max(end, projection.last_step), 50)
    ax.plot(xs, 100.0 * np.exp(projection.log_c) * xs ** -projection.exponent, linestyle="--", color=line.get_color(),
            label=f"{label}: fit, " + (f"{ATOM_STABILITY_BAR:.0%} at ~{projection.steps_at_target:,.0f} steps"
                                       if projection.last_value < ATOM_STABILITY_BAR else "already past the bar"))


PRETRAINED_ROOT = REPO / "pretrained"


def ship(run: Union[str, Run], epoch: int, live_root: Path | None = None, state_root: Path = STATE_ROOT,
         out_root: Path = PRETRAINED_ROOT) -> Path:
    """Write ``<out_root>/<run>/{args.pickle, generative_model_ema.npy}`` with the EMA weights at the
    end of ``epoch`` (the equal budget): a folder every script loads. A classifier ships its
    ``args.pickle`` and ``best_checkpoint.npy`` (what eval_conditional_qm9 loads) once it has
    finished its own epochs (``epoch`` does not apply to it).

    The weights come from the resume state when the run stopped exactly there, else from the
    per-epoch copy (``generative_model_ema_<epoch - 1>.npy``) that a validation epoch with a new
    best validation NLL leaves in the live folder.
    """
    import torch

    from configs.run_args import load_run_args, loads_args, save_run_args
    from training.checkpoint import EMA_FILE, atomic_torch_save

    run = find_run(run)
    folder = _folder(run, live_root, state_root)
    progress = run_progress(folder)
    out = out_root / (run.ship_dir or run.name)
    if run.kind == CLASSIFIER:
        return _ship_classifier(run, folder, progress, out)
    live = _live(run, live_root)
    per_epoch = live / f"generative_model_ema_{epoch - 1}.npy"
    per_epoch_args = live / f"args_{epoch - 1}.pickle"
    if progress is not None and progress["epoch"] == epoch and progress["step_in_epoch"] == 0:
        saved = torch.load(folder / "resume_state.pt", map_location="cpu", weights_only=True)
        weights = saved["model_ema"] if saved["model_ema"] is not None else saved["model"]
        args = load_run_args(folder)
    elif per_epoch.is_file() and per_epoch_args.is_file() and getattr(
            args := loads_args(per_epoch_args.read_bytes(), source=str(per_epoch_args)), "current_epoch", None) == epoch:
        weights = torch.load(per_epoch, map_location="cpu", weights_only=True)
    else:
        raise RunFolderError(f"{run.name} is at {progress}, not at the end of epoch {epoch}, and has no per-epoch EMA "
                             f"copy of that epoch; train it there first (python equal_budget.py train --epochs {epoch})")
    args.current_epoch, args.n_epochs, args.resume = epoch, epoch, None
    atomic_torch_save(weights, out / EMA_FILE)
    save_run_args(out, args)
    return out


def _ship_classifier(run: Run, folder: Path, progress: dict | None, out: Path) -> Path:
    """args.pickle + best_checkpoint.npy of a classifier that finished its epochs."""
    if progress is None or progress["epoch"] < run.fixed_epochs:
        where = "not started" if progress is None else f"at epoch {progress['epoch']}"
        raise RunFolderError(f"classifier {run.name} is {where} of {run.fixed_epochs}; train it to the end first")
    for name in ("args.pickle", "best_checkpoint.npy"):
        if not (folder / name).is_file():
            raise RunFolderError(f"{folder / name} is missing; snapshot the classifier from its live folder")
        _copy_atomic(folder / name, out / name)
    return out


PILOT_ROOT = Path("outputs/equal_budget_pilot")


def parse_candidate(text: str) -> dict[str, str]:
    """'nf=64,n_layers=4,lr=5e-4' -> {'nf': '64', 'n_layers': '4', 'lr': '5e-4'} (flags of COMMON_FLAGS)."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in COMMON_FLAGS:
            raise UserInputError(f"pilot candidate {text!r}: expected key=value pairs with keys from {sorted(COMMON_FLAGS)}")
        out[key.strip()] = value.strip()
    return out


def validation_nll(run_dir: Path, n_molecules: int, use_ema: bool = False) -> float:
    """EDM's NLL of the run's weights (from its resume state) on the first validation molecules.

    The pilot scores the raw weights: after a few hundred steps an EMA of decay 0.999 still
    holds most of the initialisation (0.999^300 = 0.74)."""
    import torch

    from configs.datasets_config import get_dataset_info
    from configs.run_args import load_run_args
    from qm9.dataset import retrieve_dataloaders
    from qm9.models import get_model
    from training.args import fill_legacy_defaults
    from training.data import build_loaders
    from training.loop import test
    from training.run import seed_everything

    args = fill_legacy_defaults(load_run_args(run_dir))
    args.data_subset, args.context_node_nf = n_molecules, 0
    dataset_info = get_dataset_info(args.dataset, args.remove_h)
    loaders = build_loaders(retrieve_dataloaders(args)[0], args)
    model, nodes_dist, _ = get_model(args, torch.device("cpu"), dataset_info, loaders["train"])
    saved = torch.load(run_dir / "resume_state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(saved["model_ema"] if use_ema and saved["model_ema"] is not None else saved["model"])
    seed_everything(0)  # the same noise draws for every candidate
    return test(args, loaders["valid"], 0, model, torch.device("cpu"), torch.float32, nodes_dist, "Val")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere or when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def pilot(candidates: Sequence[str], cpu_minutes: float, n_val: int = 2000, nice: int = 10,
          root: Path = PILOT_ROOT, poll_seconds: float = 5.0) -> list[dict]:
    """Train each candidate EDM configuration (all at once, one thread each) until it has used
    ``cpu_minutes`` of CPU time, then score the weights of its last checkpoint by validation NLL.

    CPU time, not wall time, is the budget: on a shared machine it is what each candidate
    really got. Checkpoints every 100 steps, so each candidate is scored at most 100 steps
    short of its budget; the CPU seconds per step are reported beside the score.
    """
    tags = {c: c.replace(",", "_").replace("=", "") for c in candidates}
    children = {}
    for cand in candidates:
        run_dir = root / tags[cand]
        if run_dir.exists():
            shutil.rmtree(run_dir)
        overrides = {**parse_candidate(cand), "n_stability_samples": "0", "checkpoint_every_steps": "100"}
        command = [sys.executable, str(REPO / "main_qm9.py"), "--exp_name", tags[cand], "--output_root", str(root),
                   "--n_epochs", "1000", *flag_list({**COMMON_FLAGS, **overrides})]
        run_dir.mkdir(parents=True)
        log = open(run_dir / "train.log", "w", encoding="utf-8")
        print(f"pilot {cand}: {' '.join(command)}", flush=True)
        children[cand] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                           env=_single_thread_env(),
                                           preexec_fn=(lambda: os.nice(nice)) if nice else None), log)
    used: dict[str, float] = {}
    while any(p.poll() is None for p, _ in children.values()):
        for cand, (process, log) in children.items():
            if process.poll() is None:
                seconds = cpu_seconds(process.pid)
                used[cand] = seconds if seconds is not None else used.get(cand, 0.0)
                if seconds is not None and seconds >= cpu_minutes * 60.0:
                    process.send_signal(signal.SIGTERM)
                    process.wait()
                    log.close()
        time.sleep(poll_seconds)
    results = []
    for cand in candidates:
        run_dir = root / tags[cand]
        progress = run_progress(run_dir)
        steps = progress["global_step"] if progress else 0
        nll = validation_nll(run_dir, n_val) if progress else float("nan")
        results.append({"candidate": cand, "cpu_seconds": round(used.get(cand, 0.0), 1), "steps": steps,
                        "cpu_seconds_per_step": round(used.get(cand, 0.0) / max(steps, 1), 3), "val_nll": nll})
        print(f"pilot {cand}: {results[-1]}", flush=True)
    return results


@dataclass(frozen=True)
class Study:
    """A set of runs trained side by side and resumed across sessions, with its own evaluation."""
    name: str
    title: str
    runs: tuple
    add_evaluate_arguments: Callable[[argparse.ArgumentParser], None]
    evaluate_command: Callable[[argparse.Namespace], int]
    curves_out: Path
    has_pilot: bool = False
    speed_command: Callable[[argparse.Namespace], int] | None = None

    @property
    def run_names(self) -> list[str]:
        return [r.name for r in self.runs]

    def run(self, name: str) -> Run:
        for r in self.runs:
            if r.name == name:
                return r
        raise UserInputError(f"unknown run(s) {[name]}; choose from {self.run_names}")


def _qm9_evaluate_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--n_samples", type=int, default=1000)
    ev.add_argument("--iterations", type=int, default=3)
    ev.add_argument("--batch_size", type=int, default=100)
    ev.add_argument("--model_root", default=str(PRETRAINED_ROOT))
    ev.add_argument("--out", default=str(PRETRAINED_ROOT / "equal_budget_results"))
    ev.add_argument("--rows", default="", help="comma-separated row numbers (1-based) to run; default all")
    ev.add_argument("--no_nll", action="store_true")
    ev.add_argument("--jobs", type=int, default=1, help="sample the rows in this many processes, one thread each")
    ev.add_argument("--cache_dir", default=str(PRETRAINED_ROOT / "equal_budget_eval"),
                    help="finished iterations per row (a stopped evaluation resumes from them)")
    ev.add_argument("--no_report", action="store_true", help=argparse.SUPPRESS)  # parallel jobs: fill the cache only


def studies() -> dict[str, Study]:
    """Every study by its --study name (the conditional one is imported on demand: it builds on this module)."""
    from training.conditional_study import COND_ALPHA_STUDY

    return {QM9_STUDY.name: QM9_STUDY, COND_ALPHA_STUDY.name: COND_ALPHA_STUDY}


def build_parser(study: Study | None = None) -> argparse.ArgumentParser:
    study = study or QM9_STUDY
    names = ",".join(study.run_names)
    p = argparse.ArgumentParser(description=study.title)
    p.add_argument("--study", default=QM9_STUDY.name, choices=sorted(studies()),
                   help="which study (default qm9: EDM vs EDM+GAGA on QM9; cond_alpha: the alpha-conditional one)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the runs side by side (resumes), then snapshot their state")
    t.add_argument("--epochs", type=int, required=True,
                   help="train until this epoch (the equal budget; a classifier trains to its own fixed epochs)")
    t.add_argument("--hours", type=float, default=2.5, help="stop after this many hours (resume later)")
    t.add_argument("--nice", type=int, default=10, help="niceness of the training processes (0: none)")
    t.add_argument("--runs", default=names, help="comma-separated subset of " + ", ".join(study.run_names))
    if study.has_pilot:
        pl = sub.add_parser("pilot", help="train candidate configurations for a few minutes each; score by validation NLL")
        pl.add_argument("--candidates", nargs="+", required=True, help="e.g. nf=64,n_layers=4,lr=5e-4 nf=128,n_layers=4")
        pl.add_argument("--cpu_minutes", type=float, default=8.0, help="CPU minutes per candidate (all run at once)")
        pl.add_argument("--n_val", type=int, default=2000, help="validation molecules for the score")
    sh = sub.add_parser("ship", help="write pretrained/<run>/ (args.pickle + EMA weights) at the budget's epoch")
    sh.add_argument("--epochs", type=int, required=True)
    sh.add_argument("--runs", default=names)
    ev = sub.add_parser("evaluate", help="the study's table from the shipped models")
    study.add_evaluate_arguments(ev)
    if study.speed_command is not None:
        sp = sub.add_parser("speed", help="seconds per molecule of every row, measured in one process (the table's "
                                          "speed column)")
        sp.add_argument("--n_batches", type=int, default=2, help="batches timed per row")
        sp.add_argument("--batch_size", type=int, default=100)
        sp.add_argument("--threads", type=int, default=1)
        sp.add_argument("--rows", default="", help="comma-separated row numbers (1-based); default all")
        sp.add_argument("--model_root", default=str(PRETRAINED_ROOT))
        sp.add_argument("--cache_dir", default=str(PRETRAINED_ROOT / "equal_budget_eval"))
    s = sub.add_parser("status", help="where each run is")
    s.add_argument("--runs", default=names)
    c = sub.add_parser("curves", help="PNG of validation NLL and stability against steps for the generators")
    c.add_argument("--out", default=str(study.curves_out))
    s = sub.add_parser("snapshot", help="copy the live runs' resumable state to pretrained/training_state")
    s.add_argument("--runs", default=names)
    return p


def _evaluate_command(args: argparse.Namespace) -> int:
    from training import study_eval, study_speed

    if args.n_samples < 1 or args.iterations < 1 or args.batch_size < 1 or args.jobs < 1:
        raise UserInputError("--n_samples, --iterations, --batch_size and --jobs must be >= 1")
    all_rows = study_eval.evaluation_rows()
    rows = _shipped_rows(Path(args.model_root), args.rows)
    cache_dir = Path(args.cache_dir)
    if args.jobs > 1:
        numbers = [all_rows.index(r) + 1 for r in rows]
        costs = study_eval.remaining_costs(rows, Path(args.model_root), args.n_samples, args.iterations, args.batch_size,
                                           cache_dir)
        study_eval.evaluate_in_parallel(numbers, rows, args.jobs, [
            "--n_samples", str(args.n_samples), "--iterations", str(args.iterations), "--batch_size", str(args.batch_size),
            "--model_root", args.model_root, "--cache_dir", str(cache_dir)], REPO / "equal_budget.py", costs)
    speed = None if args.no_report else study_speed.stored_speed(cache_dir, Path(args.model_root), rows)
    results = study_eval.evaluate(rows, Path(args.model_root), args.n_samples, args.iterations, args.batch_size,
                                  out_stem=None if args.no_report else Path(args.out), nll=not args.no_nll,
                                  cache_dir=cache_dir, speed=speed)
    if not args.no_report:
        print(study_eval.markdown_report(results, speed))
    return 0


def _shipped_rows(model_root: Path, spec: str) -> list:
    """The selected rows of the table, after checking their models are shipped at one budget."""
    from training import study_eval

    rows = study_eval.select_rows(study_eval.evaluation_rows(), spec)
    runs = sorted({row.run for row in rows})
    missing = [r for r in runs if not (model_root / r / "args.pickle").is_file()]
    if missing:
        raise RunFolderError(f"no shipped model for {missing} under {model_root}; run `python equal_budget.py ship --epochs N` first")
    study_eval.check_same_budget(model_root, runs)
    return rows


def _speed_command(args: argparse.Namespace) -> int:
    from training import study_speed

    if args.n_batches < 1 or args.batch_size < 1 or args.threads < 1:
        raise UserInputError("--n_batches, --batch_size and --threads must be >= 1")
    rows = _shipped_rows(Path(args.model_root), args.rows)
    record = study_speed.measure_speed(rows, Path(args.model_root), args.n_batches, args.batch_size, threads=args.threads)
    print(study_speed.save_speed(record, Path(args.cache_dir)))
    print(study_speed.speed_table(record))
    return 0


QM9_STUDY = Study(
    name="qm9", title="EDM vs EDM+GAGA at equal budget on a CPU (training side).", runs=QM9_RUNS,
    add_evaluate_arguments=_qm9_evaluate_arguments, evaluate_command=_evaluate_command,
    curves_out=STATE_ROOT.parent / "training_curves.png", has_pilot=True, speed_command=_speed_command,
)


def _chosen_study(argv: Sequence[str]) -> Study:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--study", default=QM9_STUDY.name)
    known, _ = pre.parse_known_args(argv)
    all_studies = studies()
    if known.study not in all_studies:
        raise UserInputError(f"--study {known.study!r}: choose one of {', '.join(sorted(all_studies))}")
    return all_studies[known.study]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    study = _chosen_study(argv)
    args = build_parser(study).parse_args(argv)
    names = [r for r in getattr(args, "runs", ",".join(study.run_names)).split(",") if r]
    unknown = [r for r in names if r not in study.run_names]
    if unknown:
        raise UserInputError(f"unknown run(s) {unknown}; choose from {study.run_names}")
    runs = [study.run(r) for r in names]
    if args.command == "train":
        if args.epochs < 1 or not args.hours > 0:
            raise UserInputError("--epochs must be >= 1 and --hours > 0")
        codes = train(runs, args.epochs, args.hours, args.nice)
        print("\n".join(status(runs)))
        return 0 if all(c in (0, -signal.SIGTERM) for c in codes.values()) else 1
    if args.command == "pilot":
        import json

        results = pilot(args.candidates, args.cpu_minutes, args.n_val)
        PILOT_ROOT.mkdir(parents=True, exist_ok=True)
        (PILOT_ROOT / "pilot.json").write_text(json.dumps({"cpu_minutes": args.cpu_minutes, "results": results}, indent=1))
        for r in results:
            print(f"{r['candidate']:32s} steps {r['steps']:6d} ({r['cpu_seconds_per_step']:.3f} CPU s/step)  "
                  f"val NLL {r['val_nll']:.2f}")
        return 0
    if args.command == "ship":
        for run in runs:
            print(ship(run, args.epochs))
        return 0
    if args.command == "evaluate":
        return study.evaluate_command(args)
    if args.command == "speed":
        return study.speed_command(args)
    if args.command == "status":
        print("\n".join(status(runs)))
        return 0
    if args.command == "curves":
        folders = {run.name: (run.live_root / run.name if (run.live_root / run.name / "metrics.jsonl").is_file()
                              else STATE_ROOT / run.name) for run in runs if run.kind == GENERATOR}
        budgets = None
        if study is QM9_STUDY:
            from training.study_eval import measured_budgets

            budgets = measured_budgets(PRETRAINED_ROOT / "equal_budget_eval", PRETRAINED_ROOT)
        print(plot_curves(folders, Path(args.out), budgets))
        return 0
    if args.command == "snapshot":
        for run in runs:
            print(f"{run.name}: {[str(p) for p in snapshot(run)]}")
        return 0
    return 2
