"""Training a property classifier (EDM's ``qm9/property_prediction/main_qm9_prop.py``) as a library.

EDM's recipe (edm_conditional.md §3.2-§3.3): train on ``qm9_first_half`` (50,000 molecules),
select on QM9's validation split (17,748), report the test MAE on the *second half* (50,000,
the conditional generator's training data: the "QM9 lower bound" of Table 3). Mean/MAD of the
property on the validation split; training loss L1 in normalised units; Adam (coupled weight
decay 1e-16) with a cosine schedule over ``--epochs`` that EDM steps at the *start* of every
epoch; batch 96; no clipping, no EMA. ``--model_name numnodes`` trains the #Atoms baseline.

The run folder is EDM's classifier folder, ``<outf>/<exp_name>/{args.pickle,
best_checkpoint.npy, losess.json}`` (the state dict with the best validation MAE), so
``eval_conditional_qm9.py --classifiers_path`` reads ours and EDM's alike. Additions: every
file is written atomically; ``resume_state.pt`` (model, optimiser, schedule, log, epoch) is
written after every epoch and ``--resume`` continues exactly (the shuffling is a function of
``--seed`` and the epoch); ``--seed`` seeds the initialisation (EDM's was never applied); the
network runs on size groups on the CPU (same outputs, less padding); the test MAE (50,000
molecules) is computed only at epochs where validation improves (``--test_every_epoch True``:
every validation epoch, as EDM), which leaves the reported best-validation test MAE unchanged.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from configs.atomic_io import atomic_write, atomic_write_bytes, remove_stale_temp_files, unwritable_reason
from configs.datasets import dataset_entry, resolve_hook
from configs.errors import CheckpointError, RunFolderError, UserInputError
from configs.flags import at_least, check_flags, check_plain_name, compact_errors, positive, str2bool
from configs.run_args import load_run_args, save_run_args
from qm9.data.collate import PaddedMoleculeDataset
from qm9.data.qm9 import PROPERTIES
from qm9.property_prediction.models_property import classifier_inputs, get_model
from qm9.property_prediction.recipe import make_optimizer, normalised_l1, physical_mae, start_epoch
from qm9.utils import compute_mean_mad_from_dataloader

CHECKPOINT_FILE = "best_checkpoint.npy"
LOG_FILE = "losess.json"  # EDM's spelling
RESUME_FILE = "resume_state.pt"
MODEL_NAMES = ("egnn", "numnodes")
CLASSIFIER_DATASETS = ("qm9_first_half", "qm9_second_half", "qm9")
# Flags a resumed run may change; everything else (--epochs too: it is the cosine period) must match.
RESUME_OVERRIDABLE = {"test_interval", "log_interval", "num_workers", "no_cuda", "datadir", "save_model",
                      "group_by_size", "resume", "outf", "stop_after_epochs",
                      "test_every_epoch"}

FLAG_RULES = {
    "batch_size": at_least(1, high=100_000),
    "epochs": at_least(1, high=10**7),
    "seed": at_least(0, high=2**32 - 1),
    "log_interval": at_least(1),
    "test_interval": at_least(1),
    "lr": positive(high=10.0),
    "nf": at_least(1, high=4096),
    "n_layers": at_least(0, high=64),
    "num_workers": at_least(0),
    "weight_decay": at_least(0.0, kind=float),
    "data_subset": at_least(1, optional=True),
}


def build_parser() -> argparse.ArgumentParser:
    """EDM's flags of main_qm9_prop.py (names and defaults), plus --resume, --overwrite,
    --data_subset and --group_by_size."""
    p = compact_errors(argparse.ArgumentParser(
        prog="main_qm9_prop.py", description="Train EDM's property classifier (or the #Atoms baseline) on QM9."))
    a = p.add_argument
    a("--exp_name", type=str, default="debug", help="run folder name under --outf")
    a("--batch_size", type=int, default=96)
    a("--epochs", type=int, default=1000, help="epochs; also the cosine schedule's period (EDM)")
    a("--no-cuda", dest="no_cuda", action="store_true", default=False)
    a("--seed", type=int, default=1, help="seed of the initialisation and of the shuffling")
    a("--log_interval", type=int, default=20, help="batches between progress-bar loss updates")
    a("--test_interval", type=int, default=1, help="validate and test every this many epochs")
    a("--outf", type=str, default="qm9/property_prediction/outputs",
      help="parent of the run folder (EDM's classifier folders live in qm9/property_prediction/outputs)")
    a("--lr", type=float, default=1e-3, help="EDM's README: 5e-4 for alpha, mu, Cv; 1e-3 for gap, homo, lumo")
    a("--nf", type=int, default=128)
    a("--attention", type=int, default=1)
    a("--n_layers", type=int, default=7)
    a("--property", type=str, default="alpha", help=f"one of {', '.join(PROPERTIES)}")
    a("--num_workers", type=int, default=0, help="accepted for EDM compatibility (batches are gathered in-process)")
    a("--filter_n_atoms", type=int, default=None, help="train only on molecules with this many atoms")
    a("--charge_power", type=int, default=2, help="accepted for EDM compatibility; unused (as in EDM)")
    a("--dataset", type=str, default="qm9_first_half",
      help="training split: qm9_first_half (EDM; tested on qm9_second_half), qm9_second_half or qm9")
    a("--datadir", type=str, default="qm9/temp", help="dataset cache folder")
    a("--remove_h", action="store_true", help="refused: EDM's classifiers see hydrogens")
    a("--include_charges", type=str2bool, default=True, help="accepted for EDM compatibility; the model never reads charges")
    a("--node_attr", type=int, default=0, help="0 (EDM's classifiers); 1 is not supported")
    a("--weight_decay", type=float, default=1e-16, help="Adam's (coupled L2) weight decay")
    a("--save_path", type=str, default=None, help="accepted for EDM compatibility; unused (as in EDM)")
    a("--model_name", type=str, default="egnn", help="egnn (the classifier) or numnodes (the #Atoms baseline)")
    a("--save_model", type=str2bool, default=True)
    # --- this implementation ---
    a("--resume", action="store_true", help="continue <outf>/<exp_name> from its resume_state.pt")
    a("--overwrite", action="store_true", help="start afresh in an existing run folder (replacing it)")
    a("--data_subset", type=int, default=None, help="use only the first N molecules of each split (quick runs)")
    a("--group_by_size", type=str, default="auto", choices=("auto", "true", "false"),
      help="run the network on size groups (auto: on the CPU); same outputs, less padding")
    a("--test_every_epoch", type=str2bool, default=False,
      help="also compute the test MAE when validation did not improve (EDM's log); by default only the test MAE "
           "at a new best validation epoch is computed, which is the number EDM reports, at a third less time")
    a("--stop_after_epochs", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a crash
    return p


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """One-line UserInputError for any bad flag, before data is read."""
    check_flags(args, FLAG_RULES)
    check_plain_name("--exp_name", args.exp_name)
    if args.property not in PROPERTIES:
        raise UserInputError(f"--property {args.property!r} is not a QM9 property; choose one of {', '.join(PROPERTIES)}")
    if args.model_name not in MODEL_NAMES:
        raise UserInputError(f"--model_name {args.model_name!r}: choose egnn (the classifier) or numnodes (the #Atoms baseline)")
    entry = dataset_entry(args.dataset)
    if entry.name not in CLASSIFIER_DATASETS:
        raise UserInputError(f"--dataset {args.dataset!r}: classifiers train on {', '.join(CLASSIFIER_DATASETS)} (QM9 has the properties)")
    args.dataset = entry.name
    if args.remove_h:
        raise UserInputError("--remove_h: EDM's property classifiers see every atom; drop the flag")
    if args.node_attr != 0:
        raise UserInputError("--node_attr 1 is not supported; EDM's classifiers use --node_attr 0")
    if args.attention not in (0, 1):
        raise UserInputError(f"--attention must be 0 or 1, got {args.attention}")
    return args


def load_splits(args: argparse.Namespace) -> dict[str, dict[str, np.ndarray]]:
    """train / valid / test arrays as EDM's script reads them: for qm9_first_half the test split is
    qm9_second_half's training split (the molecules the conditional generator learns)."""
    def read(dataset: str, split: str) -> dict[str, np.ndarray]:
        load = resolve_hook(dataset_entry(dataset).split_arrays)
        return load(args.datadir, split, remove_h=False, filter_n_atoms=args.filter_n_atoms, progress=False)

    splits = {"train": read(args.dataset, "train"), "valid": read(args.dataset, "valid")}
    splits["test"] = read("qm9_second_half", "train") if args.dataset == "qm9_first_half" else read(args.dataset, "test")
    if args.data_subset is not None:
        splits = {k: {key: v[: args.data_subset] for key, v in arrays.items()} for k, arrays in splits.items()}
    return splits


