"""The whole GAGA chain on QM9 in one command, small enough for a 2-core CPU (about 15 minutes).

    python quickstart.py                          # CPU-sized defaults
    python quickstart.py --gaussianity_molecules 10000 --train_molecules 0 --n_epochs 1650 \
        --nf 256 --n_layers 9 --batch_size 256 --n_samples 10000 --iterations 3   # the paper's run, on a GPU

Steps (each is also a command of its own, printed as it runs):
 1. data         QM9 from qm9pack, EDM's split, cached under --datadir
 2. variance     Variance_Estimate.py: the dataset variance v (README statistic)
 3. Gaussianity  Gaussianity_test.py on a subsample of training molecules
 4. T*           GAGA_step_estimation.py: the characteristic step (mean estimator)
 5. training     main_qm9.py with --max_t T* and --dataset_var v (a small model, a short run)
 6. sampling     GAGA_test.py --compare: full chain, Gaussian shortcut at T*, DDIM, DDIM + shortcut,
                 DPM-Solver++(2M) rows
 7. report       <out>/report.md with the tables, the Gaussianity plots and generated molecules
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import GAGA_step_estimation
import GAGA_test
import Gaussianity_test
import Variance_Estimate
from configs.errors import RunFolderError, TrainingStopped, UserInputError, cli_errors
from configs.flags import Rule, at_least, check_flags, check_plain_name, compact_errors, positive

# Written into outputs/<exp_name> by the quick start: only a folder holding it is ever deleted.
MARKER = ".quickstart_run"

FLAG_RULES = {
    "gaussianity_molecules": at_least(1),
    "workers": at_least(1, high=256),
    "train_molecules": at_least(0),
    "n_epochs": at_least(1),
    "batch_size": at_least(1, high=1_000_000),
    "nf": at_least(1, high=4096),
    "n_layers": at_least(1, high=64),
    "lr": positive(),
    "ema_decay": Rule(float, 0, 1, high_open=True),
    "n_samples": at_least(1, high=1_000_000),
    "iterations": at_least(1, high=1000),
    "ddim_stride": at_least(1),
    "seed": at_least(0, high=2**32 - 1000),
}
from training import distributed


def build_parser() -> argparse.ArgumentParser:
    p = compact_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                               formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    p.add_argument("--exp_name", default="quickstart", help="run folder outputs/<exp_name> (holds the report)")
    p.add_argument("--datadir", default="qm9/temp")
    p.add_argument("--gaussianity_molecules", type=int, default=400, help="training molecules in the Gaussianity test")
    p.add_argument("--timesteps", default="300:800:50", help="grid of the Gaussianity test")
    p.add_argument("--workers", type=int, default=2, help="processes for the Gaussianity test")
    p.add_argument("--train_molecules", type=int, default=5000, help="first N molecules of each split (0: all)")
    p.add_argument("--n_epochs", type=int, default=25)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--nf", type=int, default=64)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema_decay", type=float, default=0.99)
    p.add_argument("--n_samples", type=int, default=100, help="molecules per sampling setting and iteration")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--ddim_stride", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-cuda", dest="no_cuda", action="store_true")
    return p


class Stages:
    """Runs the pipeline's steps in order, printing each command and timing it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.commands: dict[str, str] = {}

    def run(self, name: str, command: str, fn: Callable[[], object]) -> object:
        print(f"\n=== {name}: {command}", flush=True)
        start = time.perf_counter()
        result = fn()
        self.seconds[name] = time.perf_counter() - start
        self.commands[name] = command
        print(f"=== {name} done in {self.seconds[name]:.1f} s", flush=True)
        return result


def _call(main: Callable[[list[str]], object], argv: list[str], step: str) -> object:
    """Run a script's main(argv); a failing step stops the pipeline with its own message."""
    try:
        code = main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise TrainingStopped(f"quickstart stopped at step '{step}' (its error is above)") from None
        code = 0
    if code not in (0, None):
        raise TrainingStopped(f"quickstart stopped: step '{step}' failed (exit code {code})")
    return code


def t_star_from(step_json: Path, stride: int) -> int:
    """T* from the mean estimator, at its nearest grid point, made a multiple of the DDIM stride."""
    estimates = json.loads(step_json.read_text())["t_star"]["pass"]
    if estimates["t_star_mean"] is None:
        raise UserInputError(f"no molecule passed the Gaussianity tests consistently ({step_json}); extend --timesteps")
    t_star = int(estimates["t_star_mean_nearest_grid"])
    return max(stride, t_star - t_star % stride)


def check_flags_quickstart(flags: argparse.Namespace) -> None:
    check_flags(flags, FLAG_RULES)
    check_plain_name("--exp_name", flags.exp_name)  # never "", "..", an absolute path or a/b: it names a folder we may delete
    from gaga.schedule import check_timesteps, parse_timesteps

    check_timesteps(parse_timesteps(flags.timesteps), 1000)


