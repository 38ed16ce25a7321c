"""The training command line: EDM's flags and defaults, GAGA's additions, the README commands, bad input."""
from __future__ import annotations

import argparse
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


from configs.errors import RunFolderError, UserInputError
from training.args import build_parser, default_args, fill_legacy_defaults, number_list, parse_args, str2bool

REPO_ROOT = Path(__file__).resolve().parents[1]

# The two training commands of the GAGA README, verbatim (after the script name).
README_QM9 = """--n_epochs 1650 --exp_name edm_qm9_GA_550 \
--n_stability_samples 1000 --diffusion_noise_schedule polynomial_2 \
--diffusion_noise_precision 1e-5 --diffusion_steps 1000 \
--diffusion_loss_type l2 --batch_size 256 --nf 256 --n_layers 9 \
--lr 1e-4 --normalize_factors [1,4,10] --test_epochs 500 \
--ema_decay 0.9999 --include_charge=False --dp=True \
--max_t=550 --no_wandb"""
README_GEOM = """--n_epochs 60 --exp_name edm_geom_drugs_GA_650 \
--n_stability_samples 500 --diffusion_noise_schedule polynomial_2 \
--diffusion_steps 1000 --diffusion_noise_precision 1e-5 \
--diffusion_loss_type l2 --batch_size 32 --nf 256 --n_layers 4 \
--lr 1e-4 --normalize_factors [1,4,10] --test_epochs 5 \
--ema_decay 0.9999 --normalization_factor 1 --model egnn_dynamics \
--visualize_every_batch 10000 --max_t=650 --no_wandb"""

# Every flag of EDM's main scripts that users pass (issue 4), by destination.
EDM_FLAGS = """exp_name model probabilistic_model diffusion_steps diffusion_noise_schedule diffusion_noise_precision
diffusion_loss_type n_epochs batch_size lr break_train_epoch dp condition_time clip_grad n_layers inv_sublayers nf tanh
attention norm_constant sin_embedding dataset datadir filter_n_atoms n_report_steps wandb_usr no_wandb online no_cuda
save_model generate_epochs num_workers test_epochs data_augmentation conditioning resume start_epoch ema_decay
augment_noise n_stability_samples normalize_factors remove_h include_charges visualize_every_batch normalization_factor
aggregation_method""".split()


def test_readme_qm9_command_parses_to_the_gaga_configuration():
    args = parse_args(shlex.split(README_QM9), script="qm9")
    assert args.exp_name == "edm_qm9_GA_550"
    assert (args.n_epochs, args.batch_size, args.nf, args.n_layers, args.test_epochs) == (1650, 256, 256, 9, 500)
    assert args.diffusion_noise_schedule == "polynomial_2" and args.diffusion_loss_type == "l2"
    assert args.diffusion_steps == 1000 and args.diffusion_noise_precision == 1e-5
    assert args.normalize_factors == [1, 4, 10]
    assert args.include_charges is False  # --include_charge=False is a prefix of --include_charges
    assert args.dp is True and args.no_wandb is True
    assert args.lr == 1e-4 and args.ema_decay == 0.9999
    assert args.max_t == 550 and args.zero_center_h is True  # auto: GAGA mode because --max_t is given
    assert args.dataset == "qm9" and args.dataset_var == 0.848  # GAGA mode: the published QM9 variance


def test_readme_geom_command_parses_with_geom_defaults():
    args = parse_args(shlex.split(README_GEOM), script="geom")
    assert args.dataset == "geom" and args.model == "egnn_dynamics"
    assert (args.n_epochs, args.batch_size, args.nf, args.n_layers) == (60, 32, 256, 4)
    assert args.normalization_factor == 1 and args.visualize_every_batch == 10000
    assert args.include_charges is False  # main_geom_drugs.py's default
    assert args.max_t == 650 and args.zero_center_h is True


def test_every_edm_flag_exists_with_edm_defaults():
    qm9 = vars(default_args("qm9"))
    assert set(EDM_FLAGS) <= set(qm9)
    assert qm9["diffusion_steps"] == 200 and qm9["diffusion_noise_schedule"] == "learned"
    assert qm9["diffusion_loss_type"] == "vlb" and qm9["lr"] == 2e-4 and qm9["nf"] == 128 and qm9["n_layers"] == 6
    assert qm9["normalize_factors"] == [1, 4, 1] and qm9["include_charges"] is True and qm9["ema_decay"] == 0.999
    assert qm9["test_epochs"] == 10 and qm9["n_stability_samples"] == 500 and qm9["batch_size"] == 128
    geom = vars(default_args("geom"))
    assert geom["dataset"] == "geom" and geom["lr"] == 5e-4 and geom["nf"] == 192 and geom["n_report_steps"] == 50
    assert geom["normalize_factors"] == [1, 4, 10] and geom["include_charges"] is False
    # GAGA's additions default to plain EDM behaviour.
    assert qm9["max_t"] is None and qm9["sampling_step_size"] == 1
    assert parse_args(["--diffusion_noise_schedule", "polynomial_2"]).dataset_var == 1.0  # resolved: no Gaussian start


