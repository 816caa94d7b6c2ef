"""DecouplingLoss: each term against hand-computed values; all λ = 0 is plain cross-entropy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import ResidualTinyNet

import nd_plugin
from nd_plugin.errors import ConfigError
from nd_plugin.losses import DecouplingLoss


def _loss(**kw: float) -> DecouplingLoss:
    loss = DecouplingLoss(**{"lambda_m": 1.0, "lambda_k": 1.0, "lambda_s": 1.0, "ratio": 0.0, **kw}, channels=[2], num_classes=2)
    with torch.no_grad():
        loss.classifiers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    return loss


def test_each_term_by_hand() -> None:
    logits, y = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    gates, pre = [torch.tensor([[1.0, 0.0]])], [torch.tensor([[0.0, 0.0]])]
    terms = _loss()(logits, y, gates, pre)
    assert terms.ce.item() == pytest.approx(math.log(2))
    # L_mi: classifier logits [1, 0] for class 0
    assert terms.mi.item() == pytest.approx(math.log(1 + math.exp(-1)))
    # L_kl = KL(softmax([0, 0]) || softmax([1, 0])), divided by N * C = 2
    q = [math.e / (1 + math.e), 1 / (1 + math.e)]
    assert terms.kl.item() == pytest.approx((0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])) / 2, rel=1e-6)
    # L_s = |mean ||a||_1 - R*C| = |1 - 0|
    assert terms.s.item() == pytest.approx(1.0)
    assert terms.total.item() == pytest.approx(terms.ce.item() + terms.mi.item() + terms.kl.item() + 1.0, rel=1e-6)


def test_kl_is_the_element_mean_per_layer_for_layers_of_different_widths() -> None:
    loss = DecouplingLoss(0.0, 1.0, 0.0, 0.5, channels=[2, 4], num_classes=2)
    n = 2  # two identical rows: the mean over the batch is the one row's value
    gates = [torch.tensor([[1.0, 0.0]] * n), torch.zeros(n, 4)]
    pre = [torch.zeros(n, 2), torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]] * n)]
    terms = loss(torch.zeros(n, 2), torch.tensor([0, 1]), gates, pre)
    q = [math.e / (1 + math.e), 1 / (1 + math.e)]
    layer_1 = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])  # KL per input, C = 2
    # softmax([ln 3, 0, 0, 0]) = [1/2, 1/6, 1/6, 1/6] against uniform 1/4: KL = 1/2 ln 2 + 1/2 ln(2/3)
    layer_2 = 0.5 * math.log(4.0 / 3.0)
    assert terms.kl.item() == pytest.approx(layer_1 / 2 + layer_2 / 4, rel=1e-6)


def test_sparsity_target_ratio_and_weights() -> None:
    gates = [torch.tensor([[1.0, 0.0], [1.0, 1.0]])]  # mean ||a||_1 = 1.5
    terms = _loss(ratio=0.25, lambda_m=0.0, lambda_k=0.0, lambda_s=0.5)(torch.zeros(2, 2), torch.tensor([0, 1]), gates)
    assert terms.s.item() == pytest.approx(1.0)  # |1.5 - 0.25 * 2|
    assert terms.mi.item() == 0.0 and terms.kl.item() == 0.0
    assert terms.total.item() == pytest.approx(math.log(2) + 0.5)


@pytest.mark.parametrize("kw, match", [({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"lambda_m": -1.0}, "lambda_m")])
def test_bad_hyper_parameters(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _loss(**kw)


def test_all_lambdas_zero_is_plain_cross_entropy_training() -> None:
    torch.manual_seed(0)
    dm_a = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8))
    dm_b = copy.deepcopy(dm_a)
    loss_fn = DecouplingLoss(0.0, 0.0, 0.0, 0.5, channels=[6], num_classes=3)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    opt_a = torch.optim.SGD(dm_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(dm_b.parameters(), lr=0.1)
    for _ in range(3):
        state = torch.get_rng_state()
        logits, gates = dm_a(x, return_path=True)
        terms = loss_fn(logits, y, gates)
        assert torch.equal(terms.total, terms.ce)
        opt_a.zero_grad()
        terms.total.backward()
        opt_a.step()
        torch.set_rng_state(state)  # same gate noise for the plain run
        plain = F.cross_entropy(dm_b(x), y)
        opt_b.zero_grad()
        plain.backward()
        opt_b.step()
    for pa, pb in zip(dm_a.parameters(), dm_b.parameters()):
        assert torch.equal(pa, pb)


def test_sparsity_counts_eval_gates_when_logits_are_given() -> None:
    soft_gates = [torch.tensor([[0.6, 0.4], [0.6, 0.4]])]  # training values: mean ||a||_1 = 1.0
    z = [torch.tensor([[0.3, -0.2], [0.1, 0.5]], requires_grad=True)]  # eval gates: [1, 0], [1, 1]
    loss = _loss(ratio=0.25, lambda_m=0.0, lambda_k=0.0, lambda_s=1.0)
    assert loss(torch.zeros(2, 2), torch.tensor([0, 1]), soft_gates).s.item() == pytest.approx(0.5)  # |1 - 0.5|
    terms = loss(torch.zeros(2, 2), torch.tensor([0, 1]), soft_gates, gate_logits=z)
    assert terms.s.item() == pytest.approx(1.0)  # |1.5 - 0.5|
    terms.s.backward()
    assert z[0].grad is not None and (z[0].grad > 0).all()  # straight-through via sigmoid


def _per_layer_reference(loss_fn: DecouplingLoss, logits, y, gates, pre, z) -> dict[str, torch.Tensor]:
    """The losses written as METHOD.md states them: one loop over the layers."""
    mi = kl = s = torch.zeros(())
    for q, a, p, zl in zip(loss_fn.classifiers, gates, pre, z):
        mi = mi + F.cross_entropy(q(a), y)
        # the authors' release: F.kl_div(log_softmax(a), softmax(p)) with the "mean" reduction
        kl = kl + F.kl_div(F.log_softmax(a, 1), F.softmax(p, 1), reduction="sum") / a.numel()
        counted = (zl > 0).float()
        s = s + (counted.sum(1).mean() - loss_fn.ratio * a.shape[1]).abs()
    return {"mi": mi, "kl": kl, "s": s}


@pytest.mark.parametrize("channels", [[3], [2, 5, 4], [8, 1, 8, 3]])
def test_batched_layers_equal_the_per_layer_sum(channels: list[int]) -> None:
    torch.manual_seed(len(channels))
    loss_fn = DecouplingLoss(0.3, 0.7, 0.2, 0.4, channels=channels, num_classes=4)
    n = 5
    logits, y = torch.randn(n, 4), torch.randint(0, 4, (n,))
    gates = [torch.rand(n, c, requires_grad=True) for c in channels]
    pre = [3 * torch.randn(n, c) for c in channels]
    z = [torch.randn(n, c) for c in channels]
    terms = loss_fn(logits, y, gates, pre, z)
    ref = _per_layer_reference(loss_fn, logits, y, gates, pre, z)
    for name in ("mi", "kl", "s"):
        torch.testing.assert_close(getattr(terms, name), ref[name], rtol=1e-5, atol=1e-6)
    # the gradient reaching the gates is that of lambda_m * L_mi + lambda_k * L_kl
    (grads,) = torch.autograd.grad(terms.total, gates[-1])
    (expected,) = torch.autograd.grad(0.3 * ref["mi"] + 0.7 * ref["kl"], gates[-1])
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "scope, expected",
    [
        # layer 0 (2 filters, R 0.5 -> 1 on): inputs open 2 and 0 gates -> mean 1 -> |1 - 1| = 0;
        # layer 1 (4 filters, 2 on): inputs open 4 and 2 -> mean 3 -> |3 - 2| = 1
        ("layer", 0.0 + 1.0),
        # per input: layer 0 |2 - 1|, |0 - 1| -> mean 1; layer 1 |4 - 2|, |2 - 2| -> mean 1
        ("input", 1.0 + 1.0),
        # per filter on-rates: layer 0 (1/2, 1/2) -> 0; layer 1 (1, 1, 1/2, 1/2) -> 0.5 + 0.5
        ("filter", 0.0 + 1.0),
    ],
)
def test_sparsity_scopes_by_hand(scope: str, expected: float) -> None:
    loss_fn = DecouplingLoss(0.0, 0.0, 1.0, 0.5, channels=[2, 4], num_classes=2, sparsity_scope=scope)
    gates = [torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])]
    terms = loss_fn(torch.zeros(2, 2), torch.tensor([0, 1]), gates)
    assert terms.s.item() == pytest.approx(expected)
    loss_fn.set_ratio(0.25)  # the filter scope follows the schedule too: layer 0 |1/2 - 1/4| x 2 = 0.5
    if scope == "filter":
        assert loss_fn(torch.zeros(2, 2), torch.tensor([0, 1]), gates).s.item() == pytest.approx(0.5 + (0.75 * 2 + 0.25 * 2))


@pytest.mark.parametrize(
    "scope, cap, expected",
    [
        # the gates of test_sparsity_scopes_by_hand; on-rates (1/2, 1/2) and (1, 1, 1/2, 1/2)
        ("layer", 1.0, 1.0),  # no cap: the layer term alone
        ("layer", 0.75, 1.0 + 0.25 + 0.25),  # the two always-on filters pay 1 - 0.75 each
        ("layer", 0.5, 1.0 + 0.5 + 0.5),  # a cap at R: on-rate 1/2 is free
        ("filter", 0.75, 1.0 + 0.25 + 0.25),
    ],
)
def test_sparsity_cap_charges_each_filter_above_it_by_hand(scope: str, cap: float, expected: float) -> None:
    loss_fn = DecouplingLoss(0.0, 0.0, 1.0, 0.5, channels=[2, 4], num_classes=2, sparsity_scope=scope, sparsity_cap=cap)
    gates = [torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])]
    assert loss_fn(torch.zeros(2, 2), torch.tensor([0, 1]), gates).s.item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "ratio, expected",
    [
        (1.0, 1.0 + 1.0),  # a density schedule's start: the cap lifts to R = 1, nothing above it
        (0.75, 0.5 + 0.25 + 0.25),  # |1 - 1.5| + |3 - 3|; the cap at 0.75, the two always-on filters pay 0.25
        (0.5, 1.0 + 0.5 + 0.5),  # the end: the cap itself (0.5) again
    ],
)
def test_sparsity_cap_never_sits_below_the_scheduled_target(ratio: float, expected: float) -> None:
    loss_fn = DecouplingLoss(0.0, 0.0, 1.0, 0.5, channels=[2, 4], num_classes=2, sparsity_cap=0.5)
    gates = [torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])]
    loss_fn.set_ratio(ratio)
    assert loss_fn(torch.zeros(2, 2), torch.tensor([0, 1]), gates).s.item() == pytest.approx(expected)


@pytest.mark.parametrize("cap, ratio", [(1.5, 0.5), (0.4, 0.5), (-0.1, 0.0)])
def test_a_sparsity_cap_out_of_range_names_it(cap: float, ratio: float) -> None:
    with pytest.raises(ConfigError, match="sparsity_cap must be") as info:
        DecouplingLoss(ratio=ratio, channels=[2], num_classes=2, sparsity_cap=cap)
    assert "sparsity_cap" in info.value.params


@pytest.mark.parametrize(
    "gates, targets, expected",
    [
        # one layer of 2 filters, classes (0, 1): filter 0 on for class 0 only (ln 2), filter 1 on for both (0)
        ([[1.0, 1.0], [0.0, 1.0]], [0, 1], [math.log(2) / 2]),
        # the same filter for classes (0, 0, 1, 1) at soft on-rates (0.5, 0.5 | 0, 0): p = 1/4,
        # h(1/4) - (1/2 h(1/2) + 1/2 h(0)) for filter 0; filter 1 silent
        ([[0.5, 0.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.0]], [0, 0, 1, 1], [(0.5623351446 - 0.5 * math.log(2)) / 2]),
        # a filter on at random, not by class: on for one input of each class -> 0
        ([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], [0, 0, 1, 1], [0.0]),
    ],
)
def test_class_information_by_hand(gates: list, targets: list, expected: list) -> None:
    loss_fn = DecouplingLoss(0.0, 0.0, 0.0, 0.5, channels=[2], num_classes=2, lambda_c=2.0)
    path, y = torch.tensor(gates), torch.tensor(targets)
    assert loss_fn.class_information(path, y).tolist() == pytest.approx(expected, abs=1e-4)
    terms = loss_fn(torch.zeros(len(targets), 2), y, [path])
    assert terms.c.item() == pytest.approx(-sum(expected), abs=1e-4)
    assert terms.total.item() == pytest.approx(terms.ce.item() - 2.0 * sum(expected), abs=1e-4)
    # soft targets that are one-hot give the same value
    soft = F.one_hot(y, 2).float()
    assert loss_fn.class_information(path, soft).tolist() == pytest.approx(expected, abs=1e-4)


def test_class_information_sums_over_layers_and_has_finite_gradients_at_hard_gates() -> None:
    loss_fn = DecouplingLoss(0.0, 0.0, 0.0, 0.5, channels=[2, 1], num_classes=2, lambda_c=1.0)
    gates = [torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True), torch.tensor([[0.0], [1.0]], requires_grad=True)]
    terms = loss_fn(torch.zeros(2, 2), torch.tensor([0, 1]), gates)
    assert terms.c.item() == pytest.approx(-(math.log(2) / 2 + math.log(2)), abs=1e-4)
    terms.total.backward()
    assert all(torch.isfinite(g.grad).all() for g in gates)
    off = DecouplingLoss(0.0, 0.0, 0.0, 0.5, channels=[2, 1], num_classes=2)  # lambda_c 0: the term is off
    assert off(torch.zeros(2, 2), torch.tensor([0, 1]), gates).c.item() == 0.0


def test_negative_lambda_c_names_it() -> None:
    with pytest.raises(ConfigError, match="lambda_c must be in") as info:
        DecouplingLoss(channels=[2], num_classes=2, lambda_c=-1.0)
    assert info.value.params == ("lambda_c",)


def test_unknown_sparsity_scope_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="sparsity_scope must be one of layer, input, filter"):
        DecouplingLoss(channels=[2], num_classes=2, sparsity_scope="channel")
