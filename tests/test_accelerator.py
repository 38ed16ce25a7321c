"""The GPU path, proven on the CPU: the stand-in accelerator of ``fake_accelerator`` drives
training, --resume, evaluation, sampling and the pictures; the accelerator policy's op and
host-sync counts are budgeted; the NaN guard, DDP normalisation and torch.compile are checked."""
from __future__ import annotations

import pytest
import torch

from fake_accelerator import DeviceMismatch, FakeAccelerator
from training.distributed import DistContext

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_argv(root, datadir, name, *extra: str) -> list[str]:
    return [
        "--exp_name", name, "--output_root", str(root), "--datadir", str(datadir), "--data_subset", "32",
        "--nf", "16", "--n_layers", "2", "--diffusion_steps", "10", "--diffusion_noise_schedule", "polynomial_2",
        "--diffusion_loss_type", "l2", "--normalize_factors", "[1,4,10]", "--batch_size", "16", "--n_epochs", "2",
        "--test_epochs", "1", "--n_stability_samples", "3", "--visualize_every_batch", "0", "--ema_decay", "0.9",
        "--max_t", "6", "--include_charges=False", *extra,
    ]


@pytest.fixture
def accelerator(monkeypatch):
    """Every entry point runs on the stand-in accelerator while the test runs."""
    from training import distributed, run

    with FakeAccelerator() as acc:
        monkeypatch.setattr(distributed, "select_device", lambda no_cuda=False: acc.device)
        monkeypatch.setattr(run, "setup", lambda args: DistContext(device=acc.device))
        yield acc


# ------------------------------------------------------------------ the harness itself


def test_the_stand_in_catches_a_planted_device_bug():
    with FakeAccelerator() as acc:
        on_device = torch.ones(4, 3, device=acc.device)
        assert on_device.device.type != "cpu" and acc.on_device(on_device)
        with pytest.raises(DeviceMismatch, match="CPU tensor"):
            on_device + torch.ones(4, 3)  # the planted bug: a host tensor without device=
        with pytest.raises(TypeError, match="numpy"):
            on_device.numpy()
        assert torch.equal((on_device * torch.tensor(2.0)).cpu(), torch.full((4, 3), 2.0))  # CPU scalars are fine
        acc.reset()
        assert on_device.sum().item() == 12.0 and on_device.tolist()[0] == [1.0, 1.0, 1.0]
        assert acc.syncs == 2 and acc.op_names["sum"] == 1  # .item() and .tolist() wait for the device
        # The classic planted bug: a constant table kept as a plain attribute, which .to() does not move.

        class Scaled(torch.nn.Linear):
            def __init__(self):
                super().__init__(3, 2)
                self.scale = torch.ones(2)

            def forward(self, x):
                return super().forward(x) * self.scale

        layer = Scaled().to(acc.device)
        with pytest.raises(DeviceMismatch, match="aten.mul"):
            layer(on_device)


# ------------------------------------------------------------------ fixes with tests that failed before


def test_resume_works_on_an_accelerator(tmp_path, qm9_datadir, accelerator):
    from training.checkpoint import load_resume_state
    from training.run import main

    main(tiny_argv(tmp_path, qm9_datadir, "run", "--stop_after_steps", "3", "--checkpoint_every_steps", "1"))
    saved = load_resume_state(tmp_path / "run")
    assert saved["state"]["global_step"] == 3 and saved["state"]["epoch"] == 1
    # Resuming with nothing left to train returns the loaded state: the weights reached the device.
    loaded = main(["--resume", str(tmp_path / "run"), "--n_epochs", "1"])  # used to fail: RNG states on the device
    for name, tensor in loaded["model"].state_dict().items():
        assert torch.equal(tensor.cpu(), saved["model"][name]), name
    summary = main(["--resume", str(tmp_path / "run"), "--n_epochs", "2"])
    assert summary["state"]["epoch"] == 2 and summary["state"]["global_step"] == 4
    assert all(accelerator.on_device(p) for p in summary["model"].parameters())


