"""Property-conditional training and evaluation end to end (EDM's --conditioning, main_qm9_prop.py,
eval_conditional_qm9.py): a tiny conditional run (EDM and GAGA), its context in training,
resume, sampling for given property values, classifiers and the #Atoms baseline, every
evaluation task, EDM's published conditional folder, bad input."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_analyze
import eval_conditional_qm9
from configs.errors import UserInputError
from configs.run_args import save_run_args
from qm9.data.qm9 import load_qm9
from qm9.property_prediction import train_classifier as tc
from qm9.property_prediction.models_property import classifier_inputs, get_model as get_classifier
from qm9.utils import compute_mean_mad_from_dataloader
from training import conditional_eval as ce
from training.args import parse_args
from training.checkpoint import load_resume_state
from training.run import main as train_main
from training.trainer import Trainer

from conftest import FIXTURES
from test_resume import assert_same

COND_KEYS = FIXTURES / "edm_cond_alpha_state_dict.txt"

pytestmark = pytest.mark.usefixtures("one_thread")


def train_argv(root, datadir, name, *extra: str) -> list[str]:
    """EDM's conditional config (no charges, one-hot / 8, second half) at toy size: 2 epochs of 2 batches."""
    return [
        "--exp_name", name, "--output_root", str(root), "--datadir", str(datadir), "--dataset", "qm9_second_half",
        "--conditioning", "alpha", "gap", "--data_subset", "40", "--batch_size", "20", "--n_epochs", "2",
        "--nf", "16", "--n_layers", "1", "--diffusion_steps", "20", "--diffusion_noise_schedule", "polynomial_2",
        "--diffusion_loss_type", "l2", "--normalize_factors", "[1,8,1]", "--include_charges", "False",
        "--test_epochs", "1", "--n_stability_samples", "4", "--visualize_every_batch", "0", "--ema_decay", "0.9",
        *extra,
    ]


class RecordingTrainer(Trainer):
    """Keeps the context of every training batch (to check what the network was given)."""

    contexts: list = []

    def loss(self, batch):
        RecordingTrainer.contexts.append((batch[4], batch[2]))
        return super().loss(batch)


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, qm9_datadir):
    """A GAGA conditional run (--max_t 10 of T = 20) trained 2 epochs on 40 second-half molecules."""
    root = tmp_path_factory.mktemp("cond")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    RecordingTrainer.contexts = []
    summary = train_main(train_argv(root, qm9_datadir, "run", "--max_t", "10"), trainer_cls=RecordingTrainer)
    torch.set_num_threads(threads)
    return root / "run", summary, list(RecordingTrainer.contexts)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, qm9_datadir):
    """Tiny alpha and gap classifiers and an alpha #Atoms baseline (EDM's folders)."""
    root = tmp_path_factory.mktemp("cls")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (module fixtures start before one_thread): bit-identical resumes
    common = ["--outf", str(root), "--datadir", str(qm9_datadir), "--data_subset", "60", "--epochs", "2",
              "--nf", "8", "--n_layers", "1", "--batch_size", "30"]
    tc.main([*common, "--exp_name", "alpha", "--property", "alpha", "--lr", "5e-4"])
    tc.main([*common, "--exp_name", "gap", "--property", "gap", "--lr", "1e-3"])
    tc.main([*common, "--exp_name", "alpha_numnodes", "--property", "alpha", "--model_name", "numnodes"])
    torch.set_num_threads(threads)
    return root


# ------------------------------------------------------------------ the flags


def test_conditioning_flags_are_accepted_with_edms_datasets():
    args = parse_args(["--conditioning", "alpha", "gap", "--dataset", "qm9_second_half"])
    assert args.conditioning == ["alpha", "gap"]
    assert parse_args(["--conditioning", "Cv", "--dataset", "qm9", "--diffusion_steps", "1000", "--max_t", "550"]).conditioning == ["Cv"]
    assert parse_args([]).conditioning == []


# ------------------------------------------------------------------ training