def claim_run_folder(run_dir: Path) -> None:
    """Empty ``run_dir`` for a fresh quick start: only a folder an earlier quick start created (it holds
    MARKER) is deleted; any other existing folder, e.g. a real training run, is refused."""
    if run_dir.exists():
        if not (run_dir / MARKER).is_file():
            raise RunFolderError(
                f"{run_dir} exists and was not made by quickstart.py; it is left untouched: choose another --exp_name"
            )
        shutil.rmtree(run_dir)  # a fresh run each time: the quick start never resumes an old one
    run_dir.mkdir(parents=True)
    (run_dir / MARKER).write_text("made by quickstart.py; deleted and rebuilt by its next run with the same --exp_name\n")


@cli_errors
def main(argv: Sequence[str] | None = None) -> Path:
    flags = build_parser().parse_args(argv)
    check_flags_quickstart(flags)
    run_dir = Path("outputs") / flags.exp_name
    if run_dir.exists() and not (run_dir / MARKER).is_file():
        claim_run_folder(run_dir)  # refuses now, before minutes of work
    gaga_dir = Path("outputs") / f"{flags.exp_name}_gaga"
    stages = Stages()
    total_start = time.perf_counter()

    from qm9.data.qm9 import load_qm9

    stages.run("data", f"(QM9 cache in {flags.datadir})", lambda: load_qm9(flags.datadir, "train"))

    var_argv = ["--dataset", "qm9", "--datadir", flags.datadir, "--test_name", flags.exp_name,
                "--out_dir", str(gaga_dir / "variance")]
    stages.run("variance", "python Variance_Estimate.py " + " ".join(var_argv),
               lambda: _call(Variance_Estimate.main, var_argv, "variance"))
    variance = json.loads((gaga_dir / "variance" / "variance.json").read_text())
    dataset_var = round(float(variance["dataset_var"]), 3)

    gauss_dir = gaga_dir / f"identity_to_gaussian_{flags.exp_name}"
    gauss_argv = ["--dataset", "qm9", "--datadir", flags.datadir, "--test_name", flags.exp_name, "--out_dir", str(gauss_dir),
                  "--n_molecules", str(flags.gaussianity_molecules), "--timesteps", flags.timesteps,
                  "--dataset_var", str(dataset_var), "--workers", str(flags.workers), "--seed", str(flags.seed)]
    stages.run("Gaussianity", "python Gaussianity_test.py " + " ".join(gauss_argv),
               lambda: _call(Gaussianity_test.main, gauss_argv, "Gaussianity"))

    step_argv = ["--data_root", str(gauss_dir)]
    stages.run("T*", "python GAGA_step_estimation.py " + " ".join(step_argv),
               lambda: _call(GAGA_step_estimation.main, step_argv, "T*"))
    t_star = t_star_from(gauss_dir / "gaga_step.json", flags.ddim_stride)

    # Validation (which picks the weights saved for sampling) runs when epoch % test_epochs == 0
    # (EDM): test_epochs = n_epochs - 1 validates after the first and the last epoch.
    train_argv = [
        "--exp_name", flags.exp_name, "--datadir", flags.datadir, "--n_epochs", str(flags.n_epochs),
        "--batch_size", str(flags.batch_size), "--nf", str(flags.nf), "--n_layers", str(flags.n_layers),
        "--lr", str(flags.lr), "--ema_decay", str(flags.ema_decay), "--diffusion_steps", "1000",
        "--diffusion_noise_schedule", "polynomial_2", "--diffusion_noise_precision", "1e-5",
        "--diffusion_loss_type", "l2", "--normalize_factors", "[1,4,10]", "--include_charges", "False",
        "--max_t", str(t_star), "--dataset_var", str(dataset_var), "--test_epochs", str(max(flags.n_epochs - 1, 1)),
        "--n_stability_samples", "0", "--visualize_every_batch", "0", "--seed", str(flags.seed),
    ]
    if flags.train_molecules:
        train_argv += ["--data_subset", str(flags.train_molecules)]
    if flags.no_cuda:
        train_argv.append("--no-cuda")
    from training.run import main as train_main

    claim_run_folder(run_dir)
    summary = stages.run("training", "python main_qm9.py " + " ".join(train_argv), lambda: train_main(train_argv))

    test_argv = ["--model_path", str(run_dir), "--compare", "--GA_timestep", str(t_star), "--dataset_var", str(dataset_var),
                 "--ddim_stride", str(flags.ddim_stride), "--n_samples", str(flags.n_samples),
                 "--batch_size_gen", str(min(flags.n_samples, 100)), "--iteration", str(flags.iterations),
                 "--test_name", "comparison", "--datadir", flags.datadir, "--seed", str(flags.seed)]
    if flags.no_cuda:
        test_argv.append("--no-cuda")
    results = stages.run("sampling", "python GAGA_test.py " + " ".join(test_argv), lambda: GAGA_test.main(test_argv))

    pictures = stages.run("pictures", "(molecules sampled with the Gaussian shortcut)",
                          lambda: draw_molecules(run_dir, t_star, dataset_var, flags))
    report = write_report(run_dir, gaga_dir, gauss_dir, variance, dataset_var, t_star, summary, results, pictures,
                          stages, time.perf_counter() - total_start, flags)
    print(f"\nreport: {report}")
    return report


