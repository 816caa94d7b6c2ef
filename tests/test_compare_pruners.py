"""The FLOPs matching of ``benchmarks/compare_pruners.py`` (torch-pruning baselines vs decoupling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_pruning as tp
from _helpers import load_benchmark


@pytest.fixture(scope="module")
def cp():
    """The benchmark script as a module (loaded from its file; see ``_helpers.load_benchmark``)."""
    return load_benchmark("compare_pruners")


@pytest.fixture(scope="module")
def tb(cp):
    """``benchmarks/_tp_baselines.py``, the tp side of the script (loaded with it)."""
    import sys

    return sys.modules["_tp_baselines"]


def test_match_flops_hits_target_on_internal_channels(cp) -> None:
    from nd_plugin.adapters import create_model
    from nd_plugin.flops import count_flops

    torch.manual_seed(0)
    model = create_model("cifar:resnet20", num_classes=10).eval()
    size = (3, 32, 32)
    original = count_flops(model, size)
    scope = cp.prunable_scope(model, torch.zeros(1, *size), "internal")
    assert scope and all(name.endswith("conv1") and name.startswith("layer") for name in scope)
    target = original / 2
    pruned, ratio, flops = cp.match_flops(model, cp.PRUNERS["l1"][1](), target, size, scope=scope, tol=0.02)
    assert abs(flops / target - 1) <= 0.02
    assert 0 < ratio < 1
    assert count_flops(model, size) == original  # the model itself is untouched
    assert pruned(torch.randn(2, *size)).shape == (2, 10)
    # only internal channels were removed: the residual stream and the classifier keep their width
    widths = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert widths["conv1"] == 16 and widths["layer3.2.conv2"] == 64
    assert pruned.linear.in_features == 64


def test_plot_and_verdict_from_json_rows(cp) -> None:
    rows = [
        cp.Result("fine-tuned (unpruned)", "fine-tuned", 40e6, 40e6, 1.0, 0.90),
        cp.Result("decoupling R=0.35", "decoupling", 21e6, 25e6, 40 / 21, 0.88),
        cp.Result("tp L1", "l1", 21.2e6, 21.2e6, 40 / 21.2, 0.86, 21e6, "decoupling R=0.35", 0.5, True),
        cp.Result("tp L1", "l1", 20.1e6, 20.1e6, 40 / 20.1, 0.85, 20e6, "2x", 0.55, True),
    ]
    v = cp.verdict(rows)
    assert v["within_15pct"] and v["at_its_flops"]["decoupling_at_least_as_good"]
    assert v["at_2x"]["margin"] == pytest.approx(0.03)
    fig = cp.plot([r.__dict__ for r in rows])
    assert fig.axes[0].get_xlabel().startswith("FLOPs reduction")


def test_verdicts_take_the_better_decoupled_row_per_target(cp) -> None:
    rows = [
        cp.Result("decoupling R=0.5", "decoupling", 20e6, 22e6, 2.0, 0.820),
        cp.Result("decoupling_importance R=0.5", "decoupling_importance", 20.2e6, 20.2e6, 1.98, 0.845, 20e6, "decoupling R=0.5"),
        cp.Result("tp L1", "l1", 20.1e6, 20.1e6, 1.99, 0.830, 20e6, "decoupling R=0.5", 0.5, True),
        cp.Result("tp group norm", "group_norm", 20.1e6, 20.1e6, 1.99, 0.838, 20e6, "decoupling R=0.5", 0.5, True),
        cp.Result("tp group norm", "group_norm", 15e6, 15e6, 2.75, 0.80, 15e6, "2.75x", 0.6, True),
    ]
    (v,) = cp.verdicts(rows)  # the 2.75x target has no decoupled row
    assert v["best_decoupled"] == "decoupling_importance R=0.5" and v["best_tp"] == "tp group norm"
    assert v["margin"] == pytest.approx(0.007) and v["beats_by_margin"]
    rows[1].top1 = 0.840
    assert not cp.verdicts(rows)[0]["beats_by_margin"]  # +0.2 points is not 0.5


def test_verdicts_count_static_rows_only_within_the_flops_target(cp) -> None:
    tp = cp.Result("tp group norm", "group_norm", 20.1e6, 20.1e6, 1.99, 0.838, 20e6, "decoupling R=0.5", 0.5, True)
    dec = cp.Result("decoupling R=0.5", "decoupling", 20e6, 22e6, 2.0, 0.820)
    static = cp.Result("decoupling_static R=0.5", "decoupling_static", 20.3e6, 20.3e6, 1.97, 0.850, 20e6, "decoupling R=0.5")
    (v,) = cp.verdicts([dec, static, tp])
    assert v["best_decoupled"] == "decoupling_static R=0.5" and v["margin"] == pytest.approx(0.012)
    static.flops = 20.5e6  # 2.5% above the target: more FLOPs than the rivals, not counted
    (v,) = cp.verdicts([dec, static, tp])
    assert v["best_decoupled"] == "decoupling R=0.5" and v["margin"] == pytest.approx(-0.018)


def test_decoupling_importance_prunes_the_rarely_on_filters_first(cp) -> None:
    import nd_plugin
    from nd_plugin.adapters import create_model
    from nd_plugin.flops import count_flops
    from nd_plugin.paths import PathStats

    torch.manual_seed(0)
    size = (3, 32, 32)
    dm = nd_plugin.wrap(create_model("cifar:resnet20", num_classes=10), torch.zeros(1, *size))
    plain = dm.unwrapped().eval()
    # frequencies: filter j of a gated layer with C filters is on for (j + 1) of C * 10 inputs
    channels = [s.channels for s in dm.gate_sites]
    counts = np.concatenate([np.arange(1, c + 1) for c in channels]).astype(np.int64)
    stats = PathStats(dm.site_names, channels, n=10 * max(channels), counts=counts,
                      class_counts=np.zeros((10, counts.size), np.int64), class_n=np.zeros(10, np.int64))
    scope = cp.prunable_scope(plain, torch.zeros(1, *size), "internal")
    target = count_flops(plain, size) / 1.5
    pruned, _, flops = cp.match_flops(plain, cp.DecouplingImportance(stats), target, size, scope=scope, tol=0.03)
    assert abs(flops / target - 1) <= 0.1  # equal frequencies across layers make the bisection coarse
    # the kept filters of layer1.0.conv1 are the most frequently on ones: its last ones
    kept = pruned.layer1[0].conv1.weight
    c = kept.shape[0]
    assert c < 16
    torch.testing.assert_close(kept, plain.layer1[0].conv1.weight[16 - c :])


def test_taylor_rows_prune_with_the_gradients_they_were_given(cp, tb) -> None:
    from nd_plugin.adapters import create_model

    torch.manual_seed(0)
    size = (3, 32, 32)
    model = create_model("cifar:resnet20", num_classes=10).eval()
    scope = tb.prunable_scope(model, torch.zeros(1, *size), "internal")
    for p in model.parameters():  # Taylor scores |w * grad|: layer1.0.conv1's filters 4.. get none at all
        p.grad = torch.rand_like(p)
    block = model.layer1[0]
    for grad in (block.conv1.weight.grad, block.bn1.weight.grad, block.bn1.bias.grad):
        grad[4:] = 0.0
    block.conv2.weight.grad[:, 4:] = 0.0
    pruned = tb.tp_prune(model, tb.PRUNERS["taylor"][1](), 0.5, torch.zeros(1, *size), scope)
    kept = pruned.layer1[0].conv1.weight
    assert kept.shape[0] < 16
    # the copied gradients reached the pruner: the 4 scored filters are the ones kept first
    torch.testing.assert_close(kept[:4], model.layer1[0].conv1.weight[:4])
    assert all(p.grad is not None for p in model.parameters())  # the model itself keeps its gradients


def test_sparse_learning_regularises_through_the_wrapped_model(cp, tmp_path, monkeypatch) -> None:
    import argparse
    import copy

    torch.manual_seed(0)
    from _suite import Suite, add_common_args
    from nd_plugin.adapters import create_model

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    args = parser.parse_args(
        ["--data", "synthetic:64", "--weights", "none", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "32",
         "--out-dir", str(tmp_path)]
    )
    suite = Suite(args, "compare_pruners_test")
    model = create_model("cifar:resnet20", num_classes=suite.data.num_classes)
    scope = cp.prunable_scope(model, torch.zeros(1, 3, 32, 32), "internal")
    calls = []
    original = tp.pruner.GroupNormPruner.regularize

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(tp.pruner.GroupNormPruner, "regularize", counting)
    strong, _ = cp.sparse_learning(model, suite, 1, scope, reg=1.0, progress=False)
    assert len(calls) == 1  # one regularised step: 32 training images, batch 32
    # a strong reg (lr 0.05 x reg 1 x gamma <= 16 < 1) shrinks the in-scope filters against the same step without it
    _, dm = cp.finetune(copy.deepcopy(model), suite, False, epochs=1, weight_decay=0.0)  # the same step, no reg
    plain = dm.unwrapped()
    assert not any(type(m).__name__ == "GatedSite" for m in strong.modules())
    for name in ("layer1.0.conv1", "layer3.2.conv1"):  # in scope: shrunk
        assert strong.get_submodule(name).weight.norm() < plain.get_submodule(name).weight.norm()
    # out of scope (the stem): the same step exactly
    torch.testing.assert_close(strong.conv1.weight, plain.conv1.weight)


@pytest.fixture
def reuse_args(cp, tmp_path):
    """A one-epoch ``--reuse`` suite on 64 synthetic images, its runs under ``tmp_path``."""
    import argparse

    from _suite import add_common_args

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(
        ["--data", "synthetic:64", "--weights", "none", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "32",
         "--out-dir", str(tmp_path), "--reuse"]
    )


@pytest.fixture
def decouple_calls(cp, monkeypatch) -> list[dict]:
    """The keyword arguments of every ``decouple`` call the suite makes from now on (the calls still run)."""
    import _suite

    calls: list[dict] = []
    real = _suite.decouple

    def recording(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(_suite, "decouple", recording)
    return calls


@pytest.mark.parametrize("ratio, resumed", [(0.6, True), (0.5, False)])
def test_reuse_resumes_an_interrupted_run_of_the_same_configuration(reuse_args, decouple_calls, tmp_path, ratio, resumed) -> None:
    from _suite import Suite

    Suite(reuse_args, "compare_pruners_test").run("decoupling R=0.6", ratio=0.6)
    (tmp_path / "decoupling_R=0.6" / "summary.json").unlink()  # checkpoint kept, summary lost: an interrupted run
    calls = decouple_calls
    calls.clear()
    row = Suite(reuse_args, "compare_pruners_test").run("decoupling R=0.6", ratio=ratio)
    assert calls[0].get("resume", False) is resumed and calls[0].get("overwrite", False) is not resumed
    assert (tmp_path / "decoupling_R=0.6" / "summary.json").is_file() and row.ratio == ratio


def test_rows_from_other_calls_are_merged_and_count_within_the_tolerance(cp, tmp_path) -> None:
    import json
    from dataclasses import asdict

    def tp_row(top1: float, target: float, of: str):
        return cp.Result("tp group SL", "group_sl", target, target, 40.0 / target, top1, target, of, 0.4, True, 1.0)

    main, side = tmp_path / "main.json", tmp_path / "side.json"
    dec = cp.Result("decoupling R=0.5", "decoupling", 20.5, 40.0, 40.0 / 20.5, 0.83)
    main.write_text(json.dumps({"results": [asdict(dec)]}))
    side.write_text(json.dumps({"results": [asdict(tp_row(0.84, 20.3, "1.97x")), asdict(dec)]}))  # dec twice: kept once
    rows = cp.reused_rows([main, side, tmp_path / "missing.json"])
    assert [r.method for r in rows] == ["decoupling R=0.5", "tp group SL"]
    # targets of this call: the decoupling row's FLOPs (20.5) and a fixed 2x (20.0); the side row (20.3) is
    # within 2% of both, but one measurement counts for one target only: the first
    names = ["decoupling R=0.5", "2x"]
    rows[1].matched = False  # say its bisection missed its own 1.97x target: within 2% of 20.5 it matches this one
    first = cp.claim_row(rows, "tp group SL", "decoupling R=0.5", 20.5, 0.02, names)
    assert first is rows[1] and first.target_of == "decoupling R=0.5" and first.target == 20.5 and first.matched
    assert first.settings == {"bisected_to": "1.97x", "bisected_target": 20.3}
    assert cp.claim_row(rows, "tp group SL", "2x", 20.0, 0.02, names) is None  # so the 2x row is run
    assert cp.claim_row(rows, "tp group SL", "decoupling R=0.35", 14.6, 0.02, names) is None  # too far
    (v,) = cp.verdicts(rows)
    assert v["best_tp"] == "tp group SL" and v["margin"] == pytest.approx(0.83 - 0.84)
    # saved with its new label and read back beside the side file: still one row
    main.write_text(json.dumps({"results": [asdict(r) for r in rows]}))
    assert len(cp.reused_rows([main, side])) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratios", "--targets"], "nothing to compare"),
        (["--rows-from", "x.json"], "--rows-from keeps earlier rows: it needs --reuse"),
        (["--rows-from", "no_such.json", "--reuse"], "--rows-from: no such results file: no_such.json"),
    ],
)
def test_compare_pruners_refuses_an_empty_or_unreusable_call(cp, monkeypatch, capsys, argv, message) -> None:
    monkeypatch.setattr("sys.argv", ["compare_pruners.py", "--data", "synthetic:32", *argv])
    with pytest.raises(SystemExit) as info:
        cp.main()
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_reuse_takes_a_run_that_predates_a_new_field_and_retrains_a_damaged_one(reuse_args, decouple_calls, tmp_path) -> None:
    import json

    from _suite import Suite

    args = reuse_args
    Suite(args, "compare_pruners_test").run("decoupling R=0.6", ratio=0.6)
    run = tmp_path / "decoupling_R=0.6"
    config = json.loads((run / "config.json").read_text())
    del config["train"]["sparsity_cap"]  # written before the field existed: it had the default
    (run / "config.json").write_text(json.dumps(config))
    calls = decouple_calls
    calls.clear()
    Suite(args, "compare_pruners_test").run("decoupling R=0.6", ratio=0.6)
    assert calls == []  # finished and the same configuration: reused
    (run / "summary.json").unlink()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # both checkpoints damaged: resume fails, train again
        if (run / name).is_file():
            (run / name).write_bytes(b"damaged")
    row = Suite(args, "compare_pruners_test").run("decoupling R=0.6", ratio=0.6)
    assert [k.get("resume", False) for k in calls] == [True, False] and calls[1]["overwrite"] is True
    assert (run / "summary.json").is_file() and row.top1 >= 0


@pytest.mark.parametrize("with_weights", [True, False])
def test_distilled_tp_rows_learn_from_the_suites_dense_network(cp, tb, tmp_path, monkeypatch, with_weights) -> None:
    import argparse

    from _suite import Suite, add_common_args
    from nd_plugin.adapters import create_model

    torch.manual_seed(0)
    dense = create_model("cifar:resnet20", num_classes=10)
    weights = tmp_path / "dense.th"
    torch.save(dense.state_dict(), weights)
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    args = parser.parse_args(
        ["--data", "synthetic:64", "--weights", str(weights) if with_weights else "none", "--epochs", "1",
         "--warmup-epochs", "0", "--batch-size", "32", "--out-dir", str(tmp_path), "--set", "distill_weight:0.5"]
    )
    suite = Suite(args, "compare_pruners_test")
    teachers = []
    real = tb.Trainer

    def recording(*a, teacher=None, **k):
        teachers.append(teacher)
        return real(*a, teacher=teacher, **k)

    monkeypatch.setattr(tb, "Trainer", recording)
    pruned = create_model("cifar:resnet20", num_classes=10)
    if not with_weights:
        with pytest.raises(SystemExit, match="pass --weights and no --warmup-epochs"):
            cp.finetune(pruned, suite, False, epochs=1)
        return
    top1, dm = cp.finetune(pruned, suite, False, epochs=1)
    (teacher,) = teachers
    assert teacher is not None and teacher is not dm.model
    for name, value in dense.state_dict().items():  # the weights file's network, untouched by the fine-tuning
        torch.testing.assert_close(teacher.state_dict()[name], value)
