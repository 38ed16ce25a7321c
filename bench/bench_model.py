"""Speed of the paper's QM9 model (nf 256, 9 layers) and a small one (nf 64, 4 layers).

Prints JSON: milliseconds per training step (forward + backward of the training loss on a
batch of 64 real QM9 training molecules, EDM's padded batch) and per sampling step (one
reverse step z_t -> z_s for 100 molecules with sizes drawn from the QM9 histogram, padded
to 29 like EDM's sampler), best of ``--repeats``, with 1 and 2 threads (each in a fresh
process); and the speed-up over the reference figures (EDM's code on this 2-core machine
class, quiet machine).

    python bench/bench_model.py [--repeats 5] [--models full,small] [--threads 1,2]

``--baseline DIR`` times another checkout (e.g. ``git worktree add /tmp/base <commit>``) and this
one alternately, each in fresh processes, ``--rounds`` times: a before/after comparison on a
shared machine (best and median round of each).

``--compare_policies`` instead times the execution policies of ``egnn.device_policy`` on the
paper's configurations (QM9 nf 256 / 9 layers at batch 64 and 256, GEOM nf 256 / 4 layers at
batch 32; sampling steps on the same number of molecules, padded to the dataset's largest):
size-grouped, one padded block, and the padded block under torch.compile. On a GPU:

    python bench/bench_model.py --device cuda --compare_policies      # a few minutes

GEOM batches are drawn from GEOM's atom-count histogram with random coordinates (the data
cannot be shipped; speed depends on sizes, not on chemistry).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:  # installed (`pip install -e .`): the packages import as they are
    import configs  # noqa: F401
except ImportError:  # a plain checkout: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.datasets_config import get_dataset_info  # noqa: E402
from equivariant_diffusion.distributions import DistributionNodes  # noqa: E402
from qm9.data.collate import make_batch  # noqa: E402
from qm9.data.qm9 import load_qm9  # noqa: E402
from qm9.losses import compute_loss_and_nll, preprocess_batch  # noqa: E402
from qm9.models import get_model  # noqa: E402
from qm9.sampling import masks_from_sizes  # noqa: E402

MODELS = {"full": dict(nf=256, n_layers=9), "small": dict(nf=64, n_layers=4)}
# EDM's code, best of 5, seconds: {model: {"train": (1 thread, 2 threads), "sample": (...)}}.
REFERENCE_S = {
    "full": {"train": (19.9, 14.8), "sample": (6.7, 6.2)},
    "small": {"train": (0.47, 0.37), "sample": (0.27, 0.17)},
}


def qm9_args(nf: int, n_layers: int) -> argparse.Namespace:
    """EDM's QM9 run (outputs/edm_qm9/args.pickle) with the given width and depth."""
    return argparse.Namespace(
        model="egnn_dynamics", probabilistic_model="diffusion", nf=nf, n_layers=n_layers, inv_sublayers=1,
        attention=True, tanh=True, norm_constant=1, sin_embedding=False, normalization_factor=1,
        aggregation_method="sum", condition_time=True, context_node_nf=0, diffusion_steps=1000,
        diffusion_noise_schedule="polynomial_2", diffusion_noise_precision=1e-5, diffusion_loss_type="l2",
        normalize_factors=[1, 4, 10], include_charges=True, conditioning=[], remove_h=False, dataset="qm9",
    )


def training_batch(datadir: str, batch_size: int, seed: int) -> dict:
    arrays = load_qm9(datadir, "train", progress=False)
    rows = np.random.default_rng(seed).choice(len(arrays["num_atoms"]), batch_size, replace=False)
    return make_batch(arrays["positions"][rows], arrays["charges"][rows], arrays["one_hot"][rows],
                      arrays["num_atoms"][rows], arrays["index"][rows])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, first-call overheads)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000.0


