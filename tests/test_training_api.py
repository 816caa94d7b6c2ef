"""The training pieces for users' own loops: soft targets and the regulariser of DecouplingLoss,
param_groups (gates found by type), recalibrate_bn, the NamedTuple forward output, and a plain
timm loop with Mixup and SoftTargetCrossEntropy."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nd_plugin
from nd_plugin.decoupled import ForwardOutput
from nd_plugin.errors import ConfigError, DataError, InputShapeError, NDError
from nd_plugin.gates import ACM
from nd_plugin.losses import DecouplingLoss
from nd_plugin.training.distributed import Dist, PhaseDDP

K = 3


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, K),
    )  # fmt: skip


@pytest.fixture
def dm() -> nd_plugin.DecoupledModel:
    torch.manual_seed(0)
    return nd_plugin.wrap(_net(), torch.randn(1, 3, 8, 8))


def _batch(n: int = 6, channels: tuple[int, ...] = (3, 5)) -> tuple:
    logits = torch.randn(n, K)
    gates = [torch.rand(n, c, requires_grad=True) for c in channels]
    pre = [torch.randn(n, c) for c in channels]
    z = [torch.randn(n, c) for c in channels]
    return logits, gates, pre, z


# ----------------------------------------------------------------------------- DecouplingLoss
@pytest.mark.parametrize("mi_scope", ["all", "gates"])
def test_one_hot_soft_targets_equal_class_indices(mi_scope: str) -> None:
    torch.manual_seed(1)
    loss_fn = DecouplingLoss(0.3, 0.7, 0.2, 0.4, channels=[3, 5], num_classes=K, mi_scope=mi_scope)
    logits, gates, pre, z = _batch()
    y = torch.randint(0, K, (6,))
    hard, soft = loss_fn(logits, y, gates, pre, z), loss_fn(logits, F.one_hot(y, K).float(), gates, pre, z)
    for name in ("total", "ce", "mi", "kl", "s"):
        torch.testing.assert_close(getattr(soft, name), getattr(hard, name))
    (g_hard,) = torch.autograd.grad(hard.total, gates[0])
    (g_soft,) = torch.autograd.grad(soft.total, gates[0])
    torch.testing.assert_close(g_soft, g_hard)


def test_soft_mi_is_each_layers_soft_cross_entropy() -> None:
    torch.manual_seed(2)
    loss_fn = DecouplingLoss(1.0, 0.0, 0.0, 0.5, channels=[3, 5], num_classes=K)
    logits, gates, _, _ = _batch()
    soft = torch.softmax(torch.randn(6, K), 1)  # what Mixup + label smoothing produce
    terms = loss_fn(logits, soft, gates)
    mi = sum(-(soft * F.log_softmax(q(a), 1)).sum(1).mean() for q, a in zip(loss_fn.classifiers, gates))
    torch.testing.assert_close(terms.mi, mi)
    torch.testing.assert_close(terms.ce, -(soft * F.log_softmax(logits, 1)).sum(1).mean())


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_regularizer_is_the_loss_without_cross_entropy(soft: bool) -> None:
    torch.manual_seed(3)
    loss_fn = DecouplingLoss(0.3, 0.7, 0.2, 0.4, channels=[3, 5], num_classes=K)
    logits, gates, pre, z = _batch()
    y = torch.softmax(torch.randn(6, K), 1) if soft else torch.randint(0, K, (6,))
    whole, reg = loss_fn(logits, y, gates, pre, z), loss_fn.regularizer(y, gates, pre, z)
    assert reg.ce.item() == 0.0 and reg.total.item() != 0.0
    torch.testing.assert_close(reg.total + whole.ce, whole.total)
    torch.testing.assert_close(reg.total, 0.3 * reg.mi + 0.7 * reg.kl + 0.2 * reg.s)
    assert loss_fn.regularizer(y, {}).total.item() == 0.0  # nothing gated: nothing to add


@pytest.mark.parametrize(
    "targets",
    [torch.zeros(6, K + 1), torch.zeros(5, dtype=torch.long), torch.zeros(6), torch.zeros(6, K, dtype=torch.long),
     torch.zeros(6, 1, K), torch.zeros(6, K, dtype=torch.bool)],
    ids=["classes", "batch", "float-indices", "long-probabilities", "3d", "bool"],
)  # fmt: skip
@pytest.mark.parametrize("call", ["forward", "regularizer"])
def test_targets_of_the_wrong_shape_say_what_fits(targets: torch.Tensor, call: str) -> None:
    loss_fn = DecouplingLoss(0.3, 0.7, 0.2, 0.4, channels=[3, 5], num_classes=K)
    logits, gates, pre, z = _batch()
    with pytest.raises(InputShapeError, match=r"class indices of shape \(6,\) .* class probabilities of shape \(6, 3\)") as info:
        if call == "forward":
            loss_fn(logits, targets, gates, pre, z)
        else:
            loss_fn.regularizer(targets, gates, pre, z)
    assert isinstance(info.value, NDError) and isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------- param_groups
class _Named(nn.Module):
    """A user's layer called ``acm`` that is no ACM, beside a wrapped model under another name."""

    def __init__(self, dm: nn.Module) -> None:
        super().__init__()
        self.inner = dm
        self.acm = nn.Linear(2, 2)