def test_nan_guard_survives_both_outputs_being_nan(monkeypatch, tmp_path, qm9_datadir):
    """Both network outputs NaN: the reset keeps the graph, backward runs, the batch is skipped."""
    from egnn.models import EGNN_dynamics_QM9
    from training.run import main

    original = EGNN_dynamics_QM9._network

    def poisoned(self, *args):
        return tuple(out * float("nan") for out in original(self, *args))

    monkeypatch.setattr(EGNN_dynamics_QM9, "_network", poisoned)
    with pytest.warns(RuntimeWarning, match="NaN"):
        summary = main(tiny_argv(tmp_path, qm9_datadir, "run", "--nan_patience", "100", "--n_stability_samples", "0"))
    assert summary["state"]["nan_total"] == 4  # every batch skipped (NaN gradients), none crashed
    assert summary["optim"].state_dict()["state"] == {}


def test_a_loss_without_graph_is_skipped_not_back_propagated(monkeypatch, tmp_path, qm9_datadir):
    from training import loop
    from training.run import main

    real = loop.compute_loss_and_nll

    def detached(*args, **kwargs):
        nll, reg, z = real(*args, **kwargs)
        return nll.detach(), reg, z

    monkeypatch.setattr(loop, "compute_loss_and_nll", detached)
    summary = main(tiny_argv(tmp_path, qm9_datadir, "run", "--nan_patience", "100", "--n_stability_samples", "0"))
    assert summary["state"]["nan_total"] == 4


# ------------------------------------------------------------------ every entry point on the accelerator


def test_training_evaluation_sampling_and_pictures_run_on_an_accelerator(tmp_path, qm9_datadir, accelerator):
    import eval_analyze
    import eval_sample
    import GAGA_test
    from training.run import main

    summary = main(tiny_argv(tmp_path, qm9_datadir, "run", "--visualize_every_batch", "1", "--n_epochs", "2",
                             "--data_subset", "16"))
    run = tmp_path / "run"
    assert (run / "epoch_1_0" / "chain" / "chain.png").is_file()  # the in-training chain visualisation
    assert set(summary["stability"]) >= {"mol_stable", "atm_stable"}
    record = eval_analyze.main(["--model_path", str(run), "--n_samples", "3", "--batch_size_gen", "3", "--no_novelty",
                                "--datadir", str(qm9_datadir)])
    assert 0.0 <= record["metrics"]["atm_stable"] <= 1.0
    for sampler in ("ddpm", "ddim"):
        results = GAGA_test.main(["--model_path", str(run), "--no_novelty", "--n_samples", "3", "--batch_size_gen", "3",
                                  "--iteration", "1", "--shortcut", "Gaussian", "--sampler", sampler,
                                  "--sampling_step_size", "2", "--test_name", sampler])
        assert len(results) == 1
    written = eval_sample.main(["--model_path", str(run), "--n_samples", "2", "--n_chains", "1", "--n_tries", "1",
                                "--keep_frames", "3", "--n_nodes", "9"])
    assert (run / "eval" / "chain_0" / "chain.png").is_file() and written


# ------------------------------------------------------------------ the accelerator policy's budgets


def _paper_model(device, group_by_size, nf):
    from bench.bench_model import qm9_args
    from configs.datasets_config import get_dataset_info
    from qm9.models import get_model

    args = qm9_args(nf, 9)
    args.group_by_size = group_by_size
    torch.manual_seed(0)
    model, nodes_dist, _ = get_model(args, device, get_dataset_info("qm9", False), None)
    return args, model.to(device), nodes_dist