def bench_model(args, batch, sample_sizes, repeats: int) -> dict:
    info = get_dataset_info("qm9", False)
    torch.manual_seed(0)
    model, nodes_dist, _ = get_model(args, "cpu", info, None)
    x, h, node_mask, edge_mask, context = preprocess_batch(batch, "cpu", torch.float32, True, False)

    def train_step():
        model.train()
        model.zero_grad(set_to_none=True)
        nll, _, _ = compute_loss_and_nll(args, model, nodes_dist, x, h, node_mask, edge_mask, context)
        nll.backward()

    s_node_mask, s_edge_mask = masks_from_sizes(sample_sizes, info["max_n_nodes"], "cpu")
    torch.manual_seed(1)
    z = model.sample_combined_position_feature_noise(len(sample_sizes), info["max_n_nodes"], s_node_mask)
    t = torch.full((len(sample_sizes), 1), 500) / 1000
    s = torch.full((len(sample_sizes), 1), 499) / 1000

    def sample_step():
        model.eval()
        with torch.no_grad():
            model.sample_p_zs_given_zt(s, t, z, s_node_mask, s_edge_mask, None)

    return {"train_ms": round(best_of(train_step, repeats), 1), "sample_ms": round(best_of(sample_step, repeats), 1)}


PAPER_CONFIGS = {  # name: (dataset, nf, n_layers, batch size)
    "qm9_b64": ("qm9", 256, 9, 64),
    "qm9_b256": ("qm9", 256, 9, 256),
    "geom_b32": ("geom", 256, 4, 32),
}
POLICIES = {  # name: (group_by_size, torch.compile)
    "grouped": ("true", False),
    "padded": ("false", False),
    "compiled": ("false", True),
}


def synthetic_batch(dataset: str, batch_size: int, seed: int) -> dict:
    """A batch with the dataset's atom-count distribution, random positions and atom types."""
    info = get_dataset_info(dataset, False)
    torch.manual_seed(seed)
    sizes = DistributionNodes(info["n_nodes"]).sample(batch_size).numpy()
    rng = np.random.default_rng(seed)
    m, k = int(sizes.max()), len(info["atom_decoder"])
    slots = np.arange(m)[None, :] < sizes[:, None]
    types = rng.integers(0, k, size=(batch_size, m))
    one_hot = np.eye(k, dtype=bool)[types] & slots[..., None]
    charges = np.where(slots, np.asarray(info["atomic_nb"])[types], 0)
    positions = rng.normal(scale=2.0, size=(batch_size, m, 3)) * slots[..., None]
    return make_batch(positions, charges, one_hot, sizes)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of_on(device: torch.device, fn, repeats: int) -> float:
    """Best wall time of ``fn`` in ms, waiting for the device around each call."""
    fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times) * 1000.0