def test_param_groups_find_gates_by_type(dm: nd_plugin.DecoupledModel) -> None:
    loss_fn = DecouplingLoss(channels=[s.channels for s in dm.gate_sites], num_classes=K)
    holder = _Named(dm)
    groups = nd_plugin.param_groups(holder, loss_fn, lr=0.1, acm_lr=0.02, weight_decay=5e-4, gate_weight_decay=1e-4)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("network", 0.1, 5e-4), ("gates", 0.02, 1e-4)]
    acm = {id(p) for m in holder.modules() if isinstance(m, ACM) for p in m.parameters()}
    assert acm and {id(p) for p in groups[1]["params"]} == acm | {id(p) for p in loss_fn.parameters()}
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted({id(p) for p in [*holder.parameters(), *loss_fn.parameters()]})  # each once
    assert id(holder.acm.weight) in {id(p) for p in groups[0]["params"]}  # the name fools nothing
    torch.optim.SGD(groups, lr=0.1)  # a valid optimiser spec
    with pytest.raises(ConfigError, match="acm_lr must be >= 0"):
        nd_plugin.param_groups(dm, loss_fn, lr=0.1, acm_lr=-1.0)


def test_ddp_ignores_exactly_the_gates_in_warmup(dm: nd_plugin.DecoupledModel) -> None:
    loss_fn = DecouplingLoss(channels=[s.channels for s in dm.gate_sites], num_classes=K)
    ddp = PhaseDDP(dm, loss_fn, Dist(), torch.device("cpu"))
    acm = {f"dm.{n}" for n, p in dm.named_parameters() if any(p is q for m in dm.modules() if isinstance(m, ACM) for q in m.parameters())}
    assert set(ddp.ignored(warmup=True)) == acm | {f"loss.{n}" for n, _ in loss_fn.named_parameters()}
    assert ddp.ignored(warmup=False) == []