def test_conditional_run_trains_validates_and_records_edms_fields(conditional_run):
    run_dir, summary, _ = conditional_run
    from configs.run_args import load_run_args

    args = load_run_args(run_dir)
    assert (args.conditioning, args.context_node_nf, args.dataset, args.max_t) == (["alpha", "gap"], 2, "qm9_second_half", 10)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(np.isfinite(r["val_nll"]) and np.isfinite(r["test_nll"]) for r in records)
    assert records[-1]["stability"] is not None  # sampled with contexts drawn from p(c | N)
    state = load_resume_state(run_dir)["model"]
    assert state["dynamics.egnn.embedding.weight"].shape == (16, 5 + 1 + 2)  # [one-hot | t | alpha | gap]


def test_training_context_is_each_molecules_true_values_normalised_by_the_valid_split(conditional_run, qm9_datadir):
    _, _, contexts = conditional_run
    assert len(contexts) == 4  # 2 epochs x 2 batches
    train = load_qm9(qm9_datadir, "train", progress=False)
    from qm9.data.halves import half_rows

    half = {k: v[half_rows("qm9_second_half")][:40] for k, v in train.items()}
    valid = {k: v[:40] for k, v in load_qm9(qm9_datadir, "valid", progress=False).items()}
    norms = compute_mean_mad_from_dataloader(valid, ["alpha", "gap"])  # EDM: qm9_second_half -> valid statistics
    seen = set()
    for context, node_mask in contexts:
        assert context.shape[:2] == node_mask.shape[:2] and context.shape[2] == 2
        assert torch.equal(context * node_mask, context)  # padding carries 0
        per_molecule = context[:, 0]  # slot 0 is always a real atom
        assert torch.equal(context, per_molecule.unsqueeze(1) * node_mask)  # the same value on every atom
        for p, prop in enumerate(("alpha", "gap")):
            values = per_molecule[:, p] * norms[prop]["mad"] + norms[prop]["mean"]
            ref = torch.as_tensor(half[prop])
            nearest = (values.unsqueeze(1) - ref.unsqueeze(0)).abs().min(1).values
            assert nearest.max() < 1e-4
        seen.update(per_molecule[:, 0].tolist())
    assert len(seen) == 40  # every training molecule, each epoch


def test_conditional_resume_is_bit_identical(tmp_path, qm9_datadir, conditional_run):
    run_dir, _, _ = conditional_run
    train_main(train_argv(tmp_path, qm9_datadir, "run", "--max_t", "10", "--stop_after_steps", "3",
                          "--checkpoint_every_steps", "1"))
    train_main(["--resume", str(tmp_path / "run")])
    assert_same(load_resume_state(run_dir), load_resume_state(tmp_path / "run"))


# ------------------------------------------------------------------ sampling and evaluation of the run


def test_sampling_for_given_property_values_feeds_them_to_the_network(conditional_run):
    from qm9.sampling import sample
    from training.evaluate import load_run

    run_dir, _, _ = conditional_run
    run = load_run(run_dir, torch.device("cpu"), datadir=None)
    assert run.prop_dist is not None and set(run.property_norms) == {"alpha", "gap"}
    wanted = torch.tensor([[60.0, 5.0], [90.0, 8.0]])  # alpha (Bohr^3), gap (eV)
    norms = run.property_norms
    context = torch.stack([(wanted[:, p] - norms[k]["mean"]) / norms[k]["mad"] for p, k in enumerate(("alpha", "gap"))], 1)
    seen = []
    hook = run.model.dynamics.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[4].detach()))
    one_hot, _, x, node_mask = sample(run.args, "cpu", run.model, run.dataset_info, None, torch.tensor([5, 9]),
                                      context=context, start_step=4)
    hook.remove()
    assert one_hot.shape == (2, 29, 5) and int(node_mask.sum()) == 14
    assert len(seen) == 5  # one network call per step and one for p(x, h | z_0), each with the requested values
    for given in seen:
        assert torch.allclose(given, context.unsqueeze(1) * node_mask)