def test_edm_spellings_of_booleans_and_lists():
    args = parse_args(["--dp", "False", "--clip_grad=false", "--include_charges", "True", "--normalize_factors", "[1, 4, 10]"])
    assert (args.dp, args.clip_grad, args.include_charges, args.normalize_factors) == (False, False, True, [1, 4, 10])
    assert number_list("1,4,10") == [1, 4, 10] and number_list("(1, 4.5, 10)") == [1, 4.5, 10]
    assert str2bool("0") is False and str2bool("yes") is True


def test_zero_center_h_is_resolved_to_a_bool():
    assert parse_args([]).zero_center_h is False and parse_args([]).max_t is None
    assert parse_args(["--max_t", "550", "--diffusion_steps", "1000", "--zero_center_h", "false"]).zero_center_h is False
    assert parse_args(["--zero_center_h", "true"]).zero_center_h is True


def test_wandb_is_off_unless_asked_for():
    assert parse_args([]).no_wandb is True
    assert parse_args(["--wandb"]).no_wandb is False
    assert parse_args(["--no_wandb=False"]).no_wandb is False


@pytest.mark.parametrize("argv, expected", [
    (["--no_such_flag"], "unrecognized arguments"),
    (["--normalize_factors", "__import__('os').getcwd()"], "list of numbers"),
    (["--dp=maybe"], "expected True or False"),
    (["--zero_center_h", "sometimes"], "auto, true or false"),
])
def test_bad_flags_are_argparse_errors(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--diffusion_steps", "1000", "--max_t", "1001"], "--max_t must be between 1 and --diffusion_steps"),
    (["--normalize_factors", "[1,4]"], "must be three finite positive numbers"),
    (["--conditioning", "beta"], "--conditioning: unknown property 'beta'; choose from alpha, gap, homo, lumo, mu, Cv"),
    (["--conditioning", "cv"], "(did you mean Cv?)"),
    (["--conditioning", "alpha", "alpha"], "--conditioning names alpha more than once"),
    (["--conditioning", "alpha", "--dataset", "qm9_first_half"], "--conditioning needs --dataset qm9_second_half"),
    (["--conditioning", "alpha", "--model", "gnn_dynamics"], "not supported by --model gnn_dynamics"),
    (["--dataset_var", "0"], "--dataset_var must be a finite number > 0"),
    (["--diffusion_steps", "1000", "--max_t", "550", "--sampling_step_size", "3"], "must divide the chain's start"),
])
def test_inconsistent_flags_are_one_line_errors(argv, expected):
    """(--conditioning's valid uses: tests/test_conditional_training.py.)"""
    with pytest.raises(UserInputError) as exit_info:
        parse_args(argv)
    message = str(exit_info.value)
    assert expected in message and "\n" not in message


def test_resume_without_a_run_is_a_one_line_error(tmp_path):
    from training.run import main

    with pytest.raises(RunFolderError) as missing:
        main(["--resume", str(tmp_path / "no_run")])
    assert "no such folder" in str(missing.value) and "\n" not in str(missing.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError) as empty:
        main(["--resume", str(tmp_path / "empty")])
    assert "no args.pickle" in str(empty.value) and "\n" not in str(empty.value)


def test_resume_refuses_to_change_the_model(tmp_path):
    from configs.run_args import save_run_args
    from training.run import main

    run = tmp_path / "run"
    save_run_args(run, parse_args(["--nf", "16"]))
    (run / "generative_model.npy").write_bytes(b"")
    with pytest.raises(UserInputError) as changed:
        main(["--resume", str(run), "--nf", "32"])
    assert "--nf cannot change when resuming" in str(changed.value)


def test_legacy_args_pickles_get_edm_defaults_and_their_mode():
    edm = argparse.Namespace(nf=256, n_layers=9, dataset="qm9", include_charges=True)
    gaga = argparse.Namespace(nf=256, n_layers=9, dataset="qm9", include_charges=False, max_t=1000)
    edm_full, gaga_full = fill_legacy_defaults(edm), fill_legacy_defaults(gaga)
    assert edm_full.zero_center_h is False and edm_full.max_t is None and edm_full.aggregation_method == "sum"
    assert gaga_full.zero_center_h is True and gaga_full.max_t == 1000
    assert edm_full.nf == 256 and edm_full.dataset_var == 1.0
    # The filled namespace pickles with plain types only (readable by configs.run_args' safe loader).
    from configs.run_args import loads_args

    assert loads_args(pickle.dumps(edm_full)).nf == 256


def test_scripts_show_their_help():
    for script, flag in (("main_qm9.py", "--max_t"), ("main_geom_drugs.py", "--filter_molecule_size")):
        out = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and flag in out.stdout


def test_parser_has_no_ambiguous_readme_prefix():
    # '--include_charge' must stay an unambiguous prefix: no other flag may start with it.
    options = [o for a in build_parser()._actions for o in a.option_strings]
    assert [o for o in options if o.startswith("--include_charge")] == ["--include_charges"]
