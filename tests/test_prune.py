"""Pruning: DecouplingImportance, permanent removal, compact == gated, the dynamic runtime.

Gates are made non-trivial without training: for each gated layer a third of the filters get a
very negative ACM ``fc2`` bias (silent), a third a very positive one (energetic) and the rest
random weights and no bias (dynamic). Inputs are real images (scikit-learn's digits, 32x32 RGB).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from torch import nn

import nd_plugin
from nd_plugin.errors import ConfigError, StatsMismatchError
from nd_plugin.gates import GatedSite
from nd_plugin.pruning import DecouplingImportance, FixedSite, dynamic_runtime, fold_batchnorm, plan_record, prune
from nd_plugin.pruning.plan import analyse
from nd_plugin.pruning.synthetic import synthetic_gates


class TinyNet(nn.Module):
    """A CIFAR-like plain conv net: stem, three conv-bn-relu blocks (one pooled), GAP, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(24)
        self.pool = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(24, 32, 3, padding=1)
        self.b3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.b1(self.c1(x)))
        x = self.pool(F.relu(self.b2(self.c2(x))))
        x = F.relu(self.b3(self.c3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyResNet(nn.Module):
    """Stem and one residual block: the block's second conv shares its channels with the stem."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "tiny":
        model = TinyNet()
    elif kind == "tinyres":
        model = TinyResNet()
    elif kind == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
    elif kind == "cifar:resnet20":
        adapters = pytest.importorskip("nd_plugin.adapters")
        model = adapters.create_model("cifar:resnet20", num_classes=10)
    else:  # pragma: no cover
        raise ValueError(kind)
    _randomise_bn(model, torch.Generator().manual_seed(1))
    return model.eval()


def real_images(n: int = 32, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images: scikit-learn's bundled handwritten digits, upsampled to RGB ``size x size``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:n], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.3) / 0.4, torch.tensor(digits.target[:n])


def decoupled(kind: str, seed: int = 0, sites: str = "internal"):
    model = make_model(kind)
    x, y = real_images()
    dm = nd_plugin.wrap(model, x[:1], sites=sites).eval()
    synthetic_gates(dm, x, seed=seed)  # a third silent, a third energetic, a third dynamic
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)]
    stats = dm.paths(loader, raw=True)
    return dm, stats, x


MODELS = ["tiny", "resnet18", "cifar:resnet20"]


@pytest.fixture(scope="module", params=MODELS)
def pruned(request):
    dm, stats, x = decoupled(request.param)
    return dm, stats, x, prune(dm, stats)


def test_compact_predictions_equal_gated(pruned) -> None:
    dm, stats, x, compact = pruned
    with torch.no_grad():
        gated, small = dm(x), compact(x)
    assert torch.allclose(small, gated, rtol=1e-4, atol=1e-4 * gated.abs().max().item())
    assert torch.equal(small.argmax(1), gated.argmax(1))
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in dm.parameters())


def test_states_follow_frequencies(pruned) -> None:
    dm, stats, _, compact = pruned
    record = compact.record
    freq = stats.frequency()
    assert record.summary()["removed"] > 0
    for name in record.sites:
        f = freq[stats.layer_slice(name)]
        kept = record.kept[name]
        info = next(s for s in dm.gate_sites if s.name == name)
        if info.internal:  # nothing else produces these channels: exactly the silent ones go
            expected = [i for i in range(len(f)) if f[i] > 0] or [int(np.argmax(f))]
            assert kept == expected
        site = compact.model.get_submodule(name)
        if name in record.static:
            assert isinstance(site, FixedSite) and np.all(f[kept] == 1.0)
        else:
            assert isinstance(site, GatedSite) and site.out_channels == len(kept)
            assert site.acm.fc2.out_features == len(kept)
    assert [s.name for s in compact.gate_sites] == record.dynamic


def test_acm_input_columns_follow_pruned_inputs() -> None:
    dm, stats, _ = decoupled("tiny")
    compact = prune(dm, stats)
    for name in compact.record.sites:
        site = compact.model.get_submodule(name)
        if isinstance(site, GatedSite):
            assert site.acm.fc1.in_features == site.conv.in_channels
    assert compact.model.c2.conv.in_channels == len(compact.record.kept["c1"])


def test_compact_stats_match_compact_paths(pruned) -> None:
    _, stats, x, compact = pruned
    loader = [(x[i : i + 16], torch.zeros(len(x[i : i + 16]), dtype=torch.long)) for i in range(0, len(x), 16)]
    again = compact.paths(loader)
    restricted = compact.compact_stats(stats)
    assert restricted.site_channels == again.site_channels
    np.testing.assert_array_equal(restricted.counts, again.counts)


def test_importance_scores_are_group_max_frequency() -> None:
    dm, stats, _ = decoupled("tiny")
    imp = DecouplingImportance(stats)
    dg = dm.dependency_graph()
    conv = dm.model.c1.conv
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    score = imp(group)
    np.testing.assert_allclose(score.numpy(), stats.frequency()[stats.layer_slice("c1")], rtol=1e-6)
    # a group without a gate has no evidence: torch-pruning skips it
    stem = dg.get_pruning_group(dm.model.stem[0], tp.prune_conv_out_channels, idxs=list(range(8)))
    assert imp(stem) is None


def test_importance_plugs_into_torch_pruning_pruner() -> None:
    dm, stats, x = decoupled("tiny")
    with torch.no_grad():
        before = dm(x)
    imp = DecouplingImportance(stats)
    with torch.enable_grad():  # tracing follows autograd (the gate's straight-through term)
        pruner = tp.pruner.MetaPruner(dm.model, x[:1], importance=imp, pruning_ratio=0.25, ignored_layers=[dm.model.fc])
        pruner.step()
    assert dm.model.c1.conv.out_channels == 12 and dm.model.c1.acm.fc2.out_features == 12
    with torch.no_grad():  # a third of the filters were silent: removing a quarter, ranked by us, is lossless
        assert torch.allclose(dm(x), before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_coupled_channels_go_only_when_silent_everywhere() -> None:
    dm, stats, x = decoupled("tinyres", sites="all")
    compact = prune(dm, stats)
    with torch.no_grad():
        assert torch.allclose(compact(x), dm(x), rtol=1e-4, atol=1e-4 * dm(x).abs().max().item())
    residual = [s for s in dm.gate_sites if not s.internal]
    assert residual
    for info in residual:  # an ungated stem feeds the residual stream: its channels always stay
        assert compact.record.kept[info.name] == list(range(info.channels))


def test_tolerance_must_be_below_one_half() -> None:
    dm, stats, _ = decoupled("tiny")
    for bad in (-0.1, 0.5, 1.0, 2):
        with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
            prune(dm, stats, tolerance=bad)


@pytest.mark.parametrize("tolerance", [0.0, 0.2, 0.49])
def test_tolerance_removes_exactly_the_rare_filters(tolerance: float) -> None:
    dm, stats, _ = decoupled("tiny")  # plain net: each filter is its own group
    record = plan_record(dm, stats, tolerance)
    freq = stats.frequency()
    for site in dm.site_names:
        f = freq[stats.layer_slice(site)]
        rare = [i for i, v in enumerate(f) if v <= tolerance]
        if len(rare) == len(f):  # a layer keeps its most frequent filter
            rare.remove(int(np.argmax(f)))
        assert record.removed(site) == rare
        kept_energetic = all(f[i] >= 1 - tolerance for i in record.kept[site])
        assert (site in record.static) == kept_energetic


def test_stats_of_another_model_are_refused() -> None:
    dm, _, _ = decoupled("tiny")
    _, other, _ = decoupled("tinyres")
    with pytest.raises(StatsMismatchError, match="paths"):
        prune(dm, other)


def test_prune_leaves_the_decoupled_model_alone() -> None:
    dm, stats, x = decoupled("tiny")
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    prune(dm, stats)
    after = dm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("cache_size", [0, 8])
def test_dynamic_runtime_matches_compact(pruned, cache_size: int) -> None:
    _, _, x, compact = pruned
    rt = dynamic_runtime(compact, cache_size=cache_size)
    with torch.no_grad():
        ref = compact(x[:6])
        for i in range(6):  # batch 1: narrow tensors, sliced weights
            out = rt(x[i : i + 1])
            assert torch.allclose(out, ref[i : i + 1], rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        batched = rt(x[:6])  # batch > 1: masks
        assert torch.allclose(batched, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        if cache_size:
            rt(x[:1])
            assert rt.cache_stats()["hits"] > 0


def test_runtime_plan_is_narrow_where_channels_stay_local(pruned) -> None:
    _, _, _, compact = pruned
    plan = analyse(compact.model, [s.name for s in compact.gate_sites], compact.input_size)
    for info in compact.gate_sites:
        assert plan.sites[info.name].narrow == info.internal, plan.sites[info.name].reason


def test_fold_batchnorm_keeps_outputs() -> None:
    model = make_model("resnet18")
    x, _ = real_images(4)
    folded = fold_batchnorm(model, x[:1])
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_dynamic_runtime_padded_filter_blocks_match_compact(pruned, monkeypatch) -> None:
    from nd_plugin.pruning import runtime

    monkeypatch.setattr(runtime, "_ONEDNN_MIN_NUMEL", 0)  # pad every active set to a multiple of 8
    _, _, x, compact = pruned
    rt = dynamic_runtime(compact)
    with torch.no_grad():
        ref = compact(x[:6])
        for i in range(6):
            assert torch.allclose(rt(x[i : i + 1]), ref[i : i + 1], rtol=1e-4, atol=1e-4 * ref.abs().max().item())