def test_eval_analyze_scores_a_conditional_run_including_its_nll(conditional_run, tmp_path, capsys):
    run_dir, _, _ = conditional_run
    record = eval_analyze.main(["--model_path", str(run_dir), "--n_samples", "3", "--no_novelty", "--eval_nll", "True",
                                "--data_subset", "10", "--metrics_json", str(tmp_path / "m.json")])
    assert np.isfinite(record["metrics"]["nll_val"]) and np.isfinite(record["metrics"]["nll_test"])


def test_eval_sample_draws_a_conditional_run(conditional_run):
    import eval_sample

    run_dir, _, _ = conditional_run
    written = eval_sample.main(["--model_path", str(run_dir), "--n_samples", "2", "--n_chains", "1", "--keep_frames", "3"])
    assert written["molecules"] and written["chain_0"]


def test_eval_conditional_table_reports_every_row(conditional_run, classifiers, tmp_path, capsys):
    run_dir, _, _ = conditional_run
    record = eval_conditional_qm9.main([
        "--generators_path", str(run_dir), "--task", "table", "--property", "alpha", "gap",
        "--classifiers_path", str(classifiers / "alpha"), str(classifiers / "gap"),
        "--numnodes_path", str(classifiers / "alpha_numnodes"), "--iterations", "3", "--batch_size", "4",
        "--data_subset", "50", "--output_root", str(tmp_path), "--exp_name", "ev"])
    out = capsys.readouterr().out
    alpha, gap = record["results"]["alpha"], record["results"]["gap"]
    assert set(alpha) == {"naive", "qm9_second_half", "numnodes", "edm"} and set(gap) == {"naive", "qm9_second_half", "edm"}
    assert alpha["edm"]["iterations"] == 3 and alpha["edm"]["molecules"] == 12  # exactly iterations x batch (EDM: +1)
    assert alpha["qm9_second_half"]["molecules"] == 50
    assert record["sampling"]["start_step"] == 10  # the GAGA run samples from its own T*
    assert "alpha #Atoms: MAE" in out and "gap generator: MAE" in out
    assert json.loads((tmp_path / "ev" / "eval_conditional_table.json").read_text())["results"]["gap"]["edm"]["molecules"] == 12


def test_edm_task_compares_the_classifier_with_the_requested_values(conditional_run):
    """Known answer: a classifier that always predicts 0 (normalised) scores |mean_c - requested value|."""
    from training.evaluate import load_run

    run_dir, _, _ = conditional_run
    run = load_run(run_dir, torch.device("cpu"))
    zero = get_classifier("numnodes")
    torch.nn.init.zeros_(zero.linear2.weight), torch.nn.init.zeros_(zero.linear2.bias)
    fixed = torch.tensor([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]])
    run.prop_dist.sample_batch = lambda sizes: fixed[: len(sizes)]
    mean, mad = torch.tensor(70.0), torch.tensor(5.0)
    result = ce.evaluate_generated(run, {"gap": (zero, mean, mad)}, {"start_step": 3}, iterations=2, batch_size=3,
                                   device=torch.device("cpu"), progress=False)
    labels = fixed[:, 1] * run.property_norms["gap"]["mad"] + run.property_norms["gap"]["mean"]
    assert result["gap"]["mae"] == pytest.approx(float((mean - labels).abs().mean()), rel=1e-6)
    assert result["gap"]["std_over_iterations"] == 0.0 and result["gap"]["molecules"] == 6


def test_qualitative_sweeps_write_molecules_pictures_and_a_gif(conditional_run, tmp_path):
    run_dir, _, _ = conditional_run
    record = eval_conditional_qm9.main(["--generators_path", str(run_dir), "--task", "qualitative", "--n_sweeps", "1",
                                        "--gif", "True", "--n_frames", "6", "--output_root", str(tmp_path), "--exp_name", "q",
                                        "--GA_timestep", "4", "--sampler", "ddim", "--sampling_step_size", "2"])
    folder = tmp_path / "q" / "qualitative" / "sweep_0"
    assert len(list(folder.glob("sweep_*.xyz"))) == 6 and (folder / "sweep.gif").is_file() and (folder / "chain.png").is_file()
    assert record["sampling"] == {"start_step": 4, "dataset_var": 0.848, "step_size": 2, "sampler": "ddim"}