def count_training_and_sampling_step(acc, group_by_size, qm9_datadir, nf=256):
    """(ops, syncs) of one training step (64 QM9 molecules) and one sampling step (100 molecules
    padded to 29) of the paper's model (9 layers), counted on the stand-in accelerator.

    The counts do not depend on the width (nf 16 and 256 give the same ops: the same kernels on
    smaller tensors), so tests count at nf 16, which runs in seconds.
    """
    from bench.bench_model import training_batch
    from configs.datasets_config import get_dataset_info
    from equivariant_diffusion.distributions import DistributionNodes
    from qm9.losses import compute_loss_and_nll, preprocess_batch
    from qm9.sampling import masks_from_sizes

    info = get_dataset_info("qm9", False)
    batch = training_batch(str(qm9_datadir), 64, 0)
    torch.manual_seed(0)
    sizes = DistributionNodes(info["n_nodes"]).sample(100)
    args, model, nodes_dist = _paper_model(acc.device, group_by_size, nf)
    x, h, node_mask, edge_mask, context = preprocess_batch(batch, acc.device, torch.float32, True, False)
    model.train()
    acc.reset()
    nll, _, _ = compute_loss_and_nll(args, model, nodes_dist, x, h, node_mask, edge_mask, context)
    nll.backward()
    train = (acc.ops, acc.syncs)
    s_node_mask, s_edge_mask = masks_from_sizes(sizes, info["max_n_nodes"], acc.device)
    z = model.sample_combined_position_feature_noise(100, info["max_n_nodes"], s_node_mask)
    t = torch.full((100, 1), 0.5, device=acc.device)
    s = torch.full((100, 1), 0.499, device=acc.device)
    model.eval()
    with torch.no_grad():
        model.sample_p_zs_given_zt(s, t, z, s_node_mask, s_edge_mask, None)  # the chain's first step
        acc.reset()
        model.sample_p_zs_given_zt(s, t, z, s_node_mask, s_edge_mask, None)  # every later step
    return train, (acc.ops, acc.syncs), acc


# EDM's code, counted the same way (non-view aten ops, issue 9): per training step of 64 QM9
# molecules and per sampling step of 100 molecules, paper model.
EDM_TRAIN_OPS, EDM_SAMPLE_OPS = 1480, 550
# EDM's host syncs per sampling step, read off its code: two assert_mean_zero_with_mask (3 .item()
# each), the NaN check of the network output, and the .item() padding check of remove_mean_with_mask
# when re-centring z_s (more in its network and noise: this is a lower bound).
EDM_SAMPLE_SYNCS = 8


def test_accelerator_policy_stays_within_edms_launch_budget(qm9_datadir):
    with FakeAccelerator() as acc:
        (train_ops, _), (sample_ops, sample_syncs), acc = count_training_and_sampling_step(acc, "auto", qm9_datadir, nf=16)
        assert acc.host_to_device == 0  # nothing copied from the host per step (e.g. constant tables)
    assert train_ops <= 1.25 * EDM_TRAIN_OPS, train_ops
    assert sample_ops <= 1.25 * EDM_SAMPLE_OPS, sample_ops
    assert sample_syncs <= EDM_SAMPLE_SYNCS, sample_syncs


def test_the_policy_groups_on_the_cpu_only_unless_told():
    from egnn.device_policy import groups_by_size, normalise_group_by_size
    from training.args import parse_args

    cpu, accel = torch.device("cpu"), torch.device("meta")
    assert groups_by_size("auto", cpu) and not groups_by_size("auto", accel)
    assert groups_by_size("true", accel) and not groups_by_size(False, cpu)
    assert normalise_group_by_size(None) == "auto"  # runs from before the flag
    assert parse_args([]).group_by_size == "auto" and parse_args(["--group_by_size", "False"]).group_by_size == "false"
    with pytest.raises(SystemExit):
        parse_args(["--group_by_size", "sometimes"])
    defaults = parse_args([])
    assert defaults.tf32 is False and defaults.compile is False  # opt-in only: published numbers stay fp32
    assert parse_args(["--tf32"]).tf32 and parse_args(["--compile", "True"]).compile


