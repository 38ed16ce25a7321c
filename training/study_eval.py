"""The equal-budget study's evaluation: every row of the table sampled and scored with the same code,
seeds and budget.

Evaluating 3 x 1,000 molecules per row takes hours on a CPU, longer than a session may last, so
each row's iterations are cached in ``<cache_dir>/<row>.json`` as they finish (written atomically,
keyed by the shipped weights' hash and the budget): a stopped evaluation resumes at the next
iteration, and rows can run in parallel processes (``jobs``), one thread each, sharing the cache.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from configs.atomic_io import file_digest, read_json, write_json
from configs.errors import RunFolderError, UserInputError

from training.study import GAGA_DATASET_VAR, GAGA_T_STAR, RUNS, _single_thread_env


@dataclass(frozen=True)
class EvalRow:
    label: str
    run: str
    options: dict  # SamplingOptions fields

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.label.lower()).strip("_")


def evaluation_rows(t_star: int = GAGA_T_STAR, earlier: int = 450, ddim_stride: int = 2, solver_steps: int = 50,
                    v: float = GAGA_DATASET_VAR, T: int = 1000) -> list[EvalRow]:
    """The study's table: EDM's chains, GAGA's, the control (EDM's model from GAGA's start), and
    DPM-Solver++(2M) rows of about ``solver_steps`` steps for both models."""
    from equivariant_diffusion.samplers import stride_for_steps

    edm, gaga = list(RUNS)
    edm_solver, gaga_solver = stride_for_steps(T, solver_steps), stride_for_steps(t_star, solver_steps)
    return [
        EvalRow("EDM full chain", edm, dict(sampler="ddpm", start_step=None, step_size=1, dataset_var=1.0)),
        EvalRow(f"EDM DDIM stride {ddim_stride}", edm, dict(sampler="ddim", start_step=None, step_size=ddim_stride, dataset_var=1.0)),
        EvalRow(f"EDM DPM-Solver++(2M) {T // edm_solver} steps", edm,
                dict(sampler="dpm_solver_2m", start_step=None, step_size=edm_solver, dataset_var=1.0)),
        EvalRow(f"EDM model, Gaussian start at {t_star} (no GAGA training)", edm,
                dict(sampler="ddpm", start_step=t_star, step_size=1, dataset_var=v)),
        EvalRow(f"EDM+GAGA at T*={t_star}", gaga, dict(sampler="ddpm", start_step=t_star, step_size=1, dataset_var=v)),
        EvalRow(f"EDM+GAGA started at {earlier}", gaga, dict(sampler="ddpm", start_step=earlier, step_size=1, dataset_var=v)),
        EvalRow(f"EDM+GAGA DDIM stride {ddim_stride}", gaga,
                dict(sampler="ddim", start_step=t_star, step_size=ddim_stride, dataset_var=v)),
        EvalRow(f"EDM+GAGA DPM-Solver++(2M) {t_star // gaga_solver} steps", gaga,
                dict(sampler="dpm_solver_2m", start_step=t_star, step_size=gaga_solver, dataset_var=v)),
    ]


def select_rows(rows: Sequence[EvalRow], spec: str) -> list[EvalRow]:
    """``"1,3"`` -> rows 1 and 3 (1-based); ``""`` -> all."""
    if not spec:
        return list(rows)
    try:
        return [rows[int(i) - 1] for i in spec.split(",") if int(i) >= 1]
    except (ValueError, IndexError):
        raise UserInputError(f"--rows {spec!r}: give row numbers between 1 and {len(rows)}") from None


def row_cost(row: EvalRow, T: int = 1000) -> int:
    """Network evaluations per molecule: what a row costs, to balance parallel jobs."""
    start = row.options["start_step"] or T
    return -(-start // row.options["step_size"])


def partition_rows(rows: Sequence[EvalRow], jobs: int, costs: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices (0-based) split into ``jobs`` groups of about equal cost: longest first into the
    lightest group, then single moves and swaps between the heaviest group and another while they
    lower the heaviest load (8 rows: this finds the best split). ``costs`` default to
    ``row_cost``; rows of cost 0 (nothing left to sample) are left out."""
    costs = [row_cost(r) for r in rows] if costs is None else list(costs)
    todo = [i for i in range(len(rows)) if costs[i] > 0]
    bins: list[list[int]] = [[] for _ in range(max(1, min(jobs, len(todo))))]
    for i in sorted(todo, key=lambda i: -costs[i]):
        min(bins, key=lambda b: sum(costs[j] for j in b)).append(i)
    load = lambda b: sum(costs[j] for j in b)
    improved = True
    while improved:
        improved = False
        heavy = max(bins, key=load)
        for other in bins:
            if other is heavy:
                continue
            gap = load(heavy) - load(other)
            # moving i (delta = cost i) or swapping i<->j (delta = cost i - cost j) helps iff 0 < delta < gap
            options = [(costs[i], i, None) for i in heavy] + [(costs[i] - costs[j], i, j) for i in heavy for j in other]
            good = [o for o in options if 0 < o[0] < gap]
            if good:
                _, i, j = min(good, key=lambda o: abs(gap - 2 * o[0]))
                heavy.remove(i)
                other.append(i)
                if j is not None:
                    other.remove(j)
                    heavy.append(j)
                improved = True
                break
    return sorted((sorted(b) for b in bins if b), key=lambda b: b[0])


