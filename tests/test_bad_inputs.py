"""Bad input, as a careless or hostile user would give it, to every script: a one-line error, before any data.

MATRIX below is the table: script, command line, the text the one-line error must hold.
Each case calls the script's ``main(argv)`` in-process with every data loader, the model
builder and the weight reader replaced by a tripwire, and asserts:
* the script stops with SystemExit status 2 (bad input) or 1 (environment);
* stderr is exactly one line, ``error: ...``, holding the expected text, and no traceback;
* no tripwire fired: no dataset was read and no model was built (``Touched`` would escape
  the scripts' error handling, because it is not a user error);
* nothing was created (no empty run or output folder is left behind).
Placeholders in the command line: {run} a valid tiny run folder (args.pickle only),
{edm_run} the same without max_t, {tmp} an empty folder, {file} a plain file (so {file}/x
cannot be created: an unwritable output folder even for root), {evil_args} a run whose
args.pickle runs code, {bytes_args} one that asks for builtins.bytes, {huge_args} one asking
for nf = 10^7, {nan_args} one with dataset_var NaN, {big_args} an 8 MB args.pickle, {text_factors} a legacy one with normalize_factors 'abc',
{results} a Gaussianity folder whose pass cell was edited to 'x', {garbage_csv} one whose CSV is
not CSV, {msgpack_bad} a GEOM folder with a corrupt msgpack file.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import pickle
from pathlib import Path

import pytest

import build_geom_dataset
import eval_analyze
import eval_sample
import GAGA_step_estimation
import GAGA_test
import Gaussianity_test
import main_geom_drugs
import main_qm9
import quickstart
import Variance_Estimate
from configs.run_args import save_run_args
from training.args import default_args

SCRIPTS = {
    "main_qm9": main_qm9, "main_geom_drugs": main_geom_drugs, "GAGA_test": GAGA_test, "eval_analyze": eval_analyze,
    "eval_sample": eval_sample, "Variance_Estimate": Variance_Estimate, "Gaussianity_test": Gaussianity_test,
    "GAGA_step_estimation": GAGA_step_estimation, "build_geom_dataset": build_geom_dataset, "quickstart": quickstart,
}

TRAIN = ["--diffusion_noise_schedule", "polynomial_2", "--output_root", "{tmp}"]

MATRIX: list[tuple[str, list[str], str]] = [
    # --- main_qm9.py: every flag's type, range, NaN/inf ---
    ("main_qm9", [*TRAIN, "--nf", "0"], "--nf must be an integer >= 1 and <= 4096, got 0"),
    ("main_qm9", [*TRAIN, "--nf", "-5"], "--nf must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--nf", "abc"], "argument --nf: invalid int value"),
    ("main_qm9", [*TRAIN, "--nf", "100000"], "--nf must be an integer >= 1 and <= 4096"),
    ("main_qm9", [*TRAIN, "--n_layers", "0"], "--n_layers must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--inv_sublayers", "0"], "--inv_sublayers must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--diffusion_steps", "0"], "--diffusion_steps must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--diffusion_steps", "1000000000"], "--diffusion_steps must be an integer >= 1 and <= 100000"),
    ("main_qm9", [*TRAIN, "--diffusion_noise_precision", "0"], "--diffusion_noise_precision must be a finite number > 0"),
    ("main_qm9", [*TRAIN, "--diffusion_noise_precision", "nan"], "--diffusion_noise_precision must be a finite number"),
    ("main_qm9", [*TRAIN, "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("main_qm9", [*TRAIN, "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ("main_qm9", [*TRAIN, "--lr", "0"], "--lr must be a finite number > 0"),
    ("main_qm9", [*TRAIN, "--lr=-1e-4"], "--lr must be a finite number > 0"),
    ("main_qm9", [*TRAIN, "--ema_decay", "1.5"], "--ema_decay must be a finite number >= 0 and < 1, got 1.5"),
    ("main_qm9", [*TRAIN, "--ema_decay", "1"], "--ema_decay must be a finite number >= 0 and < 1"),
    ("main_qm9", [*TRAIN, "--ema_decay", "-0.1"], "--ema_decay must be a finite number >= 0 and < 1"),
    ("main_qm9", [*TRAIN, "--ema_decay", "nan"], "--ema_decay must be a finite number"),
    ("main_qm9", [*TRAIN, "--batch_size", "0"], "--batch_size must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--n_epochs", "-1"], "--n_epochs must be an integer >= 0"),
    ("main_qm9", [*TRAIN, "--test_epochs", "0"], "--test_epochs must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--normalize_factors", "[1,0,10]"], "--normalize_factors [1, 0, 10] must be three finite positive numbers"),
    ("main_qm9", [*TRAIN, "--normalize_factors", "[1,-4,10]"], "must be three finite positive numbers"),
    ("main_qm9", [*TRAIN, "--normalize_factors", "[1,4,1e999]"], "must be three finite positive numbers"),
    ("main_qm9", [*TRAIN, "--normalize_factors", "[1,4]"], "must be three finite positive numbers"),
    ("main_qm9", [*TRAIN, "--normalize_factors", "[1,nan,10]"], "not a list of numbers"),
    ("main_qm9", [*TRAIN, "--normalize_factors", "__import__('os').system('true')"], "not a list of numbers"),
    ("main_qm9", [*TRAIN, "--dataset_var", "nan"], "--dataset_var must be a finite number > 0, got nan"),
    ("main_qm9", [*TRAIN, "--dataset_var", "inf"], "--dataset_var must be a finite number > 0, got inf"),
    ("main_qm9", [*TRAIN, "--dataset_var", "0"], "--dataset_var must be a finite number > 0"),
    ("main_qm9", [*TRAIN, "--dataset_var", "-1"], "--dataset_var must be a finite number > 0"),
    ("main_qm9", [*TRAIN, "--max_t", "0"], "--max_t must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--diffusion_steps", "1000", "--max_t", "2000"], "--max_t must be between 1 and --diffusion_steps"),
    ("main_qm9", [*TRAIN, "--checkpoint_every_steps", "-1"], "--checkpoint_every_steps must be an integer >= 0, got -1"),
    ("main_qm9", [*TRAIN, "--nan_patience", "0"], "--nan_patience must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--seed", "-1"], "--seed must be an integer >= 0"),
    ("main_qm9", [*TRAIN, "--data_subset", "0"], "--data_subset must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--sampling_step_size", "0"], "--sampling_step_size must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--diffusion_steps", "1000", "--max_t", "550", "--sampling_step_size", "3"], "must divide the chain's start"),
    ("main_qm9", [*TRAIN, "--filter_n_atoms", "0"], "--filter_n_atoms must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--num_workers", "-1"], "--num_workers must be an integer >= 0"),
    ("main_qm9", [*TRAIN, "--n_stability_samples", "-1"], "--n_stability_samples must be an integer >= 0"),
    ("main_qm9", [*TRAIN, "--visualize_every_batch", "-1"], "--visualize_every_batch must be an integer >= 0"),
    ("main_qm9", [*TRAIN, "--start_epoch", "-1"], "--start_epoch must be an integer >= 0"),
    ("main_qm9", [*TRAIN, "--norm_constant", "nan"], "--norm_constant must be a finite number >= 0"),
    ("main_qm9", [*TRAIN, "--augment_noise", "-1"], "--augment_noise must be a finite number >= 0"),
    ("main_qm9", [*TRAIN, "--normalization_factor", "0"], "--normalization_factor must be a finite number > 0"),
    ("main_qm9", [*TRAIN, "--ode_regularization", "inf"], "--ode_regularization must be a finite number >= 0"),
    ("main_qm9", [*TRAIN, "--n_report_steps", "0"], "--n_report_steps must be an integer >= 1"),
    ("main_qm9", [*TRAIN, "--exp_name", ""], "--exp_name '' must be a plain folder name"),
    ("main_qm9", [*TRAIN, "--exp_name", "../escape"], "--exp_name '../escape' must be a plain folder name"),
    ("main_qm9", [*TRAIN, "--exp_name", "/etc"], "must be a plain folder name"),
    ("main_qm9", [*TRAIN, "--exp_name", "a/b"], "must be a plain folder name"),
    ("main_qm9", [*TRAIN, "--dataset", "nope"], "unknown dataset 'nope'"),
    ("main_qm9", [*TRAIN, "--diffusion_loss_type", "l1"], "--diffusion_loss_type 'l1' is not one of: l2, vlb"),
    ("main_qm9", [*TRAIN, "--aggregation_method", "max"], "--aggregation_method 'max' is not one of: sum, mean"),
    ("main_qm9", [*TRAIN, "--model", "transformer"], "argument --model: invalid choice: 'transformer' (choose from 'egnn_dynamics', 'gnn_dynamics')"),
    ("main_qm9", [*TRAIN, "--diffusion_noise_schedule", "polynomial_x"], "--diffusion_noise_schedule 'polynomial_x'"),
    ("main_qm9", ["--output_root", "{tmp}", "--diffusion_loss_type", "l2"], "--diffusion_noise_schedule learned is trained through the VLB"),
    ("main_qm9", [*TRAIN, "--dp", "maybe"], "argument --dp: expected True or False, got 'maybe'"),
    ("main_qm9", [*TRAIN, "--zero_center_h", "sometimes"], "expected auto, true or false"),
    ("main_qm9", [*TRAIN, "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("main_qm9", [*TRAIN, "--conditioning", "polarizability"], "--conditioning: unknown property 'polarizability'"),
    ("main_qm9", [*TRAIN, "--conditioning", "alpha", "--dataset", "geom"], "--conditioning needs --dataset qm9_second_half"),
    ("main_qm9", [*TRAIN, "--probabilistic_model", "flow"], "--probabilistic_model 'flow' is not supported"),
    ("main_qm9", [*TRAIN, "--output_root", ""], "--output_root must not be empty"),
    ("main_qm9", [*TRAIN, "--output_root", "{file}"], "is not writable"),
    ("main_qm9", ["--resume", "{tmp}/nowhere"], "no such folder"),
    ("main_qm9", ["--resume", "{tmp}"], "no args.pickle there"),
    ("main_qm9", ["--resume", "{run}", "--overwrite"], "--overwrite and --resume contradict each other"),
    ("main_qm9", ["--resume", "{evil_args}"], "refusing to unpickle"),
    ("main_qm9", ["--resume", "{huge_args}"], "nf=10000000 is out of range"),
    ("main_qm9", ["--resume", "{text_factors}"], "normalize_factors 'abc' is not a list of numbers"),
    ("main_qm9", [*TRAIN, "--exp_name", "run", "--output_root", "{runs}"], "already holds a training run"),
    # --- main_geom_drugs.py: its own flags ---
    ("main_geom_drugs", [*TRAIN, "--conformations", "0"], "--conformations must be an integer >= 1"),
    ("main_geom_drugs", [*TRAIN, "--filter_molecule_size", "0"], "--filter_molecule_size must be an integer >= 1"),
    ("main_geom_drugs", [*TRAIN, "--nf", "0"], "--nf must be an integer >= 1"),
    ("main_geom_drugs", [*TRAIN, "--lr", "nan"], "--lr must be a finite number > 0"),
    # --- GAGA_test.py ---
    ("GAGA_test", ["--model_path", "{run}", "--n_samples", "0"], "--n_samples must be an integer >= 1"),
    ("GAGA_test", ["--model_path", "{run}", "--n_samples", "1e9"], "argument --n_samples: invalid int value"),
    ("GAGA_test", ["--model_path", "{run}", "--n_samples", "2000000"], "--n_samples must be an integer >= 1 and <= 1e+06"),
    ("GAGA_test", ["--model_path", "{run}", "--batch_size_gen", "0"], "--batch_size_gen must be an integer >= 1"),
    ("GAGA_test", ["--model_path", "{run}", "--iteration", "0"], "--iteration must be an integer >= 1"),
    ("GAGA_test", ["--model_path", "{run}", "--GA_timestep", "0"], "--GA_timestep must be an integer >= 1"),
    ("GAGA_test", ["--model_path", "{run}", "--GA_timestep", "5000"], r"--GA_timestep must be an integer in [1, 100]"),
    ("GAGA_test", ["--model_path", "{run}", "--dataset_var", "0"], "--dataset_var must be a finite number > 0, got 0.0"),
    ("GAGA_test", ["--model_path", "{run}", "--dataset_var", "nan"], "--dataset_var must be a finite number > 0, got nan"),
    ("GAGA_test", ["--model_path", "{run}", "--dataset_var", "inf"], "--dataset_var must be a finite number > 0, got inf"),
    ("GAGA_test", ["--model_path", "{run}", "--dataset_var", "-1"], "--dataset_var must be a finite number > 0"),
    ("GAGA_test", ["--model_path", "{run}", "--sampling_step_size", "0"], "--sampling_step_size must be an integer >= 1"),
    ("GAGA_test", ["--model_path", "{run}", "--sampling_step_size", "3"], "not a multiple of --sampling_step_size 3"),
    ("GAGA_test", ["--model_path", "{run}", "--ddim_stride", "0"], "--ddim_stride must be an integer >= 1"),
    ("GAGA_test", ["--model_path", "{run}", "--compare", "--ddim_stride", "3"], "is not a multiple of --ddim_stride 3"),
    ("GAGA_test", ["--model_path", "{edm_run}", "--compare"], "--compare needs --GA_timestep"),
    ("GAGA_test", ["--model_path", "{edm_run}"], "--shortcut Gaussian needs --GA_timestep"),
    ("GAGA_test", ["--model_path", "{run}", "--shortcut", "Laplace"], "argument --shortcut: invalid choice"),
    ("GAGA_test", ["--model_path", "{run}", "--sampler", "euler"], "argument --sampler: invalid choice"),
    ("GAGA_test", ["--model_path", "{run}", "--test_name", "../../x"], "--test_name '../../x' must be a plain folder name"),
    ("GAGA_test", ["--model_path", "{run}", "--seed", "-3"], "--seed must be an integer >= 0"),
    ("GAGA_test", ["--model_path", "{run}", "--use_ema", "perhaps"], "argument --use_ema: expected True or False"),
    ("GAGA_test", ["--model_path", "{run}", "--out_dir", "{file}/x"], "--out_dir: {file}/x is not writable"),
    ("GAGA_test", ["--model_path", "{tmp}/nowhere"], "does not exist"),
    ("GAGA_test", ["--model_path", "{tmp}"], "args.pickle is missing"),
    ("GAGA_test", [], "the following arguments are required: --model_path"),
    ("GAGA_test", ["--model_path", "{evil_args}"], "posix.system, which a run's arguments never need; refusing to unpickle"),
    ("GAGA_test", ["--model_path", "{bytes_args}"], "builtins.bytes, which a run's arguments never need"),
    ("GAGA_test", ["--model_path", "{huge_args}"], "nf=10000000 is out of range"),
    ("GAGA_test", ["--model_path", "{nan_args}"], "dataset_var must be a finite number > 0, got nan"),
    ("GAGA_test", ["--model_path", "{big_args}"], "far more than a run's arguments take"),
    ("GAGA_test", ["--model_path", "{garbage_args}"], "is not a readable args pickle"),
    ("GAGA_test", ["--model_path", "{list_args}"], "holds a list, expected an argparse.Namespace"),
    ("GAGA_test", ["--model_path", "{text_factors}"], "normalize_factors 'abc' is not a list of numbers"),
    # --- eval_analyze.py ---
    ("eval_analyze", ["--model_path", "{run}", "--n_samples", "0"], "--n_samples must be an integer >= 1"),
    ("eval_analyze", ["--model_path", "{run}", "--n_samples", "1000000000"], "--n_samples must be an integer >= 1 and <= 1e+06"),
    ("eval_analyze", ["--model_path", "{run}", "--batch_size_gen", "0"], "--batch_size_gen must be an integer >= 1"),
    ("eval_analyze", ["--model_path", "{run}", "--start_step", "0"], "--start_step must be an integer >= 1"),
    ("eval_analyze", ["--model_path", "{run}", "--start_step", "5000"], r"--start_step must be an integer in [1, 100]"),
    ("eval_analyze", ["--model_path", "{run}", "--start_step", "x"], "argument --start_step: expected an integer or None"),
    ("eval_analyze", ["--model_path", "{run}", "--dataset_var", "nan"], "--dataset_var must be a finite number > 0"),
    ("eval_analyze", ["--model_path", "{run}", "--dataset_var", "-2"], "--dataset_var must be a finite number > 0"),
    ("eval_analyze", ["--model_path", "{run}", "--sampling_step_size", "0"], "--sampling_step_size must be an integer >= 1"),
    ("eval_analyze", ["--model_path", "{run}", "--sampling_step_size", "7"], "is not a multiple of --sampling_step_size 7"),
    ("eval_analyze", ["--model_path", "{run}", "--data_subset", "0"], "--data_subset must be an integer >= 1"),
    ("eval_analyze", ["--model_path", "{run}", "--seed", "-1"], "--seed must be an integer >= 0"),
    ("eval_analyze", ["--model_path", "{run}", "--sampler", "heun"], "argument --sampler: invalid choice"),
    ("eval_analyze", ["--model_path", "{run}", "--eval_nll", "maybe"], "argument --eval_nll: expected True or False"),
    ("eval_analyze", ["--model_path", "{run}", "--metrics_json", "{file}/m.json"], "--metrics_json: {file} is not writable"),
    ("eval_analyze", ["--model_path", "{tmp}/nowhere"], "does not exist"),
    ("eval_analyze", ["--model_path", "{evil_args}"], "refusing to unpickle"),
    ("eval_analyze", ["--model_path", "{huge_args}"], "is out of range"),
    # --- eval_sample.py ---
    ("eval_sample", ["--model_path", "{run}", "--n_tries", "0"], "--n_tries must be an integer >= 1"),
    ("eval_sample", ["--model_path", "{run}", "--n_nodes", "0"], "--n_nodes must be an integer >= 1"),
    ("eval_sample", ["--model_path", "{run}", "--n_nodes", "100"], "--n_nodes must be between 1 and 29"),
    ("eval_sample", ["--model_path", "{run}", "--keep_frames", "0"], "--keep_frames must be an integer >= 1"),
    ("eval_sample", ["--model_path", "{run}", "--n_chains", "-1"], "--n_chains must be an integer >= 0"),
    ("eval_sample", ["--model_path", "{run}", "--n_samples", "-1"], "--n_samples must be an integer >= 0"),
    ("eval_sample", ["--model_path", "{run}", "--dataset_var", "nan"], "--dataset_var must be a finite number > 0"),
    ("eval_sample", ["--model_path", "{run}", "--start_step", "0"], "--start_step must be an integer >= 1"),
    ("eval_sample", ["--model_path", "{run}", "--sampling_step_size", "0"], "--sampling_step_size must be an integer >= 1"),
    ("eval_sample", ["--model_path", "{tmp}/nowhere"], "does not exist"),
    ("eval_sample", ["--model_path", "{bytes_args}"], "refusing to unpickle"),
    # --- Variance_Estimate.py ---
    ("Variance_Estimate", ["--n_molecules", "0"], "--n_molecules must be an integer >= 1"),
    ("Variance_Estimate", ["--seed", "-1"], "--seed must be an integer >= 0"),
    ("Variance_Estimate", ["--dataset", "nope"], "--dataset: unknown dataset 'nope'"),
    ("Variance_Estimate", ["--normalize_factors", "[1,0,10]"], "must be three finite positive numbers"),
    ("Variance_Estimate", ["--normalize_factors", "x"], "not a list of numbers"),
    ("Variance_Estimate", ["--filter_n_atoms", "0"], "--filter_n_atoms must be an integer >= 1"),
    ("Variance_Estimate", ["--include_charges", "maybe"], "argument --include_charges: expected True or False"),
    ("Variance_Estimate", ["--test_name", "../x"], "--test_name '../x' must be a plain folder name"),
    ("Variance_Estimate", ["--out_dir", "{file}/v"], "--out_dir: {file}/v is not writable"),
    ("Variance_Estimate", ["--model_path", "{tmp}/nowhere"], "does not exist"),
    ("Variance_Estimate", ["--model_path", "{evil_args}"], "refusing to unpickle"),
    ("Variance_Estimate", ["--split", "holdout"], "argument --split: invalid choice"),
    ("Variance_Estimate", ["--dataset", "geom", "--conformations", "0"], "--conformations must be an integer >= 1"),
    # --- Gaussianity_test.py ---
    ("Gaussianity_test", ["--workers", "0"], "--workers must be an integer >= 1"),
    ("Gaussianity_test", ["--chunk_size", "0"], "--chunk_size must be an integer >= 1"),
    ("Gaussianity_test", ["--alpha", "0"], "--alpha must be a finite number > 0 and < 1"),
    ("Gaussianity_test", ["--alpha", "1.5"], "--alpha must be a finite number > 0 and < 1"),
    ("Gaussianity_test", ["--alpha", "nan"], "--alpha must be a finite number"),
    ("Gaussianity_test", ["--mi_threshold", "0"], "--mi_threshold must be a finite number > 0"),
    ("Gaussianity_test", ["--mi_neighbors", "0"], "--mi_neighbors must be an integer >= 1"),
    ("Gaussianity_test", ["--mi_pairs", "0"], "--mi_pairs must be an integer >= 1"),
    ("Gaussianity_test", ["--quantile", "1"], "--quantile must be a finite number > 0 and < 1"),
    ("Gaussianity_test", ["--dataset_var", "0"], "--dataset_var must be a finite number > 0"),
    ("Gaussianity_test", ["--dataset_var", "nan"], "--dataset_var must be a finite number > 0"),
    ("Gaussianity_test", ["--dataset_var", "inf"], "--dataset_var must be a finite number > 0"),
    ("Gaussianity_test", ["--dataset_var", "-0.5"], "--dataset_var must be a finite number > 0"),
    ("Gaussianity_test", ["--timesteps", "a:b"], "cannot read the timestep grid 'a:b'"),
    ("Gaussianity_test", ["--timesteps", "0:2000:50"], "lie outside [0, 1000]"),
    ("Gaussianity_test", ["--n_molecules", "0"], "--n_molecules must be an integer >= 1"),
    ("Gaussianity_test", ["--diffusion_steps", "0"], "--diffusion_steps must be an integer >= 1"),
    ("Gaussianity_test", ["--diffusion_noise_precision", "nan"], "--diffusion_noise_precision must be a finite number"),
    ("Gaussianity_test", ["--diffusion_noise_schedule", "learned"], "learned noise schedule has no fixed table"),
    ("Gaussianity_test", ["--variance_mode", "guess"], "argument --variance_mode: invalid choice"),
    ("Gaussianity_test", ["--out_dir", "{file}/g"], "--out_dir: {file}/g is not writable"),
    ("Gaussianity_test", ["--seed", "-1"], "--seed must be an integer >= 0"),
    ("Gaussianity_test", ["--model_path", "{evil_args}"], "refusing to unpickle"),
    ("Gaussianity_test", ["--model_path", "{run}"], "lie outside [0, 100]"),
    # --- GAGA_step_estimation.py ---
    ("GAGA_step_estimation", ["--data_root", "{tmp}", "--quantile", "0"], "--quantile must lie strictly between 0 and 1"),
    ("GAGA_step_estimation", ["--data_root", "{tmp}", "--quantile", "nan"], "--quantile must lie strictly between 0 and 1"),
    ("GAGA_step_estimation", ["--data_root", "{tmp}/nowhere"], "does not exist; run Gaussianity_test.py first"),
    ("GAGA_step_estimation", ["--data_root", "{tmp}"], "holds no results"),
    ("GAGA_step_estimation", ["--data_root", "{results}"], "line 3, column 'pass': 'x' is not 0 or 1"),
    ("GAGA_step_estimation", ["--data_root", "{garbage_csv}"], "is not a Gaussianity results file"),
    ("GAGA_step_estimation", [], "the following arguments are required: --data_root"),
    # --- build_geom_dataset.py ---
    ("build_geom_dataset", ["--data_dir", "{tmp}", "--conformations", "0"], "--conformations must be an integer >= 1"),
    ("build_geom_dataset", ["--data_dir", "{tmp}", "--conformations", "-3"], "--conformations must be an integer >= 1"),
    ("build_geom_dataset", ["--data_dir", "{tmp}", "--conformations", "x"], "argument --conformations: invalid int value"),
    ("build_geom_dataset", ["--data_dir", "{tmp}/nowhere"], "drugs_crude.msgpack"),
    ("build_geom_dataset", ["--data_dir", "{tmp}", "--data_file", ""], "--data_dir and --data_file must not be empty"),
    # --- quickstart.py ---
    ("quickstart", ["--exp_name", ""], "--exp_name '' must be a plain folder name"),
    ("quickstart", ["--exp_name", ".."], "must be a plain folder name"),
    ("quickstart", ["--exp_name", "/tmp/anything"], "must be a plain folder name"),
    ("quickstart", ["--exp_name", "a/../.."], "must be a plain folder name"),
    ("quickstart", ["--n_epochs", "0"], "--n_epochs must be an integer >= 1"),
    ("quickstart", ["--nf", "0"], "--nf must be an integer >= 1"),
    ("quickstart", ["--lr", "nan"], "--lr must be a finite number > 0"),
    ("quickstart", ["--ema_decay", "1.5"], "--ema_decay must be a finite number >= 0 and < 1"),
    ("quickstart", ["--workers", "0"], "--workers must be an integer >= 1"),
    # --- GeoLDM's flags (training/latent_args.py) ---
    ("main_qm9", [*TRAIN, "--latent_nf", "0"], "--latent_nf must be an integer >= 1 and <= 256, got 0"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--latent_nf", "100000"], "--latent_nf must be an integer >= 1 and <= 256"),
    ("main_qm9", [*TRAIN, "--latent_nf", "two"], "argument --latent_nf: invalid int value"),
    ("main_qm9", [*TRAIN, "--kl_weight", "nan"], "--kl_weight must be a finite number >= 0, got nan"),
    ("main_qm9", [*TRAIN, "--kl_weight", "-1"], "--kl_weight must be a finite number >= 0"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "maybe"], "argument --train_diffusion: expected True or False"),
    ("main_qm9", [*TRAIN, "--trainable_ae"], "--trainable_ae trains the decoder jointly with the latent diffusion: add --train_diffusion"),
    ("main_geom_drugs", [*TRAIN, "--trainable_ae"], "add --train_diffusion"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "False", "--trainable_ae"], "add --train_diffusion"),
    ("main_qm9", [*TRAIN, "--ae_path", "{vae_run}"], "--ae_path initialises the first stage of a latent diffusion run: add --train_diffusion"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{tmp}/nowhere"], "--ae_path {tmp}/nowhere: run folder {tmp}/nowhere does not exist"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{tmp}"], "--ae_path {tmp}: {tmp}/args.pickle is missing"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{edm_run}"], "is an EDM run, not a VAE-only run"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{geoldm_run}"], "is a latent diffusion run, not a VAE-only run"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{evil_args}"], "refusing to unpickle it"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{huge_vae}"], "nf=10000000 is out of range"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{vae_geom}", "--include_charges=False"],
     "was trained with dataset='geom' but this run has dataset='qm9'; use the same --dataset"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{vae_run}"],
     "was trained with include_charges=False but this run has include_charges=True; use the same --include_charges"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{vae_run}", "--include_charges=False", "--latent_nf", "3"],
     "--latent_nf 3 differs from the first stage's latent_nf 2"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{vae_no_weights}", "--include_charges=False"],
     "has no generative_model_ema.npy (the VAE run never saved a best model)"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--zero_center_h", "true"], "GeoLDM's latent diffusion does not centre features"),
    ("main_qm9", [*TRAIN, "--latent_nf", "2", "--model", "gnn_dynamics"], "GeoLDM's autoencoder is an EGNN: use --model egnn_dynamics"),
    ("eval_analyze", ["--model_path", "{huge_latent}"], "latent_nf=1000000 is out of range"),
    ("main_qm9", [*TRAIN, "--train_diffusion", "--ae_path", "{huge_latent}"], "latent_nf=1000000 is out of range"),
    ("eval_analyze", ["--model_path", "{vae_run}"], "is a VAE-only GeoLDM run (the first stage: an autoencoder, nothing to sample)"),
    ("eval_sample", ["--model_path", "{vae_run}"], "is a VAE-only GeoLDM run"),
    ("GAGA_test", ["--model_path", "{vae_run}"], "train a latent diffusion on it with --train_diffusion --ae_path"),
    ("quickstart", ["--n_samples", "0"], "--n_samples must be an integer >= 1"),
    ("quickstart", ["--timesteps", "300:2000:50"], "lie outside [0, 1000]"),
    ("quickstart", ["--gaussianity_molecules", "0"], "--gaussianity_molecules must be an integer >= 1"),
]


class Touched(Exception):
    """A tripwire: data was loaded or a model built although the input was bad (not a user error)."""


def _tripwire(what: str):
    def fire(*args, **kwargs):
        raise Touched(f"{what} was called")

    return fire


@pytest.fixture
def tripwires(monkeypatch):
    """Every loader, the model builder and the weight reader raise Touched."""
    import gaga.data
    import qm9.data.geom
    import qm9.data.qm9
    import qm9.dataset
    import qm9.models
    import training.evaluate

    for target, name in [
        (qm9.data.qm9, "load_qm9"), (qm9.data.qm9, "ensure_cache"), (qm9.dataset, "retrieve_dataloaders"),
        (qm9.models, "get_model"), (qm9.models, "get_autoencoder"), (qm9.models, "get_latent_diffusion"),
        (qm9.models, "read_state_dict"), (gaga.data, "load_features"),
        (Gaussianity_test, "load_features"), (Variance_Estimate, "load_features"),
        (qm9.data.geom, "retrieve_geom_dataloaders"), (training.evaluate, "training_smiles"),
    ]:
        monkeypatch.setattr(target, name, _tripwire(f"{target.__name__}.{name}"))


def _pickle_file(folder: Path, data: bytes, weights: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.pickle").write_bytes(data)
    if weights:
        (folder / "generative_model.npy").write_bytes(b"never read")
    return folder


class _RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


class _AllocatesBytes:
    def __reduce__(self):
        return (bytes, (10**12,))


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """The folders and files the placeholders name (made once; no case can change them: every case fails first)."""
    tmp_path = tmp_path_factory.mktemp("bad_inputs")
    tmp = tmp_path / "empty"
    tmp.mkdir()
    plain = tmp_path / "a_file"
    plain.write_text("not a folder")

    def run_args(**changes) -> argparse.Namespace:
        args = default_args("qm9")
        fields = dict(nf=16, n_layers=1, diffusion_steps=100, max_t=50, dataset_var=0.848, zero_center_h=True,
                      include_charges=False, diffusion_noise_schedule="polynomial_2")
        for key, value in {**fields, **changes}.items():
            setattr(args, key, value)
        return args

    run = tmp_path / "run"
    save_run_args(run, run_args())
    edm = tmp_path / "edm_run"
    save_run_args(edm, run_args(max_t=None, zero_center_h=False, dataset_var=1.0))
    runs = tmp_path / "runs"
    save_run_args(runs / "run", run_args())
    (runs / "run" / "generative_model.npy").write_bytes(b"weights of a finished run")
    huge = tmp_path / "huge"
    save_run_args(huge, run_args(nf=10_000_000))
    (huge / "generative_model.npy").write_bytes(b"never read")
    text_factors = tmp_path / "text_factors"
    save_run_args(text_factors, run_args(normalize_factors="abc"))  # legacy pickles store strings
    (text_factors / "generative_model.npy").write_bytes(b"never read")
    nan_run = tmp_path / "nan_run"
    save_run_args(nan_run, run_args(dataset_var=math.nan))
    vae_fields = dict(max_t=None, zero_center_h=False, dataset_var=1.0, train_diffusion=False, latent_nf=2,
                      kl_weight=0.01, trainable_ae=False, ae_path=None)
    vae_run = tmp_path / "vae_run"
    save_run_args(vae_run, run_args(**vae_fields))
    (vae_run / "generative_model_ema.npy").write_bytes(b"never read")
    vae_no_weights = tmp_path / "vae_no_weights"
    save_run_args(vae_no_weights, run_args(**vae_fields))
    vae_geom = tmp_path / "vae_geom"
    save_run_args(vae_geom, run_args(**vae_fields, dataset="geom"))
    huge_vae = tmp_path / "huge_vae"
    save_run_args(huge_vae, run_args(**vae_fields, nf=10_000_000))
    huge_latent = tmp_path / "huge_latent"
    save_run_args(huge_latent, run_args(**{**vae_fields, "latent_nf": 10**6}))
    (huge_latent / "generative_model_ema.npy").write_bytes(b"never read")
    geoldm_run = tmp_path / "geoldm_run"
    save_run_args(geoldm_run, run_args(**{**vae_fields, "train_diffusion": True}))
    results = tmp_path / "results"
    results.mkdir()
    (results / "results_atoms_5.csv").write_text("index,split_row,n_atoms,chunk,t,pass\n1,0,5,0,300,0\n1,0,5,0,350,x\n")
    garbage = tmp_path / "garbage_csv"
    garbage.mkdir()
    (garbage / "results_atoms_5.csv").write_bytes(b"\x00\x01PK not a csv at all\n")
    return {
        "tmp": str(tmp), "file": str(plain), "run": str(run), "edm_run": str(edm), "runs": str(runs), "huge_args": str(huge),
        "vae_run": str(vae_run), "vae_no_weights": str(vae_no_weights), "vae_geom": str(vae_geom),
        "huge_vae": str(huge_vae), "geoldm_run": str(geoldm_run), "huge_latent": str(huge_latent),
        "nan_args": str(nan_run), "text_factors": str(text_factors), "results": str(results), "garbage_csv": str(garbage),
        "evil_args": str(_pickle_file(tmp_path / "evil", pickle.dumps(argparse.Namespace(x=_RunsCommand())), weights=True)),
        "bytes_args": str(_pickle_file(tmp_path / "bytes", pickle.dumps(argparse.Namespace(x=_AllocatesBytes())))),
        "big_args": str(_pickle_file(tmp_path / "big", b"\x80\x04" + b"N" * (8 << 20))),
        "garbage_args": str(_pickle_file(tmp_path / "garbage", b"\x80\x04garbage")),
        "list_args": str(_pickle_file(tmp_path / "list", pickle.dumps([1, 2, 3]))),
    }


def run_script(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """Call the script's main(argv) in-process; (exit status, stderr)."""
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[script].main(argv)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("script, argv, expected", MATRIX, ids=[f"{s}:{' '.join(a[len(TRAIN):] if a[:len(TRAIN)] == TRAIN else a)}"
                                                                 for s, a, _ in MATRIX])
def test_bad_input_is_one_line_before_any_data_or_model(script, argv, expected, tripwires, places, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # scripts with default output folders write nothing into the repository
    argv = [a.format(**places) for a in argv]
    code, err = run_script(script, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2), err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(**places) in lines[0], lines[0]
    assert "Traceback" not in err and "weights_only=False" not in err
    assert list(tmp_path.iterdir()) == [] and list(Path(places["tmp"]).iterdir()) == []  # nothing was created


def test_the_matrix_covers_every_script():
    assert {script for script, _, _ in MATRIX} == set(SCRIPTS)
    assert len(MATRIX) >= 150