def batches(dataset: PaddedMoleculeDataset, batch_size: int, order: torch.Tensor | None = None):
    """EDM batch dicts of ``batch_size`` molecules (in ``order`` if given)."""
    n = len(dataset)
    rows = torch.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield dataset.__getitems__(rows[start : start + batch_size].tolist())


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one training epoch: a function of (seed, epoch), so a resume repeats it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: PaddedMoleculeDataset, prop: str, mean: torch.Tensor, mad: torch.Tensor,
             batch_size: int, device: torch.device, desc: str = "eval") -> float:
    """Mean |MAD * pred + mean - label| over every molecule (EDM units; per-batch means weighted by size)."""
    model.eval()
    total, count = 0.0, 0
    n_batches = math.ceil(len(dataset) / batch_size)
    for batch in tqdm(batches(dataset, batch_size), total=n_batches, desc=desc, leave=False, dynamic_ncols=True,
                      mininterval=_bar_interval()):
        label = batch[prop].to(device)
        total += physical_mae(model(**classifier_inputs(batch, device)), label, mean, mad).item() * len(label)
        count += len(label)
    return total / max(count, 1)


def _bar_interval() -> float:
    return 0.5 if sys.stderr.isatty() else 60.0


def _save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _resolve_run_folder(args: argparse.Namespace, explicit: set[str] | None = None) -> tuple[Path, dict | None]:
    """The run folder and, with --resume, its saved state. Resuming takes the stored flags; a flag
    written on the command line (``explicit``; None = all) may differ only if it is overridable."""
    run_dir = Path(args.outf) / args.exp_name
    if args.resume:
        path = run_dir / RESUME_FILE
        if not path.is_file():
            raise RunFolderError(f"--resume: {path} does not exist; start the run without --resume")
        stored = load_run_args(run_dir)
        for key, value in vars(stored).items():
            given = explicit is None or key in explicit
            if key in RESUME_OVERRIDABLE or key == "overwrite" or not hasattr(args, key):
                continue
            if given and getattr(args, key) != value:
                raise UserInputError(f"--{key} cannot change when resuming (the run has {value!r}, you passed "
                                     f"{getattr(args, key)!r}); drop it, or start a new run")
            setattr(args, key, value)
        check_args(args)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
            raise CheckpointError(f"cannot read {path} ({type(e).__name__}); start afresh with --overwrite") from None
        return run_dir, saved
    existing = [name for name in (CHECKPOINT_FILE, RESUME_FILE) if (run_dir / name).exists()]
    if existing and not args.overwrite:
        raise RunFolderError(f"{run_dir} already holds a classifier run ({', '.join(existing)}); continue it with "
                             f"--resume, replace it with --overwrite, or choose another --exp_name")
    if args.save_model:
        reason = unwritable_reason(run_dir)
        if reason:
            raise RunFolderError(f"{reason}; choose another --outf")
    return run_dir, None