def check_same_budget(model_root: Path, runs: Sequence[str]) -> int | None:
    """The epoch all ``runs`` were shipped at; a one-line error when they differ (a table that
    compares models trained for different budgets would be silently wrong)."""
    from configs.run_args import load_run_args

    epochs = {run: getattr(load_run_args(model_root / run), "current_epoch", None) for run in runs}
    if len(set(epochs.values())) > 1:
        shipped = ", ".join(f"{run} at epoch {epoch}" for run, epoch in epochs.items())
        raise RunFolderError(f"the shipped models differ in budget ({shipped}); ship them at the same epoch "
                             f"(python equal_budget.py ship --epochs N) before evaluating them together")
    return next(iter(epochs.values()), None)


def row_key(row: EvalRow, weights_digest: str, n_samples: int, batch_size: int, seed: int, novelty: bool) -> dict:
    """What a cached iteration was measured under: a change in any of it measures the row again."""
    return {"weights": weights_digest, "options": row.options, "n_samples": n_samples, "batch_size": batch_size,
            "seed": seed, "novelty": novelty}


def weight_digests(model_root: Path, rows: Sequence[EvalRow]) -> dict[str, str]:
    """run -> hash of its shipped EMA weights, for the runs the rows sample (part of every cache key)."""
    from training.checkpoint import EMA_FILE

    return {run: file_digest(model_root / run / EMA_FILE) for run in sorted({r.run for r in rows})}


def remaining_costs(rows: Sequence[EvalRow], model_root: Path, n_samples: int, iterations: int, batch_size: int,
                    cache_dir: Path, seed: int = 0, novelty: bool = True) -> list[int]:
    """Network evaluations per molecule still to run for each row (its cost x iterations not cached),
    so parallel jobs are balanced on the work left, e.g. after one model's rows ran alone."""
    digests = weight_digests(model_root, rows)
    return [row_cost(row) * max(0, iterations - len(cached_iterations(
        cache_dir / f"{row.slug}.json", row_key(row, digests[row.run], n_samples, batch_size, seed, novelty))))
        for row in rows]


def own_chain_rows() -> dict[str, EvalRow]:
    """run -> the row that samples it with its own chain (EDM: the full chain; EDM+GAGA: from T*)."""
    rows = evaluation_rows()
    own = {rows[0].run: rows[0], rows[4].run: rows[4]}
    assert own[rows[0].run].options["start_step"] is None and own[rows[4].run].options["start_step"] == GAGA_T_STAR
    return own


def measured_budgets(cache_root: Path, model_root: Path) -> dict[str, list[dict]]:
    """Each run's own-chain row as evaluated at each budget, for the training curves:
    ``{run: [{"epoch", "n_samples", "iterations"}, ...]}`` sorted by epoch. Earlier budgets are
    kept in ``<cache_root>/epoch_<N>/`` (the cache of the weights shipped at epoch N); the cache in
    ``cache_root`` itself counts for the shipped weights' epoch while its key matches them."""
    from configs.run_args import load_run_args

    own = own_chain_rows()
    found: dict[str, list[dict]] = {run: [] for run in own}

    def add(run: str, epoch: int, cached: dict | None) -> None:
        if cached is None or cached.get("key", {}).get("options") != own[run].options:
            return
        iterations = cached.get("result", {}).get("iterations", [])
        if iterations:
            found[run].append({"epoch": epoch, "n_samples": cached["key"]["n_samples"], "iterations": iterations})

    for folder in cache_root.glob("epoch_*"):
        if folder.is_dir() and folder.name.split("_")[1].isdigit():
            for run, row in own.items():
                add(run, int(folder.name.split("_")[1]), read_json(folder / f"{row.slug}.json"))
    for run, row in own.items():
        epoch = (getattr(load_run_args(model_root / run), "current_epoch", None)
                 if (model_root / run / "args.pickle").is_file() else None)
        cached = read_json(cache_root / f"{row.slug}.json")
        if epoch is not None and cached is not None and cached["key"].get("weights") == weight_digests(model_root, [row])[run]:
            add(run, int(epoch), cached)  # else measured on other weights than the shipped ones
    return {run: sorted(points, key=lambda p: p["epoch"]) for run, points in found.items() if points}


