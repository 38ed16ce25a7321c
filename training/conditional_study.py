"""The conditional (alpha) CPU study: EDM's Table 3 at CPU scale, EDM vs EDM+GAGA at equal budget.

Four runs of the generic study machinery (``training/study.py``), driven by
``python equal_budget.py --study cond_alpha train | status | curves | snapshot | ship | evaluate``:

* ``exp_class_alpha_cpu``: the alpha classifier phi_alpha (EDM's EGNN regressor at nf 64, 4 layers,
  lr 5e-4; trained on qm9_first_half, 30 epochs: its cosine period, so fixed);
* ``exp_class_alpha_numnodes``: the #Atoms baseline (``--model_name numnodes``, 300 epochs);
* ``cond_alpha_edm_small`` / ``cond_alpha_gaga_small``: alpha-conditional generators on
  qm9_second_half with the QM9 study's recipe (``COMMON_FLAGS``), identical but for GAGA's switches.

Classifiers live in ``qm9/property_prediction/outputs/<run>`` (where main_qm9_prop.py writes them,
so a run started by hand there is adopted as is), generators in ``outputs/cond_alpha/<run>``;
every run's resumable state is committed under ``pretrained/training_state/<run>/``. Shipping
writes ``pretrained/cond_alpha_{edm,gaga}_small/`` and ``pretrained/classifiers/<run>/``.

``evaluate`` is eval_conditional_qm9's ``table`` task for both generators with the shipped
classifier and #Atoms baseline: Naive (shuffled labels), #Atoms, each generator, QM9 (the
classifier on the generators' training molecules: the lower bound); MAE over all molecules and
mean +- std over batches (iterations) of the same size. Every finished generator iteration and the
dataset rows are cached in ``pretrained/conditional_eval/`` (keyed by the weights' hashes and
the budget; iteration i is seeded with ``seed``, ``i``), so a stopped evaluation resumes where it
stopped, also on a fresh machine, with the numbers of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from configs.atomic_io import atomic_write_bytes, file_digest, read_json, write_json
from configs.errors import RunFolderError, UserInputError
from training.study import (CLASSIFIER, COMMON_FLAGS, GAGA_DATASET_VAR, GAGA_T_STAR, PRETRAINED_ROOT, REPO, Run,
                            Study, _single_thread_env)
from training.study_eval import wait_for_jobs

PROPERTY = "alpha"
COND_LIVE_ROOT = Path("outputs/cond_alpha")
CLASSIFIER_LIVE_ROOT = Path("qm9/property_prediction/outputs")

# The QM9 study's recipe on EDM's conditional setting; 100 stability samples every 2 epochs
# (conditional sampling draws alpha too; 256 would cost a third of an epoch here).
COND_FLAGS: dict[str, str] = {**COMMON_FLAGS, "dataset": "qm9_second_half", "conditioning": PROPERTY,
                              "n_stability_samples": "100"}
GENERATORS = ("cond_alpha_edm_small", "cond_alpha_gaga_small")
CLASSIFIER_RUN, NUMNODES_RUN = "exp_class_alpha_cpu", "exp_class_alpha_numnodes"

COND_RUNS = (
    Run(CLASSIFIER_RUN, {"property": PROPERTY, "lr": "5e-4", "nf": "64", "n_layers": "4", "no-cuda": ""},
        CLASSIFIER_LIVE_ROOT, kind=CLASSIFIER, fixed_epochs=30, ship_dir=f"classifiers/{CLASSIFIER_RUN}"),
    Run(NUMNODES_RUN, {"property": PROPERTY, "lr": "5e-4", "model_name": "numnodes", "no-cuda": ""},
        CLASSIFIER_LIVE_ROOT, kind=CLASSIFIER, fixed_epochs=300, ship_dir=f"classifiers/{NUMNODES_RUN}"),
    Run(GENERATORS[0], dict(COND_FLAGS), COND_LIVE_ROOT),
    Run(GENERATORS[1], {**COND_FLAGS, "max_t": str(GAGA_T_STAR), "dataset_var": str(GAGA_DATASET_VAR)}, COND_LIVE_ROOT),
)

LABELS = {"naive": "Naive (shuffled labels; upper bound)", "numnodes": "#Atoms",
          GENERATORS[0]: "EDM", GENERATORS[1]: "EDM+GAGA", "qm9_second_half": "QM9 (lower bound)"}





def _classifier_folders(model_root: Path) -> tuple[Path, Path]:
    return model_root / "classifiers" / CLASSIFIER_RUN, model_root / "classifiers" / NUMNODES_RUN


def check_shipped(model_root: Path, generators: Sequence[str]) -> None:
    """One-line error naming what has not been shipped yet."""
    classifier, numnodes = _classifier_folders(model_root)
    missing = [str(p) for p in (*(model_root / g for g in generators), classifier, numnodes)
               if not (p / "args.pickle").is_file()]
    if missing:
        raise RunFolderError(f"not shipped yet: {', '.join(missing)}; run `python equal_budget.py --study cond_alpha "
                             "ship --epochs N` first (classifiers ship once they finished their epochs)")


def evaluate_generator(run_dir: Path, classifier_dir: Path, iterations: int, batch_size: int, seed: int = 0,
                       cache_dir: Path | None = None, datadir: str | None = None) -> dict[str, Any]:
    """The ``edm`` row of eval_conditional_qm9 for one shipped generator: ``iterations`` batches of
    ``batch_size`` molecules (sizes and alpha from the generator's training half), the classifier's
    MAE per batch. Iterations are cached as they finish and seeded by (seed, i)."""
    import torch

    from training import conditional_eval as ce
    from training.evaluate import load_run, read_run_args, run_sampling_options
    from training.trainer import seed_everything

    device = torch.device("cpu")
    args = read_run_args(run_dir, datadir=datadir)
    options = run_sampling_options(args, argparse.Namespace(dataset_var=None, sampling_step_size=None, sampler=None))
    key = {"weights": file_digest(run_dir / "generative_model_ema.npy"), "classifier": file_digest(classifier_dir / "best_checkpoint.npy"),
           "options": options, "batch_size": batch_size, "seed": seed}
    path = None if cache_dir is None else cache_dir / f"{run_dir.name}.json"
    cached = None if path is None else read_json(path)
    done = list(cached["iterations"]) if cached is not None and cached.get("key") == key else []
    if len(done) < iterations:
        classifiers = ce.load_classifiers([str(classifier_dir)], [PROPERTY], args.datadir, device)
        run = load_run(run_dir, device, use_ema=True, args=args)
        print(f"{run_dir.name}: sampling with {options}; {iterations} x {batch_size} molecules"
              + (f" ({len(done)} cached)" if done else ""), flush=True)
        import time

        for i in range(len(done), iterations):
            seed_everything(seed * 1_000_003 + i)  # iteration i draws the same molecules however the work was split
            start = time.time()
            summary = ce.evaluate_generated(run, classifiers, options, 1, batch_size, device, progress=False)[PROPERTY]
            done.append({"mae": summary["mae"], "molecules": summary["molecules"],
                         "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads()})
            if path is not None:
                write_json(path, {"key": key, "iterations": done})
            print(f"{run_dir.name}: iteration {i + 1}/{iterations}: MAE {summary['mae']:.4f} "
                  f"({done[-1]['seconds']} s)", flush=True)
    from training.conditional_eval import summarise

    used = done[:iterations]
    result = summarise([d["mae"] for d in used], [d["molecules"] for d in used])
    result["sampling"] = options
    result["seconds_per_molecule"] = sum(d["seconds"] for d in used) / max(result["molecules"], 1)
    return result


def evaluate_dataset_rows(generator_dir: Path, classifier_dir: Path, numnodes_dir: Path, batch_size: int, seed: int = 0,
                          cache_dir: Path | None = None, datadir: str | None = None,
                          data_subset: int | None = None) -> dict[str, dict]:
    """Naive, #Atoms and QM9 (lower bound) rows on the generator's training half, as the table
    task computes them, in batches of ``batch_size`` (so their spread matches a generator
    iteration's). Cached by the classifiers' hashes."""
    import torch

    from configs.datasets import dataset_entry, resolve_hook
    from training import conditional_eval as ce
    from training.evaluate import read_run_args

    args = read_run_args(generator_dir, datadir=datadir)
    key = {"classifier": file_digest(classifier_dir / "best_checkpoint.npy"),
           "numnodes": file_digest(numnodes_dir / "best_checkpoint.npy"), "dataset": args.dataset,
           "batch_size": batch_size, "seed": seed, "data_subset": data_subset}
    path = None if cache_dir is None else cache_dir / "dataset_rows.json"
    cached = None if path is None else read_json(path)
    if cached is not None and cached.get("key") == key:
        return cached["rows"]
    device = torch.device("cpu")
    arrays = resolve_hook(dataset_entry(args.dataset).split_arrays)(args.datadir, "train", remove_h=False, progress=False)
    if data_subset is not None:
        arrays = {k: v[:data_subset] for k, v in arrays.items()}
    (model, mean, mad), = ce.load_classifiers([str(classifier_dir)], [PROPERTY], args.datadir, device).values()
    (nn_model, nn_mean, nn_mad), = ce.load_classifiers([str(numnodes_dir)], [PROPERTY], args.datadir, device).values()
    print(f"dataset rows on {len(arrays[PROPERTY])} molecules of {args.dataset}", flush=True)
    rows = {
        "naive": ce.evaluate_dataset(arrays, model, PROPERTY, mean, mad, batch_size, shuffle_labels=True, seed=seed),
        "numnodes": ce.evaluate_dataset(arrays, nn_model, PROPERTY, nn_mean, nn_mad, batch_size),
        "qm9_second_half": ce.evaluate_dataset(arrays, model, PROPERTY, mean, mad, batch_size),
    }
    if path is not None:
        write_json(path, {"key": key, "rows": rows})
    return rows


def evaluate(model_root: Path, iterations: int, batch_size: int, seed: int = 0, cache_dir: Path | None = None,
             out_stem: Path | None = None, generators: Sequence[str] = GENERATORS, datadir: str | None = None,
             data_subset: int | None = None, dataset_rows: bool = True) -> dict[str, Any]:
    """The table: Naive, #Atoms, the generators, QM9 (lower bound); written to ``out_stem``.{md,json}."""
    check_shipped(model_root, generators)
    classifier_dir, numnodes_dir = _classifier_folders(model_root)
    rows: dict[str, dict] = {}
    for name in generators:
        rows[name] = evaluate_generator(model_root / name, classifier_dir, iterations, batch_size, seed, cache_dir, datadir)
    if dataset_rows:
        rows.update(evaluate_dataset_rows(model_root / generators[0], classifier_dir, numnodes_dir, batch_size, seed,
                                          cache_dir, datadir, data_subset))
    record = {"property": PROPERTY, "iterations": iterations, "batch_size": batch_size, "seed": seed, "rows": rows}
    if out_stem is not None:
        out_stem.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_stem.with_suffix(".json"), (json.dumps(record, indent=1) + "\n").encode())
        atomic_write_bytes(out_stem.with_suffix(".md"), (markdown_report(record) + "\n").encode())
    return record


def markdown_report(record: dict[str, Any]) -> str:
    """| row | MAE | mean ± std over batches | batches x molecules | sampling |, in Table 3's order."""
    header = ["row", f"{record['property']} MAE (Bohr^3)", "mean ± std over batches", "batches", "molecules", "sampling"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in ("naive", "numnodes", *GENERATORS, "qm9_second_half"):
        r = record["rows"].get(key)
        if r is None:
            continue
        s = r.get("sampling")
        sampling = "" if s is None else (f"N(0, I) at T, {s['sampler']}" if not s.get("start_step") else
                                         f"N(0, {s['dataset_var']} I) at {s['start_step']}, {s['sampler']}")
        lines.append(f"| {LABELS.get(key, key)} | {r['mae']:.4f} | {r['mean_over_iterations']:.4f} ± "
                     f"{r['std_over_iterations']:.4f} | {r['iterations']} | {r['molecules']} | {sampling} |")
    lines += ["", f"Generators: {record['iterations']} batches of {record['batch_size']} molecules (sizes and alpha "
                  "drawn from the generators' training half); the dataset rows use that half's molecules in batches "
                  "of the same size. The classifier and #Atoms baseline train on the first half."]
    return "\n".join(lines)


def add_evaluate_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--iterations", type=int, default=100, help="batches of generated molecules per generator (EDM: 100)")
    ev.add_argument("--batch_size", type=int, default=100, help="molecules per batch (EDM: 100)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--model_root", default=str(PRETRAINED_ROOT))
    ev.add_argument("--out", default=str(PRETRAINED_ROOT / "conditional_results"))
    ev.add_argument("--cache_dir", default=str(PRETRAINED_ROOT / "conditional_eval"),
                    help="finished iterations (a stopped evaluation resumes from them)")
    ev.add_argument("--generators", default=",".join(GENERATORS), help="comma-separated subset of " + ", ".join(GENERATORS))
    ev.add_argument("--jobs", type=int, default=1, help="one process (one thread) per generator when 2")
    ev.add_argument("--datadir", default=None, help="dataset cache folder (default: the generator's)")
    ev.add_argument("--data_subset", type=int, default=None, help="dataset rows on the first N molecules only (tests)")
    ev.add_argument("--no_report", action="store_true", help=argparse.SUPPRESS)  # parallel jobs: fill the cache only


def evaluate_command(args: argparse.Namespace) -> int:
    if args.iterations < 1 or args.batch_size < 1 or args.jobs < 1:
        raise UserInputError("--iterations, --batch_size and --jobs must be >= 1")
    generators = [g for g in args.generators.split(",") if g]
    unknown = [g for g in generators if g not in GENERATORS]
    if unknown or not generators:
        raise UserInputError(f"--generators {args.generators!r}: choose from {', '.join(GENERATORS)}")
    model_root, cache_dir = Path(args.model_root), Path(args.cache_dir)
    check_shipped(model_root, generators)
    common = ["--iterations", str(args.iterations), "--batch_size", str(args.batch_size), "--seed", str(args.seed),
              "--model_root", str(model_root), "--cache_dir", str(cache_dir)]
    if args.datadir:
        common += ["--datadir", args.datadir]
    if args.jobs > 1 and len(generators) > 1:
        procs = [subprocess.Popen([sys.executable, str(REPO / "equal_budget.py"), "--study", "cond_alpha", "evaluate",
                                   "--generators", g, "--jobs", "1", "--no_report", *common], env=_single_thread_env())
                 for g in generators]
        wait_for_jobs(procs)
    if args.no_report:
        evaluate(model_root, args.iterations, args.batch_size, args.seed, cache_dir, None, generators, args.datadir,
                 args.data_subset, dataset_rows=False)
        return 0
    record = evaluate(model_root, args.iterations, args.batch_size, args.seed, cache_dir, Path(args.out), generators,
                      args.datadir, args.data_subset)
    print(markdown_report(record))
    return 0


COND_ALPHA_STUDY = Study(
    name="cond_alpha", title="Alpha-conditional EDM vs EDM+GAGA at equal budget, with our alpha classifier and #Atoms.",
    runs=COND_RUNS, add_evaluate_arguments=add_evaluate_arguments, evaluate_command=evaluate_command,
    curves_out=PRETRAINED_ROOT / "conditional_training_curves.png",
)
