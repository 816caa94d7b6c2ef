"""Pruning: DecouplingImportance, permanent removal, compact == gated, the dynamic runtime.

Gates are made non-trivial without training: for each gated layer a third of the filters get a
very negative ACM ``fc2`` bias (silent), a third a very positive one (energetic) and the rest
random weights and no bias (dynamic). Inputs are real images (scikit-learn's digits, 32x32 RGB).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch_pruning as tp
from _helpers import decoupled, make_model, real_images
from torch import nn

from nd_plugin.errors import ConfigError, StatsMismatchError
from nd_plugin.gates import GatedSite
from nd_plugin.pruning import (
    DecouplingImportance,
    FixedSite,
    apply_record,
    dynamic_runtime,
    fold_batchnorm,
    plan_record,
    prune,
    static_record,
)
from nd_plugin.pruning.plan import analyse

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


def _removed_by_torch_pruning(dm, record):
    """The record applied as torch-pruning prunes: a graph of a copy, one group after the other."""
    ref = copy.deepcopy(dm)
    dg = ref.dependency_graph()
    convs = {ref.model.get_submodule(s).conv: s for s in ref.site_names}
    done: set[str] = set()
    for name in ref.site_names:
        if name in done or not record.removed(name):
            continue
        group = dg.get_pruning_group(ref.model.get_submodule(name).conv, tp.prune_conv_out_channels, idxs=record.removed(name))
        done |= {convs[d.target.module] for d, _ in group if d.target.module in convs and dg.is_out_channel_pruning_fn(d.handler)}
        group.prune()
    return ref.model.state_dict()


@pytest.mark.parametrize(("kind", "sites"), [("tinyres", "all"), ("cifar:resnet20", "internal"), ("squeezenet", "all")])
def test_one_graph_of_the_decoupled_model_prunes_every_copy(kind: str, sites: str) -> None:
    """apply_record reads the removal from the graph of ``dm`` and applies it to a copy: the weights
    are those torch-pruning gives on a graph of the copy, with channels shared by an addition
    (tinyres, resnet20) or concatenated (squeezenet's Fire modules)."""
    dm, stats, _ = decoupled(kind, sites=sites)
    dg = dm.dependency_graph()
    for record in (plan_record(dm, stats, dg=dg), static_record(dm, stats, round_to=8, dg=dg)):
        got = apply_record(dm, record, dg=dg).model.state_dict()
        want = _removed_by_torch_pruning(dm, record)
        common = set(got) & set(want)
        assert len(common) > 0.9 * len(got)  # all but the ACMs of the gates that were dropped
        assert all(torch.equal(got[k], want[k]) for k in common)


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