def cached_iterations(path: Path, key: dict) -> list[dict]:
    """The iterations measured earlier under the same key (weights, budget, seed), else none."""
    cached = read_json(path)
    if cached is None or cached.get("key") != key:
        return []
    return list(cached.get("result", {}).get("iterations", []))


def evaluate(rows: Sequence[EvalRow], model_root: Path, n_samples: int, iterations: int, batch_size: int = 100,
             seed: int = 0, out_stem: Path | None = None, nll: bool = True, datadir: str | None = None,
             novelty: bool = True, cache_dir: Path | None = None, speed: dict | None = None) -> list[dict]:
    """Sample and score every row with the same code, seeds and budget; test NLL per model.

    With ``cache_dir``, finished iterations are reused and each new one is saved as it completes.
    ``speed``: one-process timings (``study_speed``) for the written report's s/mol column.
    """
    import torch

    from equivariant_diffusion.samplers import SamplingOptions
    from training import sampling_benchmark as bench
    from training.evaluate import evaluate_molecules, load_run, training_smiles
    from training.loop import sample_molecules

    device = torch.device("cpu")
    runs = sorted({r.run for r in rows})
    loaded = {run: load_run(model_root / run, device, datadir=datadir) for run in runs}
    digests = weight_digests(model_root, rows)
    smiles = None
    test_nll = {}
    if nll:
        for run, lr in loaded.items():
            nll_file = None if cache_dir is None else cache_dir / f"test_nll_{run}.json"
            cached = None if nll_file is None else read_json(nll_file)
            if cached is not None and cached.get("weights") == digests[run]:
                test_nll[run] = cached["test_nll"]
            else:
                test_nll[run] = _test_nll(lr, datadir)
                if nll_file is not None:
                    write_json(nll_file, {"weights": digests[run], "test_nll": test_nll[run]})
            print(f"{run}: test NLL {test_nll[run]:.3f}", flush=True)
    results = []
    for row in rows:
        lr = loaded[row.run]
        T = int(lr.args.diffusion_steps)
        opts = SamplingOptions(**row.options).validated(T)
        setting = bench.SamplingSetting(row.label, opts.start_step, opts.step_size, opts.sampler, opts.dataset_var)
        key = row_key(row, digests[row.run], n_samples, batch_size, seed, novelty)
        path = None if cache_dir is None else cache_dir / f"{row.slug}.json"
        done = [] if path is None else cached_iterations(path, key)
        if len(done) < iterations and novelty and smiles is None:
            smiles = training_smiles(lr.args, lr.dataset_info)

        def sample_fn(n: int, options: dict, lr=lr) -> dict:
            return sample_molecules(lr.args, lr.model, lr.nodes_dist, lr.dataset_info, device, n,
                                    batch_size=batch_size, options=options)

        def save(i: int, metrics: dict, molecules: dict, path=path, key=key, done=done) -> None:
            metrics["threads"] = torch.get_num_threads()  # recorded with the timing it explains
            if path is not None:
                done.append(dict(metrics))
                write_json(path, {"key": key, "label": row.label, "result": {"iterations": done}})

        reused = min(len(done), iterations)
        print(f"{row.label}: {setting.n_steps(T)} steps, {n_samples} molecules x {iterations}"
              + (f" ({reused} cached)" if reused else ""), flush=True)
        result = bench.run_setting(setting, sample_fn, lambda m, lr=lr: evaluate_molecules(m, lr.dataset_info, smiles),
                                   n_samples, iterations, T, device, seed=seed, on_iteration=save,
                                   completed=list(done[:iterations]))
        result["run"], result["test_nll"] = row.run, test_nll.get(row.run)
        threads = sorted({it["threads"] for it in result["iterations"] if it.get("threads")})
        if threads:  # where the iterations were measured, not the process assembling them
            result["device"] = f"{device.type.upper()} ({'/'.join(map(str, threads))} thread(s))"
        if path is not None and len(done) > reused:
            write_json(path, {"key": key, "label": row.label, "result": {**result, "iterations": done}})
        results.append(result)
        print(bench.markdown_table([result], baseline_index=None).splitlines()[2], flush=True)
    if out_stem is not None:
        out_stem.parent.mkdir(parents=True, exist_ok=True)
        out_stem.with_suffix(".md").write_text(markdown_report(results, speed) + "\n")
        out_stem.with_suffix(".json").write_text(json.dumps({"results": results, "test_nll": test_nll,
                                                             "sampling_speed": speed}, indent=1))
    return results


