"""Tests of issue 24: any torchattacks attack by name with its parameters, and the protocol of small runs.

Tiny inputs only: a 3-class linear-ish model on 8×8 images, numpy arrays for the splits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nd_plugin.detect import (
    ATTACKS,
    AttackSpec,
    Splits,
    attack,
    kfold_splits,
    list_attacks,
    parse_attack_args,
    plan_splits,
    resolve_attack,
    to_normalised,
    to_pixels,
)
from nd_plugin.detect.metrics import LEE_PROTOCOL, MIN_FIT_PER_CLASS, evaluate_supervised, evaluate_unsupervised
from nd_plugin.errors import AttackArgumentError, ConfigError, DetectionError, NDError, UnknownAttackError

torchattacks = pytest.importorskip("torchattacks")

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return to_normalised(torch.rand(4, 3, 8, 8, generator=g), MEAN, STD), torch.tensor([0, 1, 2, 0])


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("name, cls", [
    ("fgsm", "FGSM"), ("FGSM", "FGSM"), ("Pgd", "PGD"), ("MI-FGSM", "MIFGSM"), ("deep_fool", "DeepFool"),
    ("apgd", "APGD"), ("Square", "Square"), ("TPGD", "TPGD"), ("pgdl2", "PGDL2"), ("vmifgsm", "VMIFGSM"),
])  # fmt: skip
def test_any_torchattacks_class_by_name_case_insensitive(name, cls):
    spec = resolve_attack(name, 0.05)
    assert spec.cls == cls and spec.name == cls.lower() and isinstance(spec, AttackSpec)
    assert spec.build(nn.Linear(2, 2)).__class__ is getattr(torchattacks, cls)  # torchattacks.<Class>(model, **kwargs)


def test_every_listed_attack_resolves_and_the_short_names_keep_their_defaults():
    assert len(list_attacks()) > 30 and "LGV" not in list_attacks()  # LGV needs a training loader
    for name in list_attacks():
        spec = resolve_attack(name, 0.05)
        assert set(spec.kwargs) <= set(spec.parameters), name
    eps = 8 / 255
    assert resolve_attack("fgsm", eps).kwargs == {"eps": eps}
    assert resolve_attack("pgd", eps).kwargs == {"eps": eps, "alpha": eps / 4, "steps": 10, "random_start": True}
    assert resolve_attack("bim", eps, steps=3, alpha=0.01).kwargs == {"eps": eps, "alpha": 0.01, "steps": 3}
    assert resolve_attack("mifgsm", eps).kwargs == {"eps": eps, "alpha": eps / 4, "steps": 10}
    assert resolve_attack("cw", eps, steps=2).kwargs == {"c": 1.0, "kappa": 0.0, "steps": 10, "lr": 0.01}
    assert resolve_attack("deepfool", eps).kwargs == {"steps": 50, "overshoot": 0.02}
    assert set(ATTACKS) == {"fgsm", "pgd", "bim", "mifgsm", "cw", "deepfool"}
    # another class starts from eps (and alpha = eps / 4, steps) where it takes them, else from its own defaults
    assert resolve_attack("APGD", 0.1, steps=4).kwargs == {"eps": 0.1, "steps": 4}
    assert resolve_attack("TPGD", 0.1).kwargs == {"eps": 0.1, "alpha": 0.025, "steps": 10}
    assert resolve_attack("JSMA", 0.1).kwargs == {}


def test_attack_kwargs_win_and_are_typed():
    spec = resolve_attack("pgd", 0.03, attack_kwargs={"steps": 3, "random_start": False, "alpha": 1})
    assert spec.kwargs == {"eps": 0.03, "alpha": 1.0, "steps": 3, "random_start": False}
    assert spec.user_kwargs == {"steps": 3, "random_start": False, "alpha": 1.0} and isinstance(spec.kwargs["alpha"], float)
    assert resolve_attack("cw", attack_kwargs={"c": 0.5}).kwargs["c"] == 0.5  # CW's default is int 1, documented float
    assert resolve_attack("pgdl2", attack_kwargs={"eps": 2.0}).kwargs["eps"] == 2.0  # an L2 budget may exceed 1
    assert resolve_attack("autoattack", attack_kwargs={"seed": None, "version": "rand"}).kwargs["version"] == "rand"
    assert resolve_attack("pixle", attack_kwargs={"x_dimensions": [1, 3]}).kwargs["x_dimensions"] == (1, 3)


# ------------------------------------------------------------------ bad input, typed errors naming the parameter


@pytest.mark.parametrize("name, kwargs, error, parameter, match", [
    ("jsma2", None, UnknownAttackError, None, r"unknown attack 'jsma2'; known attacks: fgsm, pgd.*APGD.*Square"),
    ("MultiAttack", None, UnknownAttackError, None, "known attacks"),
    ("lgv", None, UnknownAttackError, None, "known attacks"),
    ("pgd", {"stepz": 3}, AttackArgumentError, "stepz", r"PGD takes no parameter 'stepz'; its parameters: eps, alpha, steps, random_start"),
    ("fgsm", {"steps": 3}, AttackArgumentError, "steps", r"FGSM takes no parameter 'steps'; its parameters: eps\."),
    ("APGD", {"model": None}, AttackArgumentError, "model", "model under attack"),
    ("pgd", {"steps": "abc"}, AttackArgumentError, "steps", r"'steps' of attack PGD takes an int, got 'abc' \(str\)"),
    ("pgd", {"steps": 2.5}, AttackArgumentError, "steps", "takes an int"),
    ("pgd", {"steps": True}, AttackArgumentError, "steps", "takes an int"),
    ("pgd", {"steps": None}, AttackArgumentError, "steps", "takes an int"),
    ("pgd", {"random_start": 1}, AttackArgumentError, "random_start", "takes a bool"),
    ("pgd", {"eps": "big"}, AttackArgumentError, "eps", "takes a float"),
    ("pgd", {"eps": float("nan")}, AttackArgumentError, "eps", "takes a float"),
    ("pgd", {"eps": -0.1}, AttackArgumentError, "eps", "must be positive"),
    ("apgd", {"norm": 2}, AttackArgumentError, "norm", "takes a string"),
    ("pixle", {"x_dimensions": "wide"}, AttackArgumentError, "x_dimensions", "takes a tuple"),
    ("fgsm", None, ConfigError, None, r"eps must be in \(0, 1\]"),  # eps=2.0 below
])  # fmt: skip
def test_bad_attack_inputs_are_typed_errors(name, kwargs, error, parameter, match):
    eps = 2.0 if error is ConfigError else 0.03
    with pytest.raises(error, match=match) as info:
        resolve_attack(name, eps, attack_kwargs=kwargs)
    assert isinstance(info.value, NDError) and isinstance(info.value, ValueError)
    if parameter is not None:
        assert info.value.parameter == parameter and isinstance(info.value, ConfigError)


@pytest.mark.parametrize("pairs, expected", [
    (["steps=20"], {"steps": 20}),
    (["eps=0.5", "alpha=1e-3"], {"eps": 0.5, "alpha": 0.001}),
    (["random_start=false", "verbose=True", "abort_early=OFF"], {"random_start": False, "verbose": True, "abort_early": False}),
    (["norm=L2", "loss='dlr'", "seed=None"], {"norm": "L2", "loss": "dlr", "seed": None}),
    (["x_dimensions=(2, 10)", "kernel_name=gaussian"], {"x_dimensions": (2, 10), "kernel_name": "gaussian"}),
    ([" steps = 3 "], {"steps": 3}),
    ([], {}),
    (None, {}),
])  # fmt: skip
def test_parse_attack_args(pairs, expected):
    assert parse_attack_args(pairs) == expected


@pytest.mark.parametrize("pairs, parameter, match", [
    (["steps"], "steps", "NAME=VALUE"),
    (["=3"], None, "NAME=VALUE"),
    (["2x=3"], "2x", "NAME=VALUE"),
    (["steps=1", "steps=2"], "steps", "given twice"),
])  # fmt: skip
def test_parse_attack_args_bad(pairs, parameter, match):
    with pytest.raises(AttackArgumentError, match=match) as info:
        parse_attack_args(pairs)
    assert info.value.parameter == parameter


@pytest.mark.parametrize("args, match", [
    (["--attack", "nope"], "unknown attack 'nope'; known attacks: fgsm"),
    (["--attack", "pgd", "--attack-arg", "stepz=3"], "PGD takes no parameter 'stepz'; its parameters: eps, alpha"),
    (["--attack", "pgd", "--attack-arg", "steps=abc"], "'steps' of attack PGD takes an int, got 'abc'"),
    (["--attack", "pgd", "--attack-arg", "random_start=2"], "'random_start' of attack PGD takes a bool"),
    (["--attack-arg", "steps"], "NAME=VALUE"),
    (["--attack", "apgd", "--attack-arg", "loss=ce", "--attack-arg", "loss=dlr"], "given twice"),
])  # fmt: skip
def test_cli_attack_errors_are_one_line_exit_2(tmp_path, args, match):
    from typer.testing import CliRunner

    from nd_plugin.cli._app import app

    r = CliRunner().invoke(app, ["detect", str(tmp_path), *args])
    text = r.output.strip()
    assert r.exit_code == 2 and match in text and "Traceback" not in text and len(text.splitlines()) == 1, text


# ------------------------------------------------------------------ attacks that run


@pytest.mark.parametrize("name, kwargs", [
    ("APGD", {"steps": 2}),
    ("TPGD", {"steps": 2}),
    ("pgd", {"steps": 2, "random_start": False}),
    ("Square", {"n_queries": 5}),
    ("FAB", {"steps": 2}),  # takes n_classes: filled in from the model (3 here, torchattacks' default is 10)
])  # fmt: skip
def test_generic_attacks_run_within_budget(net, batch, name, kwargs):
    x, y = batch
    state = torch.random.get_rng_state()
    adv = attack(net, x, y, name, 0.05, mean=MEAN, std=STD, attack_kwargs=kwargs)
    assert torch.equal(torch.random.get_rng_state(), state) and adv.shape == x.shape and not net.training
    px, pa = to_pixels(x, MEAN, STD), to_pixels(adv, MEAN, STD)
    assert pa.min() >= -1e-5 and pa.max() <= 1 + 1e-5
    if name != "FAB":  # FAB is a minimum-norm attack: its eps is a bound it may stop short of
        assert (pa - px).abs().max() <= 0.05 + 1e-5
    again = attack(net, x, y, resolve_attack(name, 0.05, attack_kwargs=kwargs), mean=MEAN, std=STD)
    assert torch.allclose(adv, again, atol=1e-6)  # seeded, and a spec is the same attack


def test_attack_kwargs_change_the_attack(net, batch):
    x, y = batch
    one = attack(net, x, y, "bim", 0.05, mean=MEAN, std=STD, attack_kwargs={"steps": 1, "alpha": 0.01})
    assert (to_pixels(one, MEAN, STD) - to_pixels(x, MEAN, STD)).abs().max() <= 0.01 + 1e-5  # one step of 0.01


# ------------------------------------------------------------------ protocol: Lee 5/5/90 or stratified k-fold


@pytest.mark.parametrize("n_clean, every, folds", [(343, 7, 5), (100, 4, 5), (60, 2, 3)])
def test_kfold_splits_partition_stratify_and_keep_pairs(n_clean, every, folds):
    attacked = np.arange(n_clean) % every == 0
    parts = kfold_splits(attacked, folds, repeats=2)
    assert len(parts) == 2 * folds
    tests = np.concatenate([t for _f, _v, t in parts[:folds]])
    assert np.array_equal(np.sort(tests), np.arange(n_clean))  # each clean input tested once per repetition
    share = attacked.mean()
    for fit, val, test in parts:
        assert not (set(fit) & set(val) or set(fit) & set(test) or set(val) & set(test))
        assert len(fit) + len(val) + len(test) == n_clean
        assert abs(attacked[test].mean() - share) <= 1.0 / len(test) + 1e-9  # stratified
        assert attacked[fit].sum() >= 1 and attacked[val].sum() >= 1
    assert not np.array_equal(parts[0][2], parts[folds][2])  # the repetitions differ


def test_plan_splits_chooses_lee_when_it_holds_enough():
    big = plan_splits(2000, np.arange(0, 2000, 2), seeds=3)
    assert big.protocol == LEE_PROTOCOL and len(big) == 3 and big.repeats == 3 and isinstance(big, Splits)
    assert big.to_dict()["name"] == "lee-5/5/90" and "5% fit" in big.to_dict()["description"]


def test_plan_splits_cross_validates_a_small_set():
    # the quick start's numbers: 343 clean inputs, 50 successful FGSM attacks: Lee's 5% part holds ~2
    adv_index = np.random.default_rng(0).choice(343, 50, replace=False)
    plan = plan_splits(343, adv_index, seeds=5)
    assert plan.protocol == "stratified-kfold-3" and len(plan) == 3 and plan.repeats == 1
    assert "Lee's 5% fit part would hold" in plan.reason and "cross-validated" in plan.reason
    assert plan_splits(343, adv_index, seeds=12).repeats == 4  # 12 // 3 repetitions of the 3 folds
    info = plan.to_dict()
    assert info["name"] == "stratified-kfold-3" and info["splits"] == 3 and "StratifiedKFold" in info["description"]
    attacked = np.isin(np.arange(343), adv_index)
    assert all(attacked[f].sum() >= MIN_FIT_PER_CLASS for f, _v, _t in plan)
    # the evaluators take the plan as they take Lee's splits
    rng = np.random.default_rng(1)
    clean, adv = rng.normal(size=(343, 2)), rng.normal(size=(50, 2)) + [3.0, 0.0]
    r = evaluate_supervised({0: (clean, adv)}, adv_index, plan)
    assert r["seeds"] == 3 and r["auroc"] > 0.95
    assert evaluate_unsupervised(clean[:, 0], adv[:, 0], adv_index, plan)["auroc"] > 0.95
    # only unsupervised detectors: Lee's split needs no fit part
    assert plan_splits(343, adv_index, supervised=False).protocol == LEE_PROTOCOL


@pytest.mark.parametrize("correct, n_adv, supervised, expected", [
    (300, 40, True, "stratified-kfold-3"),
    (300, 18, True, "stratified-kfold-5"),  # 3 folds would leave fewer than 10 attacked inputs to fit on
    (300, 15, True, "stratified-kfold-10"),
    (300, 3, False, None),  # Lee's or 3 folds: either way every test part holds an attack
    (40, 2, False, None),
])  # fmt: skip
def test_plan_splits_fewer_attacks(correct, n_adv, supervised, expected):
    index = np.linspace(0, correct - 1, n_adv).astype(int)
    plan = plan_splits(correct, index, seeds=5, supervised=supervised)
    attacked = np.isin(np.arange(correct), index)
    assert all(attacked[t].any() for _f, _v, t in plan)
    if expected is not None:
        assert plan.protocol == expected and len(plan) == int(expected.rsplit("-", 1)[1])
        assert all(attacked[f].sum() >= MIN_FIT_PER_CLASS for f, _v, _t in plan)


@pytest.mark.parametrize("n_adv, supervised, match", [
    (12, True, r"only 12 of the 300 correctly classified inputs were attacked successfully; .*at least 15 successful attacks: raise eps"),
    (1, False, r"only 1 of the 300 .*at least 2 successful attacks: raise eps"),
    (0, False, r"only 0 of the 300 .*at least 2 successful attacks"),
])  # fmt: skip
def test_plan_splits_too_small_for_any_estimate(n_adv, supervised, match):
    with pytest.raises(DetectionError, match=match) as info:
        plan_splits(300, np.arange(n_adv), supervised=supervised, hint="raise eps", hint_params=("eps",))
    assert len(str(info.value).splitlines()) == 1 and info.value.params == ("eps",)
