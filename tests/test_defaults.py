"""One source of defaults: TrainConfig's fields. The CLI, the benchmarks, wrap(), param_groups() and
recalibrate_bn() take theirs from it, so a loop built from the API trains with the Trainer's recipe."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
from pathlib import Path

import torch
import typer

import nd_plugin
from nd_plugin.losses import DecouplingLoss
from nd_plugin.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _decouple_params() -> dict[str, object]:
    """``{python name: default}`` of every option and argument of ``nd decouple``, as click sees them."""
    from nd_plugin.cli._app import app

    command = typer.main.get_command(app).commands["decouple"]
    return {p.name: p.default for p in command.params}


def test_every_nd_decouple_default_is_trainconfigs() -> None:
    params = _decouple_params()
    shared = sorted(set(params) & set(FIELDS))
    assert len(shared) >= 30, shared  # nearly every TrainConfig field is an option
    disagree = {name: (params[name], FIELDS[name]) for name in shared if params[name] != FIELDS[name]}
    assert disagree == {}, "nd decouple restates a default that TrainConfig owns"


def test_nd_decouple_reads_each_default_from_its_field() -> None:
    """Not only equal: every option that is a TrainConfig field names the field (no number restated)."""
    tree = ast.parse((ROOT / "cli" / "_app.py").read_text(encoding="utf-8"))
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "decouple_command")
    args = func.args.args[len(func.args.args) - len(func.args.defaults) :]
    restated = [
        a.arg
        for a, default in zip(args, func.args.defaults)
        if a.arg in FIELDS and not (isinstance(default, ast.Attribute) and default.attr == a.arg)
    ]
    assert restated == []


def test_the_benchmark_suite_defaults_are_trainconfigs() -> None:
    from _helpers import load_benchmark

    load_benchmark("table_c")  # loads the shared _suite module as the scripts import it
    import _suite as suite

    parser = argparse.ArgumentParser()
    suite.add_common_args(parser)
    args = parser.parse_args([])
    shared = {
        "epochs",
        "warmup_epochs",
        "ratio",
        "lambda_m",
        "lambda_k",
        "lambda_s",
        "sites",
        "device",
        "batch_size",
        "seed",
        "workers",
    }
    assert {k: getattr(args, k) for k in shared} == {k: FIELDS[k] for k in shared}
    assert args.no_cuda_graphs is not FIELDS["cuda_graphs"]  # the flag turns the default off
    # left out, --epochs becomes what TrainConfig gives the data
    assert suite.resolve_args(args).epochs == TrainConfig(data=args.data).resolved().epochs
    digits = suite.resolve_args(parser.parse_args(["--data", "digits"])).epochs
    assert digits == TrainConfig(data="digits").resolved().epochs


def test_wrap_defaults_to_the_trainers_recipe() -> None:
    defaults = {k: p.default for k, p in inspect.signature(nd_plugin.wrap).parameters.items()}
    recipe = {
        "sites": "sites",
        "reduction": "reduction",
        "noise_std": "noise_std",
        "init_bias": "gate_bias",
        "hard_share": "hard_share",
        "acm_init": "acm_init",
    }
    assert {k: defaults[k] for k in recipe} == {k: FIELDS[v] for k, v in recipe.items()}
    assert FIELDS["acm_init"] == "kaiming"  # the measured recipe, not the open init


def test_a_wrapped_model_starts_with_the_trainers_acm_init() -> None:
    from nd_plugin.gates import ACM

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    )
    dm = nd_plugin.wrap(net, torch.zeros(1, 3, 12, 12))
    acms = [m for m in dm.modules() if isinstance(m, ACM)]
    assert acms and {a.init for a in acms} == {TrainConfig.acm_init}


def test_param_groups_default_to_the_trainers_groups() -> None:
    """param_groups() without rates gives the groups the Trainer builds from a resolved TrainConfig."""
    resolved = TrainConfig(data="synthetic:64", model="cifar:resnet20").resolved()
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    dm = nd_plugin.wrap(net, torch.zeros(1, 3, 12, 12))
    loss_fn = DecouplingLoss(channels=[s.channels for s in dm.gate_sites], num_classes=4)
    groups = nd_plugin.param_groups(dm, loss_fn, lr=resolved.lr)
    got = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert got == {"network": (resolved.lr, resolved.weight_decay), "gates": (resolved.acm_lr, resolved.gate_weight_decay)}
    defaults = {k: p.default for k, p in inspect.signature(nd_plugin.param_groups).parameters.items()}
    assert (defaults["acm_lr"], defaults["weight_decay"], defaults["gate_weight_decay"]) == (
        resolved.acm_lr,
        resolved.weight_decay,
        resolved.gate_weight_decay,
    )


def test_recalibrate_bn_and_the_loss_default_to_the_trainers_settings() -> None:
    assert inspect.signature(nd_plugin.recalibrate_bn).parameters["batches"].default == FIELDS["bn_recalibrate"]
    # DecouplingLoss sits below TrainConfig (which imports its choices), so it cannot read the fields: checked here
    loss = {k: p.default for k, p in inspect.signature(DecouplingLoss).parameters.items()}
    shared = ("mi_init", "mi_scope", "sparsity_scope", "sparsity_cap", "lambda_c")
    assert {k: loss[k] for k in shared} == {k: FIELDS[k] for k in shared}
