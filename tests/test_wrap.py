"""wrap(), gates, gate sites and calculation paths."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
import torchvision
from _helpers import ResidualTinyNet
from torch import nn

import nd_plugin
from nd_plugin.adapters import create_model
from nd_plugin.errors import ConfigError, InputShapeError, NothingToGateError, UntraceableModelError
from nd_plugin.gates import ACM, GatedSite, binarize
from nd_plugin.losses import DecouplingLoss
from nd_plugin.paths import GateRecorder, PathStats
from nd_plugin.utilities import eval_mode


def test_binarize_eval_is_hard_threshold() -> None:
    z = torch.tensor([[-2.0, -0.0, 0.0001, 3.0]])
    assert binarize(z, training=False).tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_binarize_training_mixes_hard_and_soft_per_sample() -> None:
    torch.manual_seed(0)
    z = torch.zeros(2000, 3, requires_grad=True)
    a = binarize(z, training=True)
    rows_binary = ((a == 0) | (a == 1)).all(1)
    # roughly half the samples are hard; the soft ones are almost never exactly binary in all 3
    assert 0.4 < rows_binary.float().mean().item() < 0.6
    a.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through gradient reaches z


@pytest.mark.parametrize("share", [0.0, 0.1, 1.0])
def test_binarize_hard_share_sets_the_share_of_hard_samples(share: float) -> None:
    torch.manual_seed(0)
    a = binarize(torch.zeros(4000, 3), training=True, hard_share=share)
    hard = ((a == 0) | (a == 1)).all(1).float().mean().item()
    assert hard == pytest.approx(share, abs=0.02)


def test_kaiming_acm_init_depends_on_the_input_from_the_start() -> None:
    torch.manual_seed(0)
    acm = ACM(8, 5, init="kaiming")
    z = acm(torch.randn(4, 8, 3, 3))
    assert (z.std(0) > 1e-3).all()
    with pytest.raises(ConfigError, match="unknown ACM init"):
        ACM(8, 5, init="xavier")


def test_pre_gate_after_activation_pools_the_relu_output() -> None:
    torch.manual_seed(0)
    dm = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8), sites="all")
    assert [s.activation for s in dm.gate_sites] == ["relu", None]  # conv1 -> relu; conv2 -> add
    dm.eval()
    x = torch.randn(2, 3, 8, 8)
    _, _, before = dm(x, return_pre_gate=True)
    _, _, after = dm(x, return_pre_gate=True, pre_gate_activation=True)
    site = dm.sites()[0]
    stem = torch.relu(dm.model.stem(x))
    expected = torch.relu(site.norm(site.conv(stem))).mean((2, 3))
    torch.testing.assert_close(after["conv1"], expected)
    assert not torch.allclose(before["conv1"], after["conv1"])
    torch.testing.assert_close(before["conv2"], after["conv2"])  # no ReLU right after conv2


def test_binarize_eval_keeps_autograd_link_for_tracing() -> None:
    z = torch.randn(2, 5, requires_grad=True)
    a = binarize(z, training=False)
    assert a.grad_fn is not None
    assert torch.equal(a.detach(), (z > 0).float())


def test_acm_initial_logits_do_not_depend_on_the_input() -> None:
    torch.manual_seed(0)
    acm = ACM(8, 5)
    z = acm(torch.randn(4, 8, 3, 3))
    assert z.shape == (4, 5)
    # W1 = 0, b1 = 1: z = W2 · 1 + b2 for every input
    assert torch.allclose(z, (acm.fc2.weight.sum(1) + 1.0).expand_as(z), atol=1e-6)
    saturated = ACM(8, 5, init_bias=3.0)
    assert (binarize(saturated(torch.randn(4, 8, 3, 3)), training=False) == 1).all()


@pytest.mark.parametrize("sites, expected", [("internal", ["conv1"]), ("all", ["conv1", "conv2"])])
def test_sites_found_by_tracing(sites: str, expected: list[str]) -> None:
    dm = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8), sites=sites)
    assert dm.site_names == expected
    info = dm.gate_sites[0]
    assert info.norm == "bn1" and info.channels == 6 and info.internal
    assert "conv2" in info.group and "bn1" in info.group
    assert isinstance(dm.model.conv1, GatedSite) and isinstance(dm.model.bn1, nn.Identity)


def test_sites_callable_and_names() -> None:
    dm = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8), sites=lambda s: s.name == "conv2")
    assert dm.site_names == ["conv2"] and not dm.gate_sites[0].internal
    dm = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8), sites=["conv2", "conv1"])
    assert dm.site_names == ["conv1", "conv2"]  # path order is execution order
    with pytest.raises(NothingToGateError, match="'stem' is not a gate site"):
        nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8), sites=["stem"])


@pytest.mark.parametrize("sites", ["internal", "all"])
def test_gates_open_computes_exactly_the_original(sites: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    dm = nd_plugin.wrap(copy.deepcopy(model), torch.randn(1, 3, 64, 64), sites=sites).eval()
    for site in dm.sites():  # make gates do something, to check they are really bypassed
        nn.init.normal_(site.acm.fc2.weight, std=5.0)
        site.acm.fc1.weight.data.normal_()
    with torch.no_grad(), dm.gates_open():
        out = dm(x)
    assert torch.equal(out, ref)
    with torch.no_grad():
        gated, path = dm(x, return_path=True)
    assert not torch.equal(gated, ref)
    assert all(((p == 0) | (p == 1)).all() for p in path.values())


def test_return_path_shapes_and_sites_metadata() -> None:
    dm = nd_plugin.wrap(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)).eval()
    logits, path = dm(torch.randn(2, 3, 64, 64), return_path=True)
    assert logits.shape == (2, 1000)
    assert list(path) == dm.site_names == [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    assert [p.shape[1] for p in path.values()] == [s.channels for s in dm.gate_sites]
    assert dm.num_filters == 2 * (64 + 128 + 256 + 512)


def test_wrap_works_under_inference_mode() -> None:
    model = ResidualTinyNet()
    with torch.inference_mode():
        dm = nd_plugin.wrap(model, torch.randn(1, 3, 8, 8))
    assert dm.site_names == ["conv1"]


def test_wrap_infers_example_inputs() -> None:
    dm = nd_plugin.wrap(create_model("cifar:resnet20"))
    assert dm.input_size == (3, 32, 32)
    dm = nd_plugin.wrap(torchvision.models.resnet18())
    assert dm.input_size == (3, 224, 224)


def test_wrap_errors() -> None:
    with pytest.raises(NothingToGateError, match="no nn.Conv2d"):
        nd_plugin.wrap(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))
    with pytest.raises(InputShapeError, match="expects 3"):
        nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 1, 8, 8))
    with pytest.raises(InputShapeError, match="one \\(N, C, H, W\\) tensor"):
        nd_plugin.wrap(ResidualTinyNet(), torch.randn(3, 8, 8))
    only_stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(NothingToGateError, match="no gate site"):
        nd_plugin.wrap(only_stem, torch.randn(1, 3, 5, 5))


class Untraceable(ResidualTinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x))).detach()  # leaves autograd: tracing loses stem, conv1
        return self.fc(self.bn2(self.conv2(y)).mean((2, 3)))


def test_untraceable_model_is_refused_with_one_message() -> None:
    with pytest.raises(UntraceableModelError, match="tracing cannot follow layer 'stem'"):
        nd_plugin.wrap(Untraceable(), torch.randn(1, 3, 8, 8))


def test_recorder_removes_hooks_when_forward_raises() -> None:
    dm = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8), sites="all")
    sites = dm.sites()
    with pytest.raises(RuntimeError):
        with GateRecorder(sites, pre_gate=True):
            dm.model(torch.randn(1, 5, 8, 8))  # wrong channel count raises inside forward
    assert all(not s.gate._forward_hooks and not s.norm._forward_hooks for s in sites)
    with pytest.raises(RuntimeError):
        dm(torch.randn(1, 5, 8, 8), return_path=True)
    assert all(not s.gate._forward_hooks for s in sites)


def _force_gates(dm: nd_plugin.DecoupledModel) -> None:
    """Deterministic gates for ResidualTinyNet conv1 (6 filters): 2 silent, 2 energetic, 2 input-dependent."""
    site = dm.sites()[0]
    with torch.no_grad():
        site.acm.fc1.weight.zero_()
        site.acm.fc1.bias.fill_(1.0)
        site.acm.fc2.weight.zero_()
        site.acm.fc2.bias.copy_(torch.tensor([-5.0, -5.0, 5.0, 5.0, 0.0, 0.0]))
        # filters 4 and 5 follow the sign of the input's mean on channel 0
        site.acm.fc1.weight[0, 0] = 1.0
        site.acm.fc1.bias[0] = 0.0
        site.acm.fc2.weight[4, 0] = 1.0
        site.acm.fc2.weight[5, 0] = 1.0
        site.acm.fc2.bias[4] = site.acm.fc2.bias[5] = -1e-3


def test_path_stats_exact_counts(tmp_path) -> None:
    torch.manual_seed(0)
    dm = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8)).eval()
    _force_gates(dm)
    dm.model.stem.weight.data.zero_()
    dm.model.stem.bias.data.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # stem output channel 0 is constant 1 > 0 (relu) for every input -> filters 4, 5 always on
    x = torch.randn(10, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    stats = dm.paths(loader, raw=True, classes=["a", "b", "c"])
    assert stats.n == 10 and stats.site_names == ["conv1"]
    assert stats.counts.tolist() == [0, 0, 10, 10, 10, 10]
    assert stats.class_n.tolist() == [4, 3, 3]
    assert stats.class_counts[:, 2].tolist() == [4, 3, 3]
    assert stats.paths.shape == (10, 6) and stats.paths[:, :2].sum() == 0
    assert stats.density == pytest.approx(40 / 60)
    stats.save(tmp_path / "p.npz")
    back = PathStats.load(tmp_path / "p.npz")
    assert back.classes == ["a", "b", "c"] and back.n == 10
    np.testing.assert_array_equal(back.paths, stats.paths)
    np.testing.assert_array_equal(back.class_counts, stats.class_counts)
    merged = stats.merge(back)
    assert merged.n == 20 and merged.counts.tolist() == [0, 0, 20, 20, 20, 20]


def test_gate_modules_deepcopy_and_state_dict_roundtrip() -> None:
    dm = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8))
    clone = copy.deepcopy(dm)
    assert clone.site_names == dm.site_names
    fresh = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8))
    fresh.load_state_dict(dm.state_dict())


TV_MODELS = [
    "resnet18",
    "resnet50",
    "vgg16_bn",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
    "densenet121",
]
TIMM_MODELS = ["resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_large_100", "regnety_008", "convnext_atto", "ghostnet_100"]
CIFAR_MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16_bn"]
COVERAGE = [f"tv:{n}" for n in TV_MODELS] + [f"timm:{n}" for n in TIMM_MODELS] + [f"cifar:{n}" for n in CIFAR_MODELS]


@pytest.mark.parametrize("name", COVERAGE)
def test_wrap_and_train_step_coverage(name: str) -> None:
    """Every model of the coverage list wraps, and one decoupling train step updates its gates."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    size = 32 if name.startswith("cifar:") else 64
    dm = nd_plugin.wrap(model, torch.randn(1, 3, size, size))
    assert dm.gate_sites, name
    loss_fn = DecouplingLoss(0.01, 1.0, 0.01, 0.5, channels=[s.channels for s in dm.gate_sites], num_classes=5)
    params = list(dm.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    acm_before = dm.sites()[0].acm.fc2.bias.detach().clone()
    dm.train()
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    logits, gates, pre = dm(x, return_path=True, return_pre_gate=True)
    terms = loss_fn(logits, y, gates, pre)
    assert torch.isfinite(terms.total)
    opt.zero_grad()
    terms.total.backward()
    opt.step()
    assert not torch.equal(dm.sites()[0].acm.fc2.bias, acm_before)
    dm.eval()
    with torch.no_grad():
        out, path = dm(x[:2], return_path=True)
    assert out.shape == (2, 5) and len(path) == len(dm.gate_sites)


def test_paths_of_a_model_without_gated_layers() -> None:
    dm = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8)).eval()
    empty = nd_plugin.DecoupledModel(dm.model, [], dm.input_size)  # e.g. a compact model with no dynamic layer left
    stats = empty.paths([(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))])
    assert stats.n == 4 and stats.num_filters == 0 and stats.class_n.tolist() == [2, 1, 1]


class _BuggyNet(nn.Module):
    """A conv net whose forward has a bug unrelated to the input's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).meann()  # typo: AttributeError


def test_a_bug_in_forward_is_not_reported_as_a_shape_error() -> None:
    net = _BuggyNet().train()
    with pytest.raises(AttributeError, match="meann"):
        nd_plugin.wrap(net, torch.randn(1, 3, 8, 8))
    assert net.training  # the caller's mode is restored


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("raises", [False, True])
def test_eval_mode_gives_the_module_its_mode_back(training: bool, raises: bool) -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).train(training)
    seen = []
    with contextlib.suppress(RuntimeError), eval_mode(net) as m:
        seen.append((m is net, net.training, net[1].training))
        if raises:
            raise RuntimeError("inside the block")
    assert seen == [(True, False, False)]
    assert (net.training, net[1].training) == (training, training)


@pytest.mark.parametrize("training", [True, False])
def test_path_collection_keeps_the_callers_mode(training: bool) -> None:
    dm = nd_plugin.wrap(ResidualTinyNet(), torch.randn(1, 3, 8, 8)).train(training)
    batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))]
    stats = dm.paths(batches)
    assert stats.n == 4
    assert dm.training is training