def compare_policies(opts: argparse.Namespace) -> dict:
    """ms per training step and per sampling step, per paper config and execution policy."""
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    policies = opts.policies.split(",") if opts.policies else (
        ["grouped", "padded", "compiled"] if device.type == "cuda" else ["grouped", "padded"])
    configs = opts.configs.split(",")
    for name in policies + configs:
        if name not in POLICIES and name not in PAPER_CONFIGS:
            raise SystemExit(f"unknown policy or config {name!r}; policies: {', '.join(POLICIES)}; "
                             f"configs: {', '.join(PAPER_CONFIGS)}")
    from egnn.device_policy import configure_matmul

    configure_matmul(device, opts.tf32)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": opts.repeats,
              "tf32": bool(opts.tf32), "results": {}}
    for config in configs:
        dataset, nf, n_layers, batch_size = PAPER_CONFIGS[config]
        info = get_dataset_info(dataset, False)
        if dataset == "qm9":
            batch = training_batch(opts.datadir, batch_size, opts.seed)
        else:
            batch = synthetic_batch(dataset, batch_size, opts.seed)
        torch.manual_seed(opts.seed)
        sample_sizes = DistributionNodes(info["n_nodes"]).sample(batch_size)
        for policy in policies:
            group_by_size, compiled = POLICIES[policy]
            args = qm9_args(nf, n_layers)
            args.dataset, args.group_by_size, args.compile = dataset, group_by_size, compiled
            args.compile_backend = opts.compile_backend
            if dataset == "geom":
                args.include_charges = False
            torch.manual_seed(0)
            model, nodes_dist, _ = get_model(args, device, info, None)
            model = model.to(device)
            x, h, node_mask, edge_mask, context = preprocess_batch(batch, device, torch.float32, args.include_charges, False)
            s_node_mask, s_edge_mask = masks_from_sizes(sample_sizes, info["max_n_nodes"], device)
            z = model.sample_combined_position_feature_noise(batch_size, info["max_n_nodes"], s_node_mask)
            t = torch.full((batch_size, 1), 0.5, device=device)
            s = torch.full((batch_size, 1), 0.499, device=device)

            def train_step():
                model.train()
                model.zero_grad(set_to_none=True)
                nll, _, _ = compute_loss_and_nll(args, model, nodes_dist, x, h, node_mask, edge_mask, context)
                nll.backward()

            def sample_step():
                model.eval()
                with torch.no_grad():
                    model.sample_p_zs_given_zt(s, t, z, s_node_mask, s_edge_mask, None)

            start = time.perf_counter()
            row = {"train_ms": round(best_of_on(device, train_step, opts.repeats), 1),
                   "sample_ms": round(best_of_on(device, sample_step, opts.repeats), 1)}
            row["seconds_incl_warmup"] = round(time.perf_counter() - start, 1)
            report["results"].setdefault(config, {})[policy] = row
            print(json.dumps({config: {policy: row}}), file=sys.stderr)
            del model
    return report


