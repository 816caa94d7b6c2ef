"""Trainer and `nd decouple`: run directory, resume after a kill, NaN stop, bad options, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _helpers import tiny_parts, tiny_trainer
from typer.testing import CliRunner

from nd_plugin.cli._app import app
from nd_plugin.commands.decoupling import decouple
from nd_plugin.errors import ConfigError, InputShapeError, TrainingError
from nd_plugin.run import open_run
from nd_plugin.training.config import TrainConfig
from nd_plugin.training.optim import gate_parameters
from nd_plugin.training.trainer import Trainer

TINY = dict(model="cifar:resnet20", data="synthetic:96", batch_size=32, bn_recalibrate=2)


def test_decouple_writes_the_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = decouple(TrainConfig(**TINY, epochs=1, warmup_epochs=1, ratio=0.5), out, progress=False)
    assert {p.name for p in out.iterdir()} >= {"config.json", "checkpoint.pt", "metrics.jsonl", "paths.npz", "summary.json"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["phase"]) for m in lines] == [(1, "warmup"), (2, "decouple")]
    assert {"train_l_mi", "train_l_kl", "train_l_s", "val_top1", "val_density"} <= set(lines[1])
    assert lines[0]["val_density"] == 1.0 and lines[0]["train_l_s"] == 0.0  # warm-up: the plain model
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "cifar:resnet20" and cfg["train"]["ratio"] == 0.5
    assert cfg["warmup"].startswith("1 plain epochs")
    assert set(summary["filter_states"]) == {"silent", "dynamic", "energetic"}
    run = open_run(out)
    dm = run.build_model()
    stats = run.stats()
    assert stats.site_names == dm.site_names and stats.n == summary["n_val"]


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "args, match",
    [
        (["--ratio", "1.0"], "--ratio must be in [0, 1)"),
        (["--ratio", "-0.5"], "--ratio must be in [0, 1)"),
        (["--lambda-s", "-1"], "--lambda-s must be >= 0"),
        (["--device", "cuda"], "no CUDA GPU is available"),
        (["--resume"], "--resume: no checkpoint.pt to continue from in"),
        (["--hard-share", "1.5"], "--hard-share must be in [0, 1]"),
        (["--hard-share", "-0.1"], "--hard-share must be in [0, 1]"),
        (["--acm-init", "xavier"], "--acm-init must be one of open, kaiming"),
        (["--mi-init", "zeros"], "--mi-init must be one of kaiming, torch"),
        (["--mi-scope", "none"], "--mi-scope must be one of all, gates"),
        (["--kl-target", "input"], "--kl-target must be one of output, activation"),
        (["--sparsity-gates", "soft"], "--sparsity-gates must be one of eval, train"),
        (["--schedule", "linear"], "--schedule must be one of step, cosine"),
        (["--gate-weight-decay", "-1"], "--gate-weight-decay must be >= 0"),
        (["--density-schedule", "exponential"], "--density-schedule must be one of constant, linear, cubic"),
        (["--density-ramp", "1.5"], "--density-ramp must be in [0, 1]"),
        (["--density-ramp", "-0.1"], "--density-ramp must be in [0, 1]"),
        (["--sparsity-scope", "channel"], "--sparsity-scope must be one of layer, input, filter"),
        (["--sparsity-cap", "1.5"], "--sparsity-cap must be in [--ratio, 1]"),
        (["--sparsity-cap", "0.3", "--ratio", "0.5"], "--sparsity-cap must be in [--ratio, 1]"),
        (["--lambda-c", "-0.5"], "--lambda-c must be >= 0"),
        (["--lambda-c-until", "1.5"], "--lambda-c-until must be in [0, 1]"),
        (["--freeze-gates-after", "-0.1"], "--freeze-gates-after must be in [0, 1]"),
        (["--distill-weight", "-1"], "--distill-weight must be >= 0"),
        (["--distill-temperature", "0"], "--distill-temperature must be > 0"),
    ],
)
def test_decouple_bad_options_give_one_line(tmp_path: Path, args: list[str], match: str) -> None:
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "cifar:resnet20"}))
    result = _cli("decouple", "cifar:resnet20", "--data", "synthetic:32", "--out", str(tmp_path / "run"), "--quiet", *args)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"density_schedule": "exponential"}, "density_schedule must be one of"),
        ({"density_ramp": 2.0}, "density_ramp must be in [0, 1]"),
        ({"bn_recalibrate": -1}, "bn_recalibrate must be >= 0"),
        ({"sparsity_cap": 0.4, "ratio": 0.5}, "sparsity_cap must be in [ratio, 1]"),
        ({"sparsity_cap": -0.1, "ratio": 0.0}, "sparsity_cap must be in [ratio, 1]"),
        ({"lambda_c": -0.1}, "lambda_c must be >= 0"),
        ({"lambda_c_until": 1.2}, "lambda_c_until must be in [0, 1]"),
        ({"freeze_gates_after": -0.5}, "freeze_gates_after must be in [0, 1]"),
        ({"distill_weight": -0.1}, "distill_weight must be >= 0"),
        ({"distill_weight": float("nan")}, "distill_weight must be >= 0"),
        ({"distill_temperature": 0.0}, "distill_temperature must be > 0"),
        ({"distill_weight": float("inf")}, "distill_weight must be >= 0 and finite"),
        ({"distill_temperature": float("inf")}, "distill_temperature must be > 0 and finite"),
    ],
)
def test_bad_schedule_settings_are_a_config_error(settings: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig(**{**TINY, **settings}).resolved()


@pytest.mark.parametrize(
    "schedule, ramp, expected",
    [  # targets at progress 0, 1/4, 1/2, 3/4 of the phase, R = 0.5, by hand
        ("constant", 0.5, [0.5, 0.5, 0.5, 0.5]),
        ("linear", 0.5, [1.0, 0.75, 0.5, 0.5]),
        ("cubic", 0.5, [1.0, 0.5625, 0.5, 0.5]),  # 0.5 + 0.5 * (1 - 0.5)^3
        ("cubic", 1.0, [1.0, 0.5 + 0.5 * 0.75**3, 0.5625, 0.5 + 0.5 * 0.25**3]),
        ("linear", 0.0, [0.5, 0.5, 0.5, 0.5]),
    ],
)
def test_density_target_by_hand(schedule: str, ramp: float, expected: list[float]) -> None:
    from nd_plugin.training.config import density_target

    got = [density_target(t, 0.5, schedule, ramp) for t in (0.0, 0.25, 0.5, 0.75)]
    assert got == pytest.approx(expected)


def test_trainer_moves_the_sparsity_target_along_the_schedule() -> None:
    cfg = TrainConfig(**TINY, epochs=4, warmup_epochs=1, ratio=0.4, density_schedule="linear", density_ramp=0.5).resolved()
    trainer = tiny_trainer(cfg)
    # global epoch 1 is the first decoupling epoch; the ramp covers decoupling epochs [0, 2)
    assert trainer.set_density_target(1.0) == pytest.approx(1.0)
    assert trainer.loss_fn.ratio == pytest.approx(1.0) and trainer.loss_fn._ratio.item() == pytest.approx(1.0)
    assert trainer.set_density_target(2.0) == pytest.approx(0.7)  # 0.4 + 0.6 * (1 - 1/2)
    assert trainer.loss_fn._ratio.item() == pytest.approx(0.7)
    assert trainer.set_density_target(3.5) == pytest.approx(0.4)
    trainer.cfg.epochs = 1  # warm-up, then one decoupling epoch whose second half holds R
    trainer.fit()
    warm, last = (r.train for r in trainer.history)
    assert "target_density" not in warm and last["target_density"] == pytest.approx(0.4)


@pytest.mark.parametrize("until, expected", [(0.5, [2.0, 2.0, 0.0, 0.0]), (1.0, [2.0, 2.0, 2.0, 2.0]), (0.0, [0.0] * 4)])
def test_trainer_turns_class_routing_off_after_its_share(until: float, expected: list[float]) -> None:
    cfg = TrainConfig(**TINY, epochs=2, warmup_epochs=1, lambda_c=2.0, lambda_c_until=until).resolved()
    trainer = tiny_trainer(cfg)
    # global epochs 1, 1.5, 2, 2.5: decoupling progress 0, 1/4, 1/2, 3/4
    got = [trainer.set_class_routing(epoch) for epoch in (1.0, 1.5, 2.0, 2.5)]
    assert got == expected
    assert trainer.loss_fn.lambda_c == trainer.loss_fn._lambda_c.item() == expected[-1]  # the buffer a graph reads
    trainer.loss_fn.set_lambda_c(2.0)
    trainer.fit()  # the loop moves the weight per step: the last decoupling epoch runs at expected[-1]
    assert trainer.loss_fn._lambda_c.item() == expected[-1]
    assert all(r.train["l_c"] < 0 for r in trainer.history[1:])  # measured, weighted or not


@pytest.mark.parametrize("after", [0.5, 1.0])
def test_trainer_freezes_the_gates_after_their_share(after: float) -> None:
    cfg = TrainConfig(**TINY, epochs=2, warmup_epochs=0, freeze_gates_after=after, lambda_m=0.01, lambda_s=0.1).resolved()
    trainer = tiny_trainer(cfg)
    base = {g["name"]: g["base_lr"] for g in trainer.optimizer.param_groups}
    for epoch in (0.5, 1.5):  # decoupling progress 1/4, then 3/4
        factor = 0.5 * (1 + math.cos(math.pi * epoch / 2))
        assert trainer.set_lr(epoch) == pytest.approx(base["network"] * factor)
        lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
        frozen = after == 0.5 and epoch == 1.5
        assert lrs["gates"] == pytest.approx(0.0 if frozen else base["gates"] * factor)
    trainer.cfg.epochs, trainer.cfg.freeze_gates_after = 1, (0.0 if after == 0.5 else 1.0)  # one epoch, frozen throughout or never
    gates = gate_parameters(trainer.dm)
    network = [p for p in trainer.dm.parameters() if p.dim() == 4 and all(p is not g for g in gates)]  # conv weights
    before = [p.detach().clone() for p in (*gates, *network)]
    trainer.fit()
    moved = [not torch.equal(a, b) for a, b in zip(before, (*gates, *network))]
    assert any(moved[: len(gates)]) == (after == 1.0) and any(moved[len(gates) :])


def test_distillation_refuses_a_teacher_that_shares_the_students_parameters() -> None:
    cfg = TrainConfig(**TINY, epochs=1, warmup_epochs=0, distill_weight=1.0)
    dm, data = tiny_parts(cfg)
    with pytest.raises(ConfigError, match="shares parameters") as info:
        Trainer(dm, data, cfg, progress=False, teacher=dm.model)
    assert info.value.params == ("teacher",)
    assert all(p.requires_grad for p in dm.parameters())  # nothing was frozen


def test_decouple_refuses_distillation_without_a_decoupling_epoch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _cli("decouple", "cifar:resnet20", "--data", "synthetic:32", "--epochs", "0", "--distill-weight", "1",
                  "--out", str(out), "--quiet")
    assert result.exit_code == 2 and "--distill-weight" in result.output and "--epochs" in result.output
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize(
    "student, teacher, temperature, error, match",
    [
        ((2, 3), (2, 3), 0.0, ConfigError, "temperature must be > 0"),
        ((2, 3), (2, 4), 1.0, InputShapeError, "differ in shape"),
    ],
)
def test_distillation_loss_refuses_bad_arguments(student, teacher, temperature, error, match) -> None:
    from nd_plugin.losses import distillation_loss

    with pytest.raises(error, match=match):
        distillation_loss(torch.zeros(student), torch.zeros(teacher), temperature)


@pytest.mark.parametrize(
    "settings, teacher, match",
    [
        ({"distill_weight": 0.0}, True, "a teacher was given but distill_weight is 0"),
        ({"distill_weight": 1.0, "epochs": 0, "warmup_epochs": 1}, False, "this run has no decoupling epoch"),
    ],
)
def test_distillation_without_a_teacher_to_use_is_refused(settings: dict, teacher: bool, match: str) -> None:
    cfg = TrainConfig(**{**TINY, "epochs": 1, "warmup_epochs": 0, **settings})
    torch.manual_seed(0)
    dm, data = tiny_parts(cfg)
    with pytest.raises(ConfigError, match=match) as info:
        Trainer(dm, data, cfg, progress=False, teacher=dm.unwrapped() if teacher else None)
    assert "distill_weight" in info.value.params


def test_distillation_adds_its_weighted_term_to_the_loss() -> None:
    from nd_plugin.losses import distillation_loss

    cfg = TrainConfig(**TINY, epochs=1, warmup_epochs=1, distill_weight=0.5, distill_temperature=2.0)
    torch.manual_seed(0)
    dm, data = tiny_parts(cfg)
    torch.manual_seed(1)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, data.num_classes))
    trainer = Trainer(dm, data, cfg, progress=False, teacher=teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    dm.train()
    for warmup in (True, False):  # a given teacher teaches in both phases
        torch.manual_seed(2)
        terms, logits, _ = trainer._forward_loss(x, y, warmup=warmup)
        expected = distillation_loss(logits, teacher(x), 2.0).detach()
        assert float(terms.d.detach()) == pytest.approx(float(expected)) and float(expected) > 0
        saved, trainer.teacher = trainer.teacher, None
        torch.manual_seed(2)
        plain, _, _ = trainer._forward_loss(x, y, warmup=warmup)
        trainer.teacher = saved
        assert plain.d is None
        assert float(terms.total.detach()) == pytest.approx(float(plain.total.detach()) + 0.5 * float(expected), rel=1e-5)
    trainer.fit()
    assert all(r.train["l_d"] > 0 for r in trainer.history)


def test_distillation_teacher_is_the_network_as_decoupling_begins_and_survives_resume(tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY, epochs=2, warmup_epochs=1, distill_weight=1.0).resolved()
    torch.manual_seed(0)
    dm, data = tiny_parts(cfg)
    seen = {}

    def keep(trainer: Trainer, epoch: int) -> None:
        if epoch == 0:  # after the warm-up: what the teacher must be
            seen["start"] = {k: v.clone() for k, v in trainer.dm.unwrapped().state_dict().items()}
        seen[epoch] = trainer.state_dict(epoch)

    trainer = Trainer(dm, data, cfg, progress=False, on_epoch_end=keep)
    trainer.fit()
    assert trainer.history[0].train.get("l_d") == 0.0 and trainer.history[1].train["l_d"] > 0  # none in the warm-up
    teacher = trainer.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in seen["start"].items())
    assert "teacher" not in seen[0] and "teacher" in seen[1]
    weights = trainer.dm.unwrapped().state_dict()
    assert any(not torch.equal(teacher[k], weights[k]) for k in teacher)  # the student moved on
    again = Trainer(*tiny_parts(cfg), cfg, progress=False)
    again.load_state_dict(seen[1])  # resume after the first decoupling epoch
    assert all(torch.equal(again.teacher.state_dict()[k], v) for k, v in teacher.items())


def test_out_holding_another_models_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "cifar:vgg16_bn"}))
    result = _cli("decouple", "cifar:resnet20", "--data", "synthetic:32", "--out", str(run), "--quiet")
    assert result.exit_code == 2 and "holds a run of another model ('cifar:vgg16_bn')" in result.output


def test_unknown_model_and_data_give_one_line(tmp_path: Path) -> None:
    result = _cli("decouple", "no_such_net", "--out", str(tmp_path / "a"), "--quiet")
    assert result.exit_code == 2 and "no_such_net" in result.output and "Traceback" not in result.output
    result = _cli("decouple", "cifar:resnet20", "--data", f"imagefolder:{tmp_path / 'missing'}", "--out", str(tmp_path / "b"), "--quiet")
    assert result.exit_code == 2 and "missing" in result.output


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY, epochs=2, warmup_epochs=0).resolved()
    trainer = tiny_trainer(cfg, tmp_path)
    trainer.cfg.epochs = 1
    trainer.fit()
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    trainer.cfg.epochs = 2
    trainer.start_epoch = 1  # as --resume would
    for group in trainer.optimizer.param_groups:  # the schedule sets lr from base_lr every step
        group["lr"] = group["base_lr"] = 1e38
    with pytest.raises(TrainingError, match="non-finite loss at epoch 2"):
        trainer.fit()
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == good["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_kill_mid_epoch_and_resume_loses_and_repeats_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nd_plugin.cli._app", "decouple", "cifar:resnet20", "--data", "synthetic:320",
           "--epochs", "3", "--warmup-epochs", "0", "--batch-size", "16", "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)  # mid-epoch 2: no chance to clean up
    proc.wait()
    assert metrics.read_text().count("\n") == 1
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    epochs = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_RUN = dict(TINY, data="synthetic:64", epochs=1, warmup_epochs=1, ratio=0.5, device="cpu")  # nd decouple's shape


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fit = Trainer.fit

    def fit_and_dump(self: Trainer):  # every rank's parameters after the last epoch, the L_mi classifiers too
        stats = fit(self)
        flat = torch.cat([p.detach().flatten() for p in [*self.dm.parameters(), *self.loss_fn.parameters()]])
        torch.save(flat, Path(tmp) / f"rank{rank}.pt")
        return stats

    Trainer.fit = fit_and_dump  # type: ignore[method-assign]
    torch.manual_seed(rank)  # different gate noise per rank: gradients must still be averaged
    decouple(TrainConfig(**DDP_RUN), Path(tmp) / "ddp", progress=False)  # warm-up (gates open) + decoupling


def _shape(run: Path) -> dict:
    """What two runs of the same options must share: files, keys, tensor shapes, epochs, val order."""
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    with np.load(run / "paths.npz") as z:
        arrays = {k: z[k].shape for k in z.files}
        labels = z["labels"].tolist()
    return {
        "files": sorted(p.name for p in run.iterdir()),
        "config": sorted(json.loads((run / "config.json").read_text())),
        "summary": sorted(json.loads((run / "summary.json").read_text())),
        "metrics": [(m["epoch"], m["phase"], sorted(m)) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())],
        "checkpoint": sorted(ckpt),
        "weights": {k: tuple(v.shape) for k, v in ckpt["model"].items()},
        "paths": arrays,
        "labels": labels,
    }


def test_ddp_two_cpu_processes_warmup_and_decoupling(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.allclose(a, b, atol=1e-6)  # network, gates and L_mi classifiers agree across ranks
    decouple(TrainConfig(**DDP_RUN), tmp_path / "one", progress=False)
    assert _shape(tmp_path / "ddp") == _shape(tmp_path / "one")
    phases = [json.loads(x)["phase"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["warmup", "decouple"]
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2


def test_checkpoint_of_another_architecture_and_empty_imagefolder(tmp_path: Path) -> None:
    from nd_plugin.adapters import create_model

    ckpt = tmp_path / "vgg.pt"
    torch.save({"state_dict": create_model("cifar:vgg16_bn").state_dict()}, ckpt)
    result = _cli("decouple", "cifar:resnet20", "--data", "synthetic:32", "--weights", str(ckpt), "--out", str(tmp_path / "a"), "--quiet")
    assert result.exit_code == 2 and "another architecture" in result.output and "Traceback" not in result.output
    (tmp_path / "empty").mkdir()
    result = _cli("decouple", "cifar:resnet20", "--data", f"imagefolder:{tmp_path / 'empty'}", "--out", str(tmp_path / "b"), "--quiet")
    assert result.exit_code == 2 and "empty" in result.output.lower()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_cli_training_switches_reach_the_run_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _cli("decouple", "cifar:resnet20", "--data", "synthetic:32", "--epochs", "0", "--warmup-epochs", "0",
                  "--no-amp", "--no-cuda-graphs", "--compile", "--out", str(out), "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    train = json.loads((out / "config.json").read_text())["train"]
    assert (train["amp"], train["cuda_graphs"], train["compile"]) == (False, False, True)


def test_models_command_lists_and_filters() -> None:
    result = _cli("models", "resnet2*")
    assert result.exit_code == 0
    assert "cifar:resnet20" in result.output.split()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_graphed_step_updates_parameters_like_the_eager_step(compiled: bool) -> None:
    import copy

    import torch.nn.functional as F

    from nd_plugin import wrap
    from nd_plugin.adapters import create_model
    from nd_plugin.losses import LossTerms
    from nd_plugin.training.steps import _GraphedStep

    torch.manual_seed(0)
    dm = wrap(create_model("cifar:resnet20", num_classes=10), torch.zeros(1, 3, 32, 32)).cuda().train()
    twins = [dm, copy.deepcopy(dm)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in twins]
    batches = [(torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")) for _ in range(6)]

    def compute(model):
        def run(x, y):
            with model.gates_open():  # deterministic: no gate noise, so both twins see the same numbers
                ce = F.cross_entropy(model(x), y)
            return LossTerms(ce, ce, ce * 0, ce * 0, ce * 0, ce * 0), None, None

        return run

    step = compute(twins[1])
    graphed = _GraphedStep(torch.compile(step) if compiled else step, opts[1], warmup=2)
    for x, y in batches:
        terms = compute(twins[0])(x, y)[0]
        opts[0].zero_grad(set_to_none=True)
        terms.total.backward()
        opts[0].step()
        graphed(x, y)
        opts[1].step()
    assert graphed.graph is not None  # the last batches were replayed
    for a, b in zip(twins[0].parameters(), twins[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _tiny_trainers(compile_modes: tuple[bool, ...]) -> list[Trainer]:
    """Trainers on twins of a two-conv network whose gates start saturated open (``gate_bias=10``):
    soft, hard and noisy gates are then all exactly 1, so random draws change no number."""
    import copy

    from torch import nn

    from nd_plugin import wrap
    from nd_plugin.data import load_data

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    dm = wrap(net, torch.zeros(1, 3, 32, 32), init_bias=10.0)
    data = load_data("synthetic:64")
    base = dict(TINY, epochs=1, warmup_epochs=0, device="cpu", lambda_m=0.1, lambda_k=1.0, lambda_s=0.1)
    trainers = [
        Trainer(copy.deepcopy(dm), data, TrainConfig(**base, compile=c).resolved(), None, progress=False)
        for c in compile_modes
    ]
    for t in trainers[1:]:  # the same L_mi classifiers
        t.loss_fn.load_state_dict(trainers[0].loss_fn.state_dict())
    return trainers


def test_compiled_step_computes_what_the_eager_step_does() -> None:
    eager, compiled = _tiny_trainers((False, True))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses, grads = [], []
    for trainer in (eager, compiled):
        trainer.dm.train()
        terms = trainer._compute(x, y, warmup=False)[0]
        trainer.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        losses.append(torch.stack([terms.total, terms.ce, terms.mi, terms.kl, terms.s]).detach())
        params = [*trainer.dm.parameters(), *trainer.loss_fn.parameters()]
        grads.append([p.grad for p in params if p.grad is not None])
    assert float(losses[0][4]) > 0  # L_s is non-zero: all gates on, target 0.6
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert len(grads[0]) == len(grads[1]) > 5
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    before = [p.detach().clone() for p in compiled.dm.parameters()]
    result = compiled.train_epoch(0)
    assert math.isfinite(result["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, compiled.dm.parameters()))


def test_failed_compilation_says_to_rerun_without_compile() -> None:
    from torch._inductor import config as inductor_config

    (trainer,) = _tiny_trainers((True,))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch._dynamo.reset()  # nothing cached (in memory, nor on disk below): this call must compile
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}), pytest.raises(TrainingError, match="rerun without compile"):
        trainer._compute(x, y, warmup=False)


@pytest.mark.parametrize(
    "kw, match",
    [({"hard_share": 2.0}, "^hard_share must be"), ({"acm_init": "ones"}, "^acm_init must be"), ({"mi_scope": "q"}, "^mi_scope must be")],
)
def test_bad_training_settings_are_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(model="cifar:resnet20", data="synthetic", **kw).resolved()


@pytest.mark.parametrize(
    "schedule, epochs, expected",
    [("step", 2, [1.0, 1.0, 0.1, 0.01]), ("step", 4, [1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]), ("cosine", 1, [1.0, 0.5])],
)
def test_learning_rate_changes_per_step(schedule: str, epochs: int, expected: list[float]) -> None:
    from nd_plugin.training.config import lr_factor

    cfg = TrainConfig(warmup_epochs=1, epochs=epochs, schedule=schedule)
    # half-epoch points of the decoupling phase (the warm-up phase, epoch 0, has its own schedule)
    got = [lr_factor(1 + i / 2, cfg) for i in range(2 * epochs)]
    assert got == pytest.approx(expected)
    assert lr_factor(0.5, cfg) == pytest.approx(0.1 if schedule == "step" else 0.5)  # mid-warm-up


def test_decouple_prints_the_dynamic_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import nd_plugin.cli._app as cli_app

    console = Console(record=True, width=120)
    monkeypatch.setattr(cli_app, "Console", lambda: console)
    summary = {"top1": 0.9, "density": 0.5, "filter_states": {"silent": 0.2, "dynamic": 0.3, "energetic": 0.5},
               "dynamic_value": {"value": 0.0125}}
    cli_app.print_summary(summary, tmp_path)
    text = console.export_text()
    assert "dynamic value (vs static twin)" in text and "+1.25 points" in text