def evaluate_in_parallel(row_numbers: Sequence[int], rows: Sequence[EvalRow], jobs: int, child_argv: Sequence[str],
                         script: Path, costs: Sequence[int] | None = None) -> None:
    """Run the rows' sampling in ``jobs`` child processes of ``script evaluate`` (one thread each),
    filling the shared cache; the caller then assembles the table from it. ``costs``: the work
    left per row (``remaining_costs``); rows with none get no job."""
    groups = partition_rows(rows, jobs, costs)
    procs = []
    for group in groups:
        numbers = ",".join(str(row_numbers[i]) for i in group)
        argv = [sys.executable, str(script), "evaluate", "--rows", numbers, "--jobs", "1", "--no_nll", "--no_report",
                *child_argv]
        print(f"job {len(procs)}: rows {numbers} ({', '.join(rows[i].label for i in group)})", flush=True)
        procs.append(subprocess.Popen(argv, env=_single_thread_env()))
    wait_for_jobs(procs)


def wait_for_jobs(procs: Sequence[subprocess.Popen]) -> None:
    """Wait for parallel evaluation processes; Ctrl-C stops them all; a failure is a one-line error
    (their finished iterations are cached, so the same command resumes)."""
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    if any(codes):
        raise RunFolderError(f"evaluation job(s) failed with exit codes {codes}; finished iterations are cached, "
                             "rerun the same command to resume")


def _test_nll(lr, datadir: str | None) -> float:
    import torch

    from qm9.dataset import retrieve_dataloaders
    from training.data import build_loaders
    from training.loop import test
    from training.run import seed_everything

    args = lr.args
    if datadir is not None:
        args.datadir = datadir
    loaders = build_loaders(retrieve_dataloaders(args)[0], args)
    seed_everything(0)
    return test(args, loaders["test"], 0, lr.model, torch.device("cpu"), torch.float32, lr.nodes_dist, "Test")


def markdown_report(results: Sequence[dict[str, Any]], speed: dict | None = None) -> str:
    """| model | start | steps | atom stab | mol stab | valid | V x U | novelty | s/mol | (mean ± std over iterations).

    ``speed``: a ``study_speed`` record; its one-process timings replace the evaluation's for the
    rows it has."""
    from training.sampling_benchmark import _pm

    timed = {} if speed is None else {r["label"]: r for r in speed["rows"].values()}

    def seconds(r: dict) -> str:
        if r["label"] in timed:
            t = timed[r["label"]]
            return f"{t['s_per_molecule']:.4f} ± {t['s_per_molecule_std']:.4f}"
        return _pm(r, "s_per_molecule", 1.0, 4)

    header = ["row", "model", "start", "steps", "atom stab (%)", "mol stab (%)", "valid (%)", "V x U (%)",
              "novelty (%)", "s / mol", "test NLL"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        setting = r["setting"]
        start = f"N(0, v_{setting['start_step']} I) at {setting['start_step']}" if setting["start_step"] else "N(0, I) at 1000"
        nll = r.get("test_nll")
        lines.append("| " + " | ".join([
            r["label"], r["run"], start, str(r["steps"]), _pm(r, "atm_stable"), _pm(r, "mol_stable"), _pm(r, "validity"),
            _pm(r, "validity_x_uniqueness"), _pm(r, "novelty"), seconds(r),
            "n/a" if nll is None else f"{nll:.2f}",
        ]) + " |")
    n, k = results[0]["n_samples"], len(results[0]["iterations"])
    threads = sorted({it.get("threads") for r in results for it in r["iterations"] if it.get("threads")})
    own = (f"each iteration's sampling wall clock on {results[0]['device'].split(' (')[0]}, in its row's evaluation "
           "process" + (f" with {'/'.join(map(str, threads))} thread(s)" if threads else ""))
    lines += ["", f"{n} molecules per iteration, {k} iterations, mean ± std."]
    n_timed = sum(r["label"] in timed for r in results)
    if n_timed:
        lines += [f"Seconds per molecule (mean ± std over {speed['n_batches']} batches of {speed['batch_size']}): "
                  f"the rows sampled in turn in one process with {speed['threads']} thread(s) "
                  "(`python equal_budget.py speed`)"
                  + ("" if n_timed == len(results) else f"; rows it has not timed: {own}")
                  + f". The evaluation's own timings ({own}) are in the JSON."]
    else:
        lines += [f"Seconds per molecule: {own}."]
    return "\n".join(lines)