# ------------------------------------------------------------------ classifiers


def test_classifier_folders_have_edms_layout_and_load(classifiers):
    for name in ("alpha", "gap", "alpha_numnodes"):
        assert {"args.pickle", "best_checkpoint.npy", "losess.json", "resume_state.pt"} <= {p.name for p in (classifiers / name).iterdir()}
    model, args = tc.load_classifier(classifiers / "alpha")
    assert (args.property, args.model_name, args.dataset) == ("alpha", "egnn", "qm9_first_half")
    log = json.loads((classifiers / "alpha" / "losess.json").read_text())
    assert log["epochs"] == [0, 1] and log["best_val"] < 1e10
    # The test MAE is computed where validation improved (the reported one: at the best validation epoch).
    assert log["losess"][log["epochs"].index(log["best_epoch"])] == log["best_test"]
    baseline, args = tc.load_classifier(classifiers / "alpha_numnodes")
    assert args.model_name == "numnodes" and sum(p.numel() for p in baseline.parameters()) == 385


def test_classifier_resume_is_exact(tmp_path, qm9_datadir, classifiers):
    common = ["--outf", str(tmp_path), "--datadir", str(qm9_datadir), "--data_subset", "60", "--epochs", "2",
              "--nf", "8", "--n_layers", "1", "--batch_size", "30", "--exp_name", "alpha", "--property", "alpha", "--lr", "5e-4"]
    tc.main([*common, "--stop_after_epochs", "1"])
    assert torch.load(tmp_path / "alpha" / "resume_state.pt", weights_only=True)["epoch"] == 1
    tc.main(["--outf", str(tmp_path), "--exp_name", "alpha", "--resume"])  # the other flags come from args.pickle
    a = torch.load(classifiers / "alpha" / "resume_state.pt", weights_only=True)
    b = torch.load(tmp_path / "alpha" / "resume_state.pt", weights_only=True)
    assert_same(a, b)