def measure_in_subprocess(opts: argparse.Namespace, name: str, n_threads: int, script: str = __file__) -> dict:
    """One (model, thread count) measurement in a fresh process: thread pools and cached
    GEMM kernels of a process are set up for its first thread count. ``script``: this file, or
    the same file of another checkout (``--baseline``)."""
    cmd = [sys.executable, script, "--worker", "--models", name, "--threads", str(n_threads),
           "--repeats", str(opts.repeats), "--datadir", str(Path(opts.datadir).resolve()), "--seed", str(opts.seed)]
    if opts.no_grouping:
        cmd.append("--no_grouping")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(script).resolve().parents[1])
    if done.returncode != 0:
        raise SystemExit(f"benchmark worker failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout)


def compare_with_baseline(opts: argparse.Namespace, names: list[str], threads: list[int]) -> dict:
    """ms per step of this checkout and of ``opts.baseline`` (another checkout, e.g. ``git
    worktree add /tmp/base <commit>``), in fresh processes alternating baseline, ours, baseline,
    ... for ``opts.rounds`` rounds, so that load from other work hits both alike. Per round each
    process reports its best of ``--repeats``; the summary gives the best and the median round."""
    baseline_script = Path(opts.baseline) / "bench" / "bench_model.py"
    if not baseline_script.is_file():
        raise SystemExit(f"--baseline {opts.baseline}: no bench/bench_model.py there; pass a checkout of this repository")
    report = {"load_average_at_start": [round(v, 2) for v in os.getloadavg()], "rounds": opts.rounds,
              "repeats": opts.repeats, "baseline": str(opts.baseline), "results": {}}
    for name in names:
        for n_threads in threads:
            runs: dict = {"baseline": [], "ours": []}
            for _ in range(opts.rounds):
                runs["baseline"].append(measure_in_subprocess(opts, name, n_threads, str(baseline_script)))
                runs["ours"].append(measure_in_subprocess(opts, name, n_threads))
            row = {}
            for which, results in runs.items():
                for kind in ("train_ms", "sample_ms"):
                    values = [r[kind] for r in results]
                    row.setdefault(which, {})[kind] = {"best": min(values), "median": round(float(np.median(values)), 1),
                                                      "rounds": values}
            row["speedup_best"] = {k: round(row["baseline"][k]["best"] / row["ours"][k]["best"], 3)
                                   for k in ("train_ms", "sample_ms")}
            row["speedup_median"] = {k: round(row["baseline"][k]["median"] / row["ours"][k]["median"], 3)
                                     for k in ("train_ms", "sample_ms")}
            report["results"][f"{name}_{n_threads}thread"] = row
            print(json.dumps({f"{name}_{n_threads}thread": row}), file=sys.stderr, flush=True)
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="full,small")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--datadir", default="qm9/temp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_grouping", action="store_true",
                        help="run the network on the padded batch (no size groups): the cost of padding")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compare_policies", action="store_true",
                        help="time grouped / padded / compiled execution on the paper configs")
    parser.add_argument("--policies", default=None,
                        help="subset of grouped,padded,compiled (default: all on cuda, grouped,padded on cpu)")
    parser.add_argument("--configs", default=",".join(PAPER_CONFIGS), help="subset of " + ",".join(PAPER_CONFIGS))
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend of the compiled policy")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    parser.add_argument("--baseline", default=None,
                        help="another checkout of this repository: time it and this one alternately (before/after)")
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline: alternating rounds per model")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.compare_policies:
        print(json.dumps(compare_policies(opts), indent=1))
        return
    if opts.device != "cpu":
        raise SystemExit("the thread-scaling benchmark is CPU-only; on a GPU use --device cuda --compare_policies")
    threads = [int(n) for n in opts.threads.split(",")]
    names = opts.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    if opts.baseline and not opts.worker:
        print(json.dumps(compare_with_baseline(opts, names, threads), indent=1))
        return
    batch = training_batch(opts.datadir, 64, opts.seed)
    torch.manual_seed(opts.seed)
    sample_sizes = DistributionNodes(get_dataset_info("qm9", False)["n_nodes"]).sample(100)

    if opts.worker:  # one measurement, printed as JSON for the parent process
        torch.set_num_threads(threads[0])
        args = qm9_args(**MODELS[names[0]])
        args.group_by_size = not opts.no_grouping
        print(json.dumps(bench_model(args, batch, sample_sizes, opts.repeats)))
        return

    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    # other work on the machine inflates the timings; the reference was quiet
                    "load_average_at_start": round(os.getloadavg()[0], 2)},
        "train_batch": {"molecules": 64, "padded_atoms": int(batch["atom_mask"].shape[1]),
                        "mean_atoms": round(float(batch["num_atoms"].float().mean()), 2)},
        "sample_batch": {"molecules": 100, "padded_atoms": 29,
                         "mean_atoms": round(float(sample_sizes.float().mean()), 2)},
        "repeats": opts.repeats,
        "grouping": not opts.no_grouping,
        "models": {},
    }
    for name in names:
        result = {"train_ms": {}, "sample_ms": {}}
        for n_threads in threads:
            one = measure_in_subprocess(opts, name, n_threads)
            result["train_ms"][str(n_threads)] = one["train_ms"]
            result["sample_ms"][str(n_threads)] = one["sample_ms"]
        speedup = {}
        for kind in ("train", "sample"):
            for i, n_threads in enumerate((1, 2)):
                if str(n_threads) in result[f"{kind}_ms"]:
                    ref_ms = REFERENCE_S[name][kind][i] * 1000.0
                    speedup[f"{kind}_{n_threads}thread"] = round(ref_ms / result[f"{kind}_ms"][str(n_threads)], 2)
        result["reference_ms"] = {k: [v * 1000.0 for v in pair] for k, pair in REFERENCE_S[name].items()}
        result["speedup_vs_reference"] = speedup
        report["models"][name] = {**MODELS[name], **result}
        print(json.dumps({name: report["models"][name]}), file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