def draw_molecules(run_dir: Path, t_star: int, dataset_var: float, flags: argparse.Namespace) -> Path:
    """A grid picture of 9 molecules sampled with the Gaussian shortcut."""
    import torch

    from qm9 import visualizer
    from training.evaluate import load_run
    from training.loop import sample_molecules

    device = distributed.select_device(flags.no_cuda)
    run = load_run(run_dir, device)
    torch.manual_seed(flags.seed)
    options = dict(start_step=t_star, dataset_var=dataset_var, step_size=1, sampler="ddpm")
    molecules = sample_molecules(run.args, run.model, run.nodes_dist, run.dataset_info, device, 9, batch_size=9,
                                 options=options, progress=False)
    mask = molecules["node_mask"].reshape(molecules["x"].shape[:2]) > 0.5
    items = [(molecules["x"][b][mask[b]], molecules["one_hot"][b][mask[b]].argmax(-1)) for b in range(len(mask))]
    return visualizer.save_grid_png(run_dir / "molecules.png", items, run.dataset_info, cols=3)


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)


def write_report(run_dir: Path, gaga_dir: Path, gauss_dir: Path, variance: dict, dataset_var: float, t_star: int,
                 summary: dict, results: list[dict], pictures: Path, stages: Stages, total_seconds: float,
                 flags: argparse.Namespace) -> Path:
    from training.sampling_benchmark import markdown_table

    step = json.loads((gauss_dir / "gaga_step.json").read_text())["t_star"]
    stats = variance["statistics"]
    lines = [
        f"# GAGA quick start report ({flags.exp_name})",
        "",
        f"Total time {total_seconds / 60:.1f} min. Re-run with `python quickstart.py` (flags: `--help`).",
        "This is a *small* run to watch the method work end to end; its molecule quality says nothing about",
        "the paper's numbers, which need the full model trained for days on a GPU (see the README).",
        "",
        "## 1. Dataset variance (QM9 training split)",
        "",
        "| features | mean RMS (README statistic) | variance (mean square) | unbiased per-molecule variance |",
        "|---|---|---|---|",
    ]
    for modality, values in stats.items():
        lines.append(f"| {modality} | {values['rms']:.4f} | {values['mean_square']:.4f} | {values['unbiased_var']:.4f} |")
    lines += [
        "",
        f"`--dataset_var {dataset_var}` (the README's statistic; QM9 published value 0.848).",
        "",
        f"## 2. Gaussianity of the noised molecules ({flags.gaussianity_molecules} molecules)",
        "",
        f"![Gaussianity tests]({_relative(gauss_dir / 'gaussianity.png', run_dir)})",
        "",
        "| test | T* (mean estimator) | nearest grid point | T* (0.95 quantile) | molecules that never pass |",
        "|---|---|---|---|---|",
    ]
    for name, est in step.items():
        mean = "-" if est["t_star_mean"] is None else f"{est['t_star_mean']:.1f}"
        lines.append(f"| {name} | {mean} | {est['t_star_mean_nearest_grid'] or '-'} | {est['t_star_quantile'] or '-'} | "
                     f"{est['n_without_consistent_pass']} |")
    lines += [
        "",
        f"T* used below: **{t_star}** (published value for QM9: 550).",
        "",
        "## 3. Training",
        "",
        f"EGNN nf={flags.nf}, {flags.n_layers} layers, {flags.n_epochs} epochs on "
        f"{flags.train_molecules or 'all'} training molecules, t drawn from [0, {t_star}] (`--max_t {t_star}`).",
        f"Validation NLL {summary['nll_val']:.3f}, test NLL {summary['nll_test']:.3f} (negative values come from",
        "the t = 0 term on GAGA's centred one-hot, a quirk of the objective the published runs share).",
        "",
        "## 4. Sampling: quality and speed",
        "",
        "Every row samples the model trained above. It was trained on t <= T* only, so the rows that start",
        "at T = 1000 (full chain, DDIM) run it at steps it never saw: this table shows what the shortcut",
        "buys a GAGA-trained model, not EDM against GAGA (that needs a second model trained on all t).",
        "",
        markdown_table(results, baseline_index=0),
        "",
        f"![Molecules sampled with the Gaussian shortcut]({_relative(pictures, run_dir)})",
        "",
        "## Steps and timings",
        "",
        "| step | seconds | command |",
        "|---|---|---|",
    ]
    for name, seconds in stages.seconds.items():
        lines.append(f"| {name} | {seconds:.1f} | `{stages.commands[name]}` |")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    main()
    sys.exit(0)