# ----------------------------------------------------------------------------- recalibrate_bn
def test_recalibrate_bn_sets_the_population_statistics_under_eval_gates(dm: nd_plugin.DecoupledModel) -> None:
    torch.manual_seed(4)
    loader = [(torch.randn(5, 3, 8, 8), torch.zeros(5, dtype=torch.long)) for _ in range(4)]
    norms = [m for m in dm.modules() if isinstance(m, nn.BatchNorm2d)]
    reference = copy.deepcopy(dm).eval()  # eval: hard, noise-free gates; BatchNorms on batch statistics
    seen: list[list[torch.Tensor]] = [[] for _ in norms]
    ref_norms = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, m in enumerate(ref_norms):
        m.train()
        m.register_forward_pre_hook(lambda _m, inputs, i=i: seen[i].append(inputs[0].detach()))
    with torch.no_grad():
        for x, _ in loader[:3]:
            reference(x)
    before = [(m.running_mean, m.momentum) for m in norms]
    dm.train()
    norms[0].eval()  # a user's frozen BatchNorm keeps its mode
    updated = nd_plugin.recalibrate_bn(dm, loader, batches=3)
    assert set(map(id, updated)) == set(map(id, norms)) and dm.training  # the training modes are kept
    assert [m.training for m in norms] == [False, True, True]
    for m, (buffer, momentum), inputs in zip(norms, before, seen):
        assert m.running_mean is buffer and m.momentum == momentum  # the same tensors: CUDA graphs, DDP keep them
        x = torch.cat(inputs).transpose(0, 1).flatten(1)
        torch.testing.assert_close(m.running_mean, x.mean(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, x.var(1, unbiased=False), rtol=1e-4, atol=1e-5)


def test_recalibrate_bn_bad_input(dm: nd_plugin.DecoupledModel) -> None:
    with pytest.raises(DataError, match="empty loader"):
        nd_plugin.recalibrate_bn(dm, [], batches=2)
    with pytest.raises(ConfigError, match="batches must be >= 1"):
        nd_plugin.recalibrate_bn(dm, [torch.randn(2, 3, 8, 8)], batches=0)
    assert len(nd_plugin.recalibrate_bn(dm, [torch.randn(2, 3, 8, 8)], batches=50)) == 3  # at most len(loader)


# ------------------------------------------------------------------------------ ForwardOutput
@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("z", [False, True])
def test_forward_returns_a_named_tuple_in_the_old_layout(dm: nd_plugin.DecoupledModel, pre: bool, z: bool) -> None:
    x = torch.randn(2, 3, 8, 8)
    out = dm.eval()(x, return_path=True, return_pre_gate=pre, return_gate_logits=z)
    assert isinstance(out, ForwardOutput) and isinstance(out, tuple) and len(out) == 2 + pre + z
    assert out[0] is out.logits and out[1] is out.path and list(out.path) == dm.site_names
    assert (out.pre_gate is None) is not pre and (out.gate_logits is None) is not z
    if z:
        assert out[-1] is out.gate_logits
    if pre:
        assert out[2] is out.pre_gate
    logits, path, *rest = out
    assert len(rest) == pre + z
    again = pickle.loads(pickle.dumps(out))
    assert again._fields == out._fields and torch.equal(again.logits, out.logits)
    assert not isinstance(dm(x), tuple)  # no flag: the logits alone


# ------------------------------------------------------------------ a plain timm training loop
def test_plain_timm_loop_with_mixup_soft_targets_and_param_groups() -> None:
    timm = pytest.importorskip("timm")
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(5)
    dm = nd_plugin.wrap(timm.create_model("resnet10t", num_classes=K), torch.randn(1, 3, 32, 32))
    loss_fn = DecouplingLoss(0.1, 1.0, 0.05, 0.5, channels=[s.channels for s in dm.gate_sites], num_classes=K)
    optimizer = torch.optim.SGD(nd_plugin.param_groups(dm, loss_fn, lr=0.02, acm_lr=0.1, weight_decay=5e-4), momentum=0.9)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=K)
    criterion = SoftTargetCrossEntropy()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % K
    start = copy.deepcopy({n: p.detach().clone() for n, p in [*dm.named_parameters(), *loss_fn.named_parameters()]})
    dm.train()
    for _ in range(3):
        xm, soft = mixup(x, y)
        assert soft.shape == (8, K)
        out = dm(xm, return_path=True, return_pre_gate=True, return_gate_logits=True)
        reg = loss_fn.regularizer(soft, out.path, out.pre_gate, out.gate_logits)
        loss = criterion(out.logits, soft) + reg.total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and reg.mi > 0 and reg.kl > 0
    after = dict([*dm.named_parameters(), *loss_fn.named_parameters()])
    moved = {n for n, p in after.items() if not torch.equal(p.detach(), start[n])}
    gates = {n for n in after if ".acm." in n}
    assert gates & moved and (moved - gates - {n for n in after if n.startswith("classifiers")})  # gates and network
    assert {n for n in after if n.startswith("classifiers")} <= moved  # the L_mi classifiers train too
    nd_plugin.recalibrate_bn(dm, [(x, y)] * 2)
    with torch.no_grad():
        assert torch.isfinite(dm.eval()(x)).all()
