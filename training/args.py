"""The command line of main_qm9.py / main_geom_drugs.py: EDM's flags, EDM's defaults, GAGA's additions.

EDM parses many flags with ``type=eval`` (``--dp=True``, ``--normalize_factors [1,4,10]``).
Here the same spellings are parsed without eval: booleans by ``str2bool`` and number lists
by ``ast.literal_eval`` restricted to numbers. argparse keeps prefix matching on, because
the GAGA README passes ``--include_charge=False`` (a prefix of ``--include_charges``).

Flags beyond EDM's:
* GAGA: ``--max_t`` (largest training timestep; default None = T), ``--dataset_var``
  (data variance for the Gaussian start), ``--sampling_step_size``, ``--zero_center_h``
  (auto/true/false; auto = true iff --max_t is given; the resolved bool is stored).
* ``--seed``; ``--sampler`` (ddpm/ddim) for the in-training stability check.
* ``--output_root``: parent of the run folders (default outputs, EDM's).
* ``--data_subset N``: use only the first N molecules of each split (quick runs, tests).
* ``--checkpoint_every_steps K``: also write the resume state every K training steps.
* ``--nan_patience P``: stop after P consecutive batches with a non-finite loss or gradient.
* ``--lr_schedule 70:1e-4``: piecewise-constant lr by epoch (``training.lr_schedule``); may be
  added on ``--resume`` where it leaves the epochs already trained unchanged.
* ``--wandb``: turn on Weights & Biases logging (off by default; ``--no_wandb=False`` too).
* Devices (``egnn.device_policy``): ``--group_by_size auto|true|false`` (size-grouped network
  calls; auto = on the CPU only), ``--compile`` (torch.compile the network on the padded
  path), ``--tf32`` (TF32 matmuls on CUDA; off by default).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Sequence

from configs.datasets import FAMILIES, dataset_family, dataset_names
from configs.datasets_config import published_dataset_var
from configs.errors import UserInputError
from configs.flags import compact_errors, number_list, parse_number_list, str2bool  # noqa: F401 - str2bool/number_list: public names here
from configs.run_args import infer_zero_center_h
from egnn.egnn_new import IMPLS as EGNN_IMPLS
from egnn.registry import backbone_names
from equivariant_diffusion.samplers import sampler_names
from training.compat import warn_no_op_flags
from training.latent_args import add_latent_flags, resolve_latent_args
from training.lr_schedule import canonical as canonical_lr_schedule
from egnn.device_policy import group_by_size_choice

SCRIPTS = FAMILIES  # a dataset's family (configs/datasets.py) names the script whose defaults it takes


def optional_int(text: str) -> int | None:
    if str(text).strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or None, got {text!r}") from None


def zero_center_choice(text: str) -> str:
    lowered = str(text).strip().lower()
    if lowered == "auto":
        return "auto"
    try:
        return "true" if str2bool(lowered) else "false"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}") from None


# EDM's defaults where main_qm9.py and main_geom_drugs.py differ.
_SCRIPT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qm9": dict(
        n_epochs=200, batch_size=128, lr=2e-4, nf=128, dataset="qm9", n_report_steps=1, test_epochs=10,
        n_stability_samples=500, normalize_factors=[1, 4, 1], include_charges=True,
        visualize_every_batch=int(1e8),
    ),
    "geom": dict(
        n_epochs=10000, batch_size=128, lr=5e-4, nf=192, dataset="geom", n_report_steps=50, test_epochs=1,
        n_stability_samples=20, normalize_factors=[1, 4, 10], include_charges=False,
        visualize_every_batch=5000,
    ),
}


def build_parser(script: str = "qm9") -> argparse.ArgumentParser:
    """The parser of main_qm9.py (script='qm9') or main_geom_drugs.py (script='geom')."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; choose one of {SCRIPTS}")
    d = _SCRIPT_DEFAULTS[script]
    p = argparse.ArgumentParser(
        prog="main_qm9.py" if script == "qm9" else "main_geom_drugs.py",
        description="Train an E(3) equivariant diffusion model (EDM), optionally with GAGA's truncated training.",
    )
    compact_errors(p)
    a = p.add_argument
    # --- experiment and model ---
    a("--exp_name", type=str, default="debug_10", help="run folder name under outputs/")
    a("--model", type=str, default="egnn_dynamics", choices=backbone_names(),
      help="noise-prediction network, a backbone registered in egnn/registry.py")
    a("--probabilistic_model", type=str, default="diffusion", help="diffusion")
    a("--diffusion_steps", type=int, default=200, help="T, the number of diffusion steps")
    a("--diffusion_noise_schedule", type=str, default="learned",
      help="learned (EDM's GammaNetwork, needs --diffusion_loss_type vlb), polynomial_<power> or cosine")
    a("--diffusion_noise_precision", type=float, default=1e-5)
    a("--diffusion_loss_type", type=str, default="vlb", help="vlb or l2")
    a("--n_epochs", type=int, default=d["n_epochs"])
    a("--batch_size", type=int, default=d["batch_size"], help="global batch size (split over GPUs/processes)")
    a("--lr", type=float, default=d["lr"])
    a("--lr_schedule", type=str, default=None,
      help="piecewise-constant lr by epoch: epoch:lr pairs, e.g. 70:1e-4 (lr 1e-4 from epoch 70 on; --lr before)")
    a("--brute_force", type=str2bool, default=False, help="accepted for EDM compatibility; unused")
    a("--actnorm", type=str2bool, default=True, help="accepted for EDM compatibility; unused")
    a("--break_train_epoch", type=str2bool, default=False, help="stop each epoch after one batch (debugging)")
    a("--dp", type=str2bool, default=True, help="DataParallel when more than one GPU is visible")
    a("--condition_time", type=str2bool, default=True)
    a("--clip_grad", type=str2bool, default=True, help="EDM's adaptive gradient clipping")
    a("--trace", type=str, default="hutch", help="accepted for EDM compatibility; unused")
    a("--n_layers", type=int, default=6, help="number of equivariant blocks")
    a("--inv_sublayers", type=int, default=1)
    a("--nf", type=int, default=d["nf"], help="hidden width")
    a("--tanh", type=str2bool, default=True)
    a("--attention", type=str2bool, default=True)
    a("--norm_constant", type=float, default=1)
    a("--sin_embedding", type=str2bool, default=False)
    a("--ode_regularization", type=float, default=1e-3, help="weight of the regulariser term (0 for diffusion)")
    # --- data ---
    a("--dataset", type=str, default=d["dataset"], help=f"one of {', '.join(dataset_names())} (configs/datasets.py)")
    a("--datadir", type=str, default="qm9/temp", help="where the processed dataset caches live")
    a("--filter_n_atoms", type=optional_int, default=None, help="train only on molecules with this many atoms")
    a("--dequantization", type=str, default="argmax_variational", help="accepted for EDM compatibility; unused")
    a("--n_report_steps", type=int, default=d["n_report_steps"])
    a("--wandb_usr", type=str, default=None)
    a("--no_wandb", type=str2bool, nargs="?", const=True, default=True,
      help="disable wandb (the default here); --no_wandb=False or --wandb turns it on")
    a("--wandb", dest="no_wandb", action="store_false", help="log to Weights & Biases")
    a("--online", type=str2bool, default=True, help="wandb online (falls back to offline without network)")
    a("--no-cuda", dest="no_cuda", action="store_true", default=False, help="train on the CPU")
    a("--save_model", type=str2bool, default=True)
    a("--generate_epochs", type=int, default=1)
    a("--num_workers", type=int, default=0, help="dataloader worker processes")
    a("--test_epochs", type=int, default=d["test_epochs"], help="validate, test and check stability every this many epochs")
    a("--data_augmentation", type=str2bool, default=False, help="random rotations of the training molecules")
    a("--conditioning", nargs="+", default=[],
      help="properties to condition on, e.g. alpha or alpha gap (alpha, gap, homo, lumo, mu, Cv; EDM's units); "
           "with --dataset qm9_second_half (EDM) or qm9")
    a("--resume", type=str, default=None, help="run folder to continue (outputs/<exp_name>)")
    a("--overwrite", action="store_true",
      help="start afresh in an existing run folder, replacing its weights (without it an existing run is refused)")
    a("--start_epoch", type=int, default=0)
    a("--ema_decay", type=float, default=0.999, help="EMA decay of the weights; 0 disables EMA")
    a("--augment_noise", type=float, default=0)
    a("--n_stability_samples", type=int, default=d["n_stability_samples"])
    a("--normalize_factors", type=number_list, default=list(d["normalize_factors"]),
      help="normalisation of [x, categorical, integer], e.g. [1,4,10]")
    a("--remove_h", action="store_true")
    a("--include_charges", type=str2bool, default=d["include_charges"], help="include atomic numbers as a feature")
    a("--visualize_every_batch", type=int, default=d["visualize_every_batch"],
      help="save sampled pictures every this many batches of a test epoch (0: never)")
    a("--normalization_factor", type=float, default=1, help="normalisation of the sum aggregation")
    a("--aggregation_method", type=str, default="sum", help="sum or mean")
    if script == "geom":
        a("--filter_molecule_size", type=optional_int, default=None, help="keep only molecules up to this size")
        a("--sequential", action="store_true", help="accepted for EDM compatibility; batches are always shuffled")
        a("--data_file", type=str, default="./data/geom/geom_drugs_30.npy",
          help="EDM's processed GEOM file; its folder is the data folder unless --datadir is given")
        a("--conformations", type=optional_int, default=None,
          help="conformers kept per molecule (default: from --data_file's name, else 30)")
    # --- GAGA ---
    a("--max_t", type=optional_int, default=None,
      help="largest training timestep (GAGA's T*); default: T. Giving it switches GAGA mode on")
    a("--dataset_var", type=float, default=None,
      help="data variance v of the Gaussian start of sampling; default: GAGA's published value "
           "(QM9 0.848, GEOM 0.952) when --max_t is given, else 1")
    a("--sampling_step_size", type=int, default=1, help="stride of the reverse chain when sampling")
    a("--zero_center_h", type=zero_center_choice, default="auto",
      help="centre atom-type features per molecule: auto (= true iff --max_t given), true, false")
    a("--sampler", type=str, default="ddpm", choices=sampler_names(), help="sampler of the stability check")
    # --- GeoLDM (training/latent_args.py) ---
    add_latent_flags(p)
    # --- this implementation ---
    a("--egnn_impl", type=str, default="fast", choices=EGNN_IMPLS,
      help="EGNN/GNN layers: fast (fused kernels) or reference (EDM's equations as written); same weights, same outputs")
    a("--seed", type=int, default=1, help="seed of the model init, the data order and the noise")
    a("--output_root", type=str, default="outputs", help="parent folder of run folders (outputs/<exp_name>)")
    a("--data_subset", type=optional_int, default=None,
      help="use only the first N molecules of each split (quick runs and tests)")
    a("--checkpoint_every_steps", type=int, default=0,
      help="also write the resume state every K training steps (0: only at the end of each epoch)")
    a("--nan_patience", type=int, default=20, help="stop after this many consecutive non-finite batches")
    a("--stop_after_steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a crash
    # --- devices (egnn.device_policy) ---
    a("--group_by_size", type=group_by_size_choice, default="auto",
      help="run the network on size groups of molecules: auto (on the CPU only; one padded block on a GPU), true, false")
    a("--compile", type=str2bool, nargs="?", const=True, default=False,
      help="torch.compile the network on the padded (GPU) path")
    a("--compile_backend", type=str, default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager
    a("--tf32", type=str2bool, nargs="?", const=True, default=False,
      help="allow TF32 matmuls on CUDA (faster on Ampere+, less precise); off by default")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate every flag (ranges, then cross-field constraints) and turn ``zero_center_h`` into the
    bool a run records. Raises UserInputError, before any data is read or model built."""
    from training.args_check import check_training_flags
    from training.conditioning import check_conditioning_flags

    check_training_flags(args)
    if args.max_t is not None and not 1 <= args.max_t <= args.diffusion_steps:
        raise UserInputError(f"--max_t must be between 1 and --diffusion_steps ({args.diffusion_steps}), got {args.max_t}")
    if len(args.normalize_factors) != 3:
        raise UserInputError(f"--normalize_factors needs 3 numbers [x, categorical, integer], got {args.normalize_factors}")
    if args.batch_size < 1 or args.n_epochs < 0 or args.test_epochs < 1:
        raise UserInputError("--batch_size and --test_epochs must be >= 1 and --n_epochs >= 0")
    if args.dataset_var is None:
        args.dataset_var = published_dataset_var(args.dataset) if args.max_t is not None else 1.0
    if not (math.isfinite(args.dataset_var) and args.dataset_var > 0):
        raise UserInputError(f"--dataset_var must be a finite positive number, got {args.dataset_var}")
    if args.sampling_step_size < 1:
        raise UserInputError(f"--sampling_step_size must be >= 1, got {args.sampling_step_size}")
    start = args.diffusion_steps if args.max_t is None else args.max_t
    if start % args.sampling_step_size:
        raise UserInputError(
            f"--sampling_step_size {args.sampling_step_size} must divide the chain's start "
            f"({'--max_t' if args.max_t is not None else '--diffusion_steps'} = {start})"
        )
    if args.data_subset is not None and args.data_subset < 1:
        raise UserInputError(f"--data_subset must be >= 1, got {args.data_subset}")
    args.lr_schedule = canonical_lr_schedule(args.lr_schedule)
    check_conditioning_flags(args)
    if args.probabilistic_model != "diffusion":
        raise UserInputError(f"--probabilistic_model {args.probabilistic_model!r} is not supported; use diffusion")
    resolve_latent_args(args)  # GeoLDM's flags: edm / vae / geoldm run (before zero_center_h)
    choice = args.zero_center_h
    if isinstance(choice, str):
        if choice == "auto":
            args.zero_center_h = args.max_t is not None
        else:
            args.zero_center_h = choice == "true"
    return args


def parse_args(argv: Sequence[str] | None = None, script: str = "qm9") -> argparse.Namespace:
    """Parse and resolve a training command line (unknown flags: argparse's error)."""
    args = build_parser(script).parse_args(argv)
    warn_no_op_flags(args)
    return resolve_args(args)


def explicit_flags(argv: Sequence[str] | None, script: str = "qm9") -> set[str]:
    """Destinations of the flags actually written on the command line (not defaulted)."""
    parser = build_parser(script)
    for action in parser._actions:  # noqa: SLF001 - argparse has no public API for this
        action.default = argparse.SUPPRESS
    given = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return set(vars(given))


# GeoLDM's QM9 README command (sizes left out: the caller's).
GEOLDM_QM9_README = ("--n_epochs", "3000", "--n_stability_samples", "1000", "--diffusion_noise_schedule", "polynomial_2",
                     "--diffusion_noise_precision", "1e-5", "--diffusion_steps", "1000", "--diffusion_loss_type", "l2",
                     "--batch_size", "64", "--lr", "1e-4", "--normalize_factors", "[1,4,10]", "--test_epochs", "20",
                     "--ema_decay", "0.9999", "--train_diffusion", "--trainable_ae", "--exp_name", "geoldm_qm9")


def geoldm_qm9_args(nf: int = 256, n_layers: int = 9, latent_nf: int = 1, *extra: str) -> argparse.Namespace:
    """GeoLDM's QM9 README run at this size, resolved exactly as ``main_qm9.py`` resolves it
    (``extra``: further flags, e.g. ``"--egnn_impl", "reference"``); for benchmarks and studies."""
    args = parse_args([*GEOLDM_QM9_README, "--nf", str(nf), "--n_layers", str(n_layers), "--latent_nf", str(latent_nf),
                       *extra])
    args.context_node_nf = len(args.conditioning or [])  # as Trainer.build sets it
    return args


def default_args(script: str = "qm9") -> argparse.Namespace:
    """Every flag at its default (resolved), e.g. to fill fields legacy args.pickle files lack."""
    return build_parser(script).parse_args([])


def fill_legacy_defaults(args: argparse.Namespace, script: str | None = None) -> argparse.Namespace:
    """Complete a loaded args.pickle (EDM, GAGA fork or ours) with the parser defaults it lacks.

    ``zero_center_h`` is inferred before filling (a GAGA fork pickle has ``max_t``, EDM's has
    not), and is stored as a bool.
    """
    if script is None:
        script = dataset_family(getattr(args, "dataset", "qm9"))
    out = argparse.Namespace(**vars(args))
    out.zero_center_h = infer_zero_center_h(args)
    for key, value in vars(default_args(script)).items():
        if not hasattr(out, key):
            setattr(out, key, value)
    if isinstance(out.normalize_factors, str):
        out.normalize_factors = parse_number_list(out.normalize_factors, "normalize_factors")
    if out.dataset_var is None:  # legacy runs: GAGA-fork runs sample from the published variance
        out.dataset_var = published_dataset_var(out.dataset) if getattr(out, "max_t", None) is not None else 1.0
    return out