def test_the_sampling_chain_plans_its_groups_once(monkeypatch):
    """Mask-derived work (the size-group plan) runs once per chain, not once per step."""
    from configs.datasets_config import get_dataset_info
    from egnn.models import EGNN_dynamics_QM9
    from qm9.models import get_model
    from test_models import gaga_qm9_args

    args = gaga_qm9_args()
    args.nf, args.n_layers, args.diffusion_steps, args.max_t = 16, 1, 20, 20
    model, _, _ = get_model(args, "cpu", get_dataset_info("qm9", False), None)
    calls = []
    original = EGNN_dynamics_QM9._plan_calls
    monkeypatch.setattr(EGNN_dynamics_QM9, "_plan_calls", lambda self, *a: calls.append(1) or original(self, *a))
    from qm9.sampling import masks_from_sizes

    node_mask, edge_mask = masks_from_sizes(torch.tensor([3, 9, 9, 14]), 29, "cpu")
    model.sample(4, 29, node_mask, edge_mask, None)
    assert len(calls) == 1  # 20 steps + the decode, one plan


def test_sin_embedding_table_is_a_buffer_outside_the_checkpoint():
    from egnn.models import EGNN_dynamics_QM9

    net = EGNN_dynamics_QM9(6, 0, 3, hidden_nf=16, n_layers=2, sin_embedding=True)
    assert not any("frequencies" in key for key in net.state_dict())
    with FakeAccelerator() as acc:
        net = net.to(acc.device)
        assert acc.on_device(net.egnn.sin_embedding.frequencies)
        x = torch.randn(2, 5, 3 + 5, device=acc.device)
        mask = torch.ones(2, 5, 1, device=acc.device)
        edges = (mask * mask.transpose(1, 2) * (1 - torch.eye(5, device=acc.device))).reshape(-1, 1)
        acc.reset()
        net._forward(torch.full((2, 1), 0.5, device=acc.device), x, mask, edges, None)
        assert acc.host_to_device == 0


# ------------------------------------------------------------------ torch.compile


def test_compiled_network_gives_the_eager_loss_and_gradients():
    """--compile on the padded path (backend aot_eager: traced, no C compiler needed)."""
    from configs.datasets_config import get_dataset_info
    from qm9.models import get_model
    from test_models import gaga_qm9_args

    args = gaga_qm9_args()
    args.nf, args.n_layers, args.group_by_size = 16, 1, "false"
    info = get_dataset_info("qm9", False)
    torch.manual_seed(0)
    eager, nodes_dist, _ = get_model(args, "cpu", info, None)
    args.compile, args.compile_backend = True, "aot_eager"
    compiled, _, _ = get_model(args, "cpu", info, None)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.dynamics.compile_backend == "aot_eager"
    from qm9.sampling import masks_from_sizes

    from equivariant_diffusion.utils import remove_mean_with_mask

    node_mask, edge_mask = masks_from_sizes(torch.tensor([5, 9, 7]), 9, "cpu")
    torch.manual_seed(1)
    x = remove_mean_with_mask(torch.randn(3, 9, 3) * node_mask, node_mask)
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 5, (3, 9)), 5).float() * node_mask
    h = {"categorical": remove_mean_with_mask(one_hot, node_mask), "integer": torch.zeros(0)}
    losses, grads = [], []
    for model in (eager, compiled):
        model.train()
        model.zero_grad()
        torch.manual_seed(2)  # the same t and noise draws
        loss = model(x, h, node_mask, edge_mask.view(3, 81)).mean()  # the training loss (l2)
        loss.backward()
        losses.append(loss.detach())
        grads.append([None if p.grad is None else p.grad.clone() for p in model.dynamics.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert sum(g is not None for g in grads[0]) > 5
    for g_compiled, g_eager in zip(grads[1], grads[0]):
        assert (g_compiled is None) == (g_eager is None)
        if g_eager is not None:
            torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-6)