def train(args: argparse.Namespace, explicit: set[str] | None = None) -> dict[str, Any]:
    """Train (or continue) a classifier; returns EDM's log dict (epochs, losess, best_val, best_test,
    best_epoch) plus the last validation/test MAE and the run folder. ``explicit``: the flags written
    on the command line (a resumed run takes the others from its args.pickle)."""
    args = check_args(args)
    run_dir, saved = _resolve_run_folder(args, explicit)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")
    splits = load_splits(args)
    norms = compute_mean_mad_from_dataloader(splits["valid"], [args.property])[args.property]
    mean, mad = norms["mean"].to(device), norms["mad"].to(device)
    data = {k: PaddedMoleculeDataset(v) for k, v in splits.items()}
    torch.manual_seed(args.seed)
    model = get_model(args.model_name, args.nf, args.n_layers, bool(args.attention), args.node_attr, device)
    if hasattr(model, "group_by_size"):
        model.group_by_size = args.group_by_size
    optimizer, scheduler = make_optimizer(model, args.lr, args.weight_decay, args.epochs)
    log = {"epochs": [], "losess": [], "best_val": 1e10, "best_test": 1e10, "best_epoch": 0}
    first_epoch = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        log, first_epoch = saved["log"], int(saved["epoch"])
        print(f"Resuming {run_dir} at epoch {first_epoch}")
    if args.save_model:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(run_dir)
        save_run_args(run_dir, argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                     if k not in ("resume", "overwrite", "stop_after_epochs")}))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model_name} for {args.property}: {n_params:,} parameters; train {len(data['train'])} ({args.dataset}), "
          f"valid {len(data['valid'])}, test {len(data['test'])}; mean {float(mean):.4f}, MAD {float(mad):.4f}; {device}")
    val_mae = test_mae = float("nan")
    for epoch in range(first_epoch, args.epochs):
        start = time.time()
        lr = start_epoch(scheduler)
        model.train()
        order = epoch_order(len(data["train"]), args.seed, epoch)
        n_batches = math.ceil(len(order) / args.batch_size)
        bar = tqdm(batches(data["train"], args.batch_size, order), total=n_batches, desc=f"epoch {epoch}",
                   leave=False, dynamic_ncols=True, mininterval=_bar_interval())
        total, count = 0.0, 0
        for i, batch in enumerate(bar):
            label = batch[args.property].to(device)
            optimizer.zero_grad()
            loss = normalised_l1(model(**classifier_inputs(batch, device)), label, mean, mad)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(label)
            count += len(label)
            if i % args.log_interval == 0:
                bar.set_postfix(l1=f"{total / count:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.close()
        train_mae = total / max(count, 1) * float(mad)  # L1 in property units (the loss is normalised)
        message = f"Epoch {epoch}: train MAE {train_mae:.4f} (lr {lr:.3e}, {time.time() - start:.1f} s)"
        if epoch % args.test_interval == 0:
            val_mae = evaluate(model, data["valid"], args.property, mean, mad, args.batch_size, device, "valid")
            improved = val_mae < log["best_val"]
            test_mae = float("nan")
            if improved or args.test_every_epoch:  # the reported test MAE is the one at the best validation epoch
                test_mae = evaluate(model, data["test"], args.property, mean, mad, args.batch_size, device, "test")
            log["epochs"].append(epoch)
            log["losess"].append(None if math.isnan(test_mae) else test_mae)
            if improved:
                log.update(best_val=val_mae, best_test=test_mae, best_epoch=epoch)
                if args.save_model:
                    _save_torch(run_dir / CHECKPOINT_FILE, model.state_dict())
            test_text = "not computed (no improvement)" if math.isnan(test_mae) else f"{test_mae:.4f}"
            message += (f"; valid MAE {val_mae:.4f}, test MAE {test_text}; best valid {log['best_val']:.4f} "
                        f"(test {log['best_test']:.4f}, epoch {log['best_epoch']})")
            if args.save_model:
                atomic_write_bytes(run_dir / LOG_FILE, json.dumps(log).encode())
        print(message, flush=True)
        if args.save_model:
            _save_torch(run_dir / RESUME_FILE, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "scheduler": scheduler.state_dict(), "log": log, "epoch": epoch + 1})
        if args.stop_after_epochs is not None and epoch + 1 >= args.stop_after_epochs:
            print(f"stopped after {epoch + 1} epochs (--stop_after_epochs)")
            break
    return {**log, "val_mae": val_mae, "test_mae": test_mae, "run_dir": str(run_dir), "model": model}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse main_qm9_prop.py's command line and train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    explicit_parser = build_parser()
    for action in explicit_parser._actions:  # noqa: SLF001 - argparse has no public API for this
        action.default = argparse.SUPPRESS
    return train(args, set(vars(explicit_parser.parse_args(argv))))


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, argparse.Namespace]:
    """(model in eval mode, its args) from a classifier folder (ours or EDM's: args.pickle +
    best_checkpoint.npy, loaded strictly). Unlike EDM's eval script, the folder's ``model_name``
    is honoured, so the #Atoms baseline (numnodes) is evaluated like the classifier."""
    from qm9.models import check_state_dict, read_state_dict

    folder = Path(path)
    args = load_run_args(folder)
    source = str(folder / "args.pickle")
    model_name = getattr(args, "model_name", "egnn")
    if model_name not in MODEL_NAMES:
        raise RunFolderError(f"{source}: model_name {model_name!r} is not a property classifier (egnn or numnodes)")
    prop = getattr(args, "property", None)
    if prop not in PROPERTIES:
        raise RunFolderError(f"{source}: property {prop!r} is not one of {', '.join(PROPERTIES)}")
    sizes = {k: getattr(args, k, d) for k, d in (("nf", 128), ("n_layers", 7), ("attention", 1), ("node_attr", 0))}
    try:
        check_flags(sizes, {k: FLAG_RULES[k] for k in ("nf", "n_layers")})
        model = get_model(model_name, sizes["nf"], sizes["n_layers"], bool(sizes["attention"]), sizes["node_attr"], device)
    except ValueError as e:
        raise RunFolderError(f"{source}: {str(e).replace('--', '', 1)}") from None
    weights = folder / CHECKPOINT_FILE
    state = read_state_dict(weights)
    check_state_dict(model, state, str(weights), f"model_name={model_name!r}, nf={sizes['nf']}, n_layers={sizes['n_layers']}")
    model.load_state_dict(state, strict=True)
    args.model_name, args.property = model_name, prop
    return model.to(device).eval(), args