def test_classifier_on_size_groups_equals_the_padded_batch(qm9_datadir):
    from qm9.data.collate import PaddedMoleculeDataset

    batch = PaddedMoleculeDataset(load_qm9(qm9_datadir, "valid", progress=False)).__getitems__(list(range(0, 400, 13)))
    torch.manual_seed(0)
    model = get_classifier("egnn", nf=16, n_layers=2)
    outputs, grads = {}, {}
    for mode in ("false", "true"):
        model.group_by_size = mode
        model.zero_grad()
        outputs[mode] = model(**classifier_inputs(batch))
        outputs[mode].square().sum().backward()
        grads[mode] = model.gcl_0.edge_mlp[0].weight.grad.clone()
    bs, n_nodes, _ = batch["positions"].shape
    plan = model._plan_groups(batch["atom_mask"].float(), batch["edge_mask"].float().view(bs, n_nodes, n_nodes))
    assert plan is not None and len(plan[2].blocks) > 1  # the grouped path really ran on several blocks
    torch.testing.assert_close(outputs["true"], outputs["false"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["true"], grads["false"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ EDM's published conditional folder


def test_edms_published_conditional_folder_loads_and_is_evaluated(tmp_path, classifiers, qm9_datadir):
    """exp_35_conditional_nf192_9l_alpha's args.pickle fields and exact key list (strict load); evaluated
    with the 'edm' task from a Gaussian start two steps before 0 (GAGA's option, to keep it fast)."""
    from qm9.models import get_model
    from qm9.data.halves import half_dataset_info

    run = tmp_path / "exp_35_conditional_nf192_9l_alpha"
    args = argparse.Namespace(
        exp_name="exp_35_conditional_nf192_9l_alpha", model="egnn_dynamics", probabilistic_model="diffusion",
        diffusion_steps=1000, diffusion_noise_schedule="polynomial_2", diffusion_noise_precision=1e-5,
        diffusion_loss_type="l2", n_epochs=3000, batch_size=64, lr=1e-4, nf=192, n_layers=9, inv_sublayers=1,
        attention=True, tanh=True, norm_constant=1, sin_embedding=False, normalization_factor=1, condition_time=True,
        dataset="qm9_second_half", datadir="qm9/temp", conditioning=["alpha"], context_node_nf=1,
        include_charges=False, normalize_factors=[1, 8, 1], ema_decay=0.999, dequantization="deterministic",
        remove_h=False, current_epoch=2741, cuda=True, dp=True, test_epochs=10, n_stability_samples=500,
    )  # no aggregation_method, max_t, zero_center_h: EDM's pickle lacks them
    save_run_args(run, args)
    shapes = {}
    for line in COND_KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            shapes[key] = tuple(int(n) for n in re.findall(r"\d+", shape))
    model, _, _ = get_model(argparse.Namespace(**vars(args), aggregation_method="sum"), "cpu", half_dataset_info("qm9_second_half"))
    torch.manual_seed(0)
    state = {k: torch.randn(s) * 0.02 for k, s in shapes.items()}
    state["gamma.gamma"], state["buffer"] = model.gamma.gamma.clone(), model.buffer.clone()
    torch.save(state, run / "generative_model_ema.npy")
    torch.save(state, run / "generative_model.npy")
    record = eval_conditional_qm9.main([
        "--generators_path", str(run), "--classifiers_path", str(classifiers / "alpha"), "--property", "alpha",
        "--task", "edm", "--iterations", "1", "--batch_size", "2", "--GA_timestep", "2", "--datadir", str(qm9_datadir),
        "--output_root", str(tmp_path), "--exp_name", "pub"])
    assert record["weights"] == "generative_model_ema.npy" and record["results"]["alpha"]["edm"]["molecules"] == 2
    assert record["sampling"]["dataset_var"] == 1.0  # an EDM run: GAGA's start only when asked, with v = 1 unless given


# ------------------------------------------------------------------ bad input: one line, nothing built


@pytest.mark.parametrize("argv, expected", [
    (["--task", "edm", "--property", "homo"], "the generator is conditioned on alpha gap only"),
    (["--task", "edm", "--property", "alpha", "gap"], "give one --classifiers_path per --property"),
    (["--task", "table", "--property", "alpha"], "--task table needs --numnodes_path"),
    (["--task", "nope"], "invalid choice: 'nope'"),
    (["--iterations", "0"], "--iterations must be an integer >= 1"),
    (["--exp_name", "../x"], "must be a plain folder name"),
    (["--GA_timestep", "0"], "--GA_timestep must be an integer >= 1"),
])
def test_eval_conditional_bad_flags_are_one_line(argv, expected, conditional_run, classifiers, capsys, monkeypatch, tmp_path,
                                                qm9_datadir):
    run_dir, _, _ = conditional_run
    monkeypatch.chdir(tmp_path)
    import training.evaluate

    monkeypatch.setattr(training.evaluate, "load_run", lambda *a, **k: pytest.fail("model built for bad input"))
    with pytest.raises(SystemExit) as stop:
        eval_conditional_qm9.main(["--generators_path", str(run_dir), "--classifiers_path", str(classifiers / "gap"),
                                   "--datadir", str(qm9_datadir), *argv])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err and err.startswith("error: ") and expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_eval_conditional_refuses_unconditional_runs_and_wrong_classifiers(conditional_run, classifiers, tmp_path, capsys):
    run_dir, _, _ = conditional_run
    plain = tmp_path / "plain"
    save_run_args(plain, parse_args(["--diffusion_noise_schedule", "polynomial_2"]))
    cases = [
        (["--generators_path", str(plain), "--task", "edm"], "is not a conditional run"),
        (["--generators_path", str(run_dir), "--task", "edm", "--property", "alpha", "--classifiers_path",
          str(classifiers / "gap")], "is a classifier for 'gap', not for --property alpha"),
        (["--generators_path", str(run_dir), "--task", "edm", "--property", "alpha", "--classifiers_path",
          str(tmp_path / "none")], "does not exist"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit):
            eval_conditional_qm9.main([*argv, "--output_root", str(tmp_path), "--datadir", "qm9/temp"])
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expected in err, err


@pytest.mark.parametrize("argv, expected", [
    (["--property", "polarizability"], "--property 'polarizability' is not a QM9 property"),
    (["--model_name", "schnet"], "--model_name 'schnet': choose egnn"),
    (["--dataset", "geom"], "classifiers train on qm9_first_half"),
    (["--remove_h"], "--remove_h: EDM's property classifiers see every atom"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--exp_name", "a/b"], "must be a plain folder name"),
    (["--resume"], "resume_state.pt does not exist"),
    (["--node_attr", "1"], "--node_attr 1 is not supported"),
])
def test_classifier_bad_flags_are_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    from qm9.property_prediction import main_qm9_prop

    monkeypatch.setattr(tc, "load_splits", lambda args: pytest.fail("data read for bad input"))
    with pytest.raises(SystemExit) as stop:
        main_qm9_prop.main(["--outf", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err and expected in err, err


def test_classifier_refuses_to_overwrite_a_run_and_resume_checks_flags(classifiers, capsys):
    from qm9.property_prediction import main_qm9_prop

    for argv, expected in (
        (["--exp_name", "alpha"], "already holds a classifier run"),
        (["--exp_name", "alpha", "--resume", "--nf", "32"], "--nf cannot change when resuming"),
    ):
        with pytest.raises(SystemExit):
            main_qm9_prop.main(["--outf", str(classifiers), *argv])
        assert expected in capsys.readouterr().err


def test_ddp_padding_pads_the_context_with_the_atoms(monkeypatch, qm9_datadir):
    """Under DDP a shard is padded to the global batch's largest molecule; its context must follow."""
    from qm9.data.collate import PaddedMoleculeDataset
    from training import loop
    from training.distributed import DistContext

    batch = PaddedMoleculeDataset(load_qm9(qm9_datadir, "valid", progress=False)).__getitems__([0, 1, 2])
    n_own = batch["positions"].shape[1]
    monkeypatch.setattr(loop, "all_reduce_max_int", lambda value, ctx: value + 4)
    args = parse_args(["--conditioning", "alpha", "--dataset", "qm9_second_half", "--include_charges", "False"])
    norms = {"alpha": {"mean": torch.tensor(75.0), "mad": torch.tensor(6.0)}}
    x, h, node_mask, edge_mask, context = loop._prepare(args, batch, "cpu", torch.float32, DistContext(world_size=2), norms)
    assert x.shape[1] == context.shape[1] == node_mask.shape[1] == n_own + 4
    assert torch.equal(context[:, n_own:], torch.zeros(3, 4, 1))
    assert torch.equal(context[:, :n_own, 0], ((batch["alpha"] - 75.0) / 6.0).unsqueeze(1) * batch["atom_mask"])


def test_in_training_pictures_of_a_conditional_run_include_edms_sweep(conditional_run, tmp_path):
    from training.evaluate import load_run
    from training.visualize import make_visualize_fn

    run_dir, _, _ = conditional_run
    run = load_run(run_dir, torch.device("cpu"))
    make_visualize_fn(run.model, run.nodes_dist, run.args, "cpu", run.dataset_info, run.prop_dist, tmp_path)(0, 1)
    sweep = tmp_path / "epoch_0_1" / "conditional"
    assert len(list(sweep.glob("conditional_*.xyz"))) == 100 and (sweep / "chain.png").is_file()
