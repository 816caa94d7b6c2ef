"""Tests of the model registry, the CIFAR zoo and checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nd_plugin.adapters import (
    CIFAR_MODELS,
    cifar_resnet20,
    create_model,
    default_input_size,
    list_models,
    load_checkpoint,
    resolve_name,
)
from nd_plugin.adapters.cifar import BasicBlock, CifarResNet, ShortcutA
from nd_plugin.errors import CheckpointMismatchError, ConfigError, NDError, UnknownModelError


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- registry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, qualified",
    [
        ("cifar:resnet20", "cifar:resnet20"),
        ("tv:resnet18", "tv:resnet18"),
        ("torchvision:resnet18", "tv:resnet18"),
        ("timm:resnet18", "timm:resnet18"),
        ("TIMM:resnet18", "timm:resnet18"),
        ("resnet56", "cifar:resnet56"),  # CIFAR zoo first
        ("vgg16_bn", "cifar:vgg16_bn"),  # ... even where torchvision and timm have the name too
        ("resnet18", "tv:resnet18"),  # then torchvision (timm has it as well)
        ("mobilenet_v2", "tv:mobilenet_v2"),
        ("efficientnet_b0", "tv:efficientnet_b0"),
        ("resnet18d", "timm:resnet18d"),  # then timm
        ("resnet18.a1_in1k", "timm:resnet18.a1_in1k"),  # timm pretrained tags
    ],
)
def test_resolve_name(name: str, qualified: str) -> None:
    assert resolve_name(name) == qualified


def test_unknown_bare_name_lists_candidates() -> None:
    with pytest.raises(UnknownModelError) as info:
        resolve_name("resnt18")
    msg = str(info.value)
    assert "resnt18" in msg and "tv:resnet18" in msg and "nd models" in msg
    assert "\n" not in msg
    assert isinstance(info.value, NDError)


def test_partial_name_is_not_guessed() -> None:
    """A prefix of several names ('resnet') is not resolved to one of them; candidates listed."""
    with pytest.raises(UnknownModelError) as info:
        create_model("resnet")
    cands = str(info.value).split("close matches:")[1].split(";")[0].split(", ")
    assert 1 <= len(cands) <= 8
    assert all("resnet" in c for c in cands)


def test_unknown_name_without_candidates() -> None:
    with pytest.raises(UnknownModelError, match="nd models"):
        resolve_name("qqqzzzxxx")


def test_unknown_prefix_lists_sources() -> None:
    with pytest.raises(UnknownModelError, match="known sources: registered, cifar, tv, timm .*, module:PKG.MOD:FN"):
        resolve_name("hub:resnet18")


def test_qualified_name_missing_from_its_source() -> None:
    with pytest.raises(UnknownModelError, match="source 'cifar'.*cifar:resnet20"):
        resolve_name("cifar:resnet21")
    with pytest.raises(UnknownModelError):
        resolve_name("tv:resnet18d")  # timm-only name asked of torchvision


@pytest.mark.parametrize("bad", ["", "   ", "tv:"])
def test_empty_names(bad: str) -> None:
    with pytest.raises(UnknownModelError):
        resolve_name(bad)


def test_list_models_patterns() -> None:
    everything = list_models()
    assert len(everything) > 1000 and len(everything) == len(set(everything))
    assert everything[: len(CIFAR_MODELS)] == [f"cifar:{n}" for n in sorted(CIFAR_MODELS)]
    r18 = list_models("resnet18")
    assert r18 == ["tv:resnet18", "timm:resnet18"]
    assert list_models("cifar:*") == [f"cifar:{n}" for n in sorted(CIFAR_MODELS)]
    assert all(n.startswith("tv:") for n in list_models("tv:*"))
    assert "cifar:resnet110" in list_models("RESNET1*")  # case-insensitive
    assert list_models("no-such-model-*") == []


def test_create_model_sources_and_num_classes() -> None:
    torch.manual_seed(0)
    tv = create_model("resnet18", num_classes=7)
    assert type(tv).__module__.startswith("torchvision") and tv.fc.out_features == 7
    tm = create_model("timm:resnet18", num_classes=5)
    assert type(tm).__module__.startswith("timm") and tm.get_classifier().out_features == 5
    cz = create_model("cifar:resnet20", num_classes=100)
    assert cz.linear.out_features == 100
    assert create_model("cifar:resnet20").linear.out_features == 10  # default
    assert create_model("tv:resnet18").fc.out_features == 1000


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_create_model_rejects_bad_num_classes(bad: object) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("cifar:resnet20", num_classes=bad)  # type: ignore[arg-type]


def test_cifar_model_without_published_weights() -> None:
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_model("cifar:vgg16_bn", pretrained=True)


def test_default_input_size() -> None:
    assert default_input_size(create_model("cifar:resnet20")) == (3, 32, 32)
    assert default_input_size(create_model("cifar:vgg16_bn")) == (3, 32, 32)
    assert default_input_size(create_model("tv:resnet18")) == (3, 224, 224)
    tm = create_model("timm:resnet18")
    assert default_input_size(tm) == tuple(tm.pretrained_cfg["input_size"]) == (3, 224, 224)
    # the channel count comes from the first conv
    gray = create_model("tv:resnet18")
    gray.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    assert default_input_size(gray) == (1, 224, 224)
    assert default_input_size(CifarResNet(20, in_chans=1)) == (1, 32, 32)


# --- CIFAR zoo ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    [
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet44", 658_586),
        ("resnet56", 853_018),
        ("resnet110", 1_727_962),
        ("vgg16_bn", 14_728_266),
    ],
)
def test_cifar_zoo_shapes_and_parameter_counts(name: str, params: int) -> None:
    torch.manual_seed(0)
    model = CIFAR_MODELS[name]().eval()
    assert n_params(model) == params
    assert model.default_input_size == (3, 32, 32)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_layout_matches_public_checkpoints() -> None:
    model = cifar_resnet20()
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer3.2.bn2.bias", "linear.weight"} <= keys
    top = {"conv1", "bn1", "layer1", "layer2", "layer3", "linear"}
    assert {k.split(".")[0] for k in keys} == top
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [3, 3, 3]
    assert isinstance(model.layer2[0].shortcut, ShortcutA)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)
    assert isinstance(model.layer1[0].relu1, nn.ReLU)


def test_shortcut_a_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    assert not list(ShortcutA(16, 32).parameters())


def test_basic_block_forward_order() -> None:
    torch.manual_seed(0)
    block = BasicBlock(8, 8).eval()
    x = torch.randn(1, 8, 6, 6)
    expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))) + x)
    with torch.no_grad():
        assert torch.allclose(block(x), expected)


def test_cifar_resnet_rejects_bad_depth() -> None:
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(21)


# --- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module_prefix"])
def test_load_checkpoint_layouts(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    src = cifar_resnet20()
    sd = src.state_dict()
    obj = {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3, "best_prec1": 91.0},
        "model": {"model": sd, "optimizer": {}},
        "module_prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    torch.manual_seed(1)
    dst = load_checkpoint(cifar_resnet20(), path)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(src.eval()(x), dst.eval()(x))


def test_create_model_with_checkpoint(tmp_path: Path) -> None:
    src = create_model("cifar:resnet20", num_classes=4)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "c.pt")
    dst = create_model("resnet20", num_classes=4, checkpoint=str(tmp_path / "c.pt"))
    assert torch.equal(dst.linear.weight, src.linear.weight)


def test_checkpoint_for_another_architecture(tmp_path: Path) -> None:
    torch.save(cifar_resnet20().state_dict(), tmp_path / "r20.pt")
    with pytest.raises(CheckpointMismatchError) as info:
        create_model("cifar:resnet32", checkpoint=tmp_path / "r20.pt")
    msg = str(info.value)
    assert "missing layer1.3" in msg and "another architecture" in msg and "\n" not in msg
    with pytest.raises(CheckpointMismatchError, match="unexpected layer1.3"):
        load_checkpoint(cifar_resnet20(), _save(tmp_path, create_model("cifar:resnet32")))
    with pytest.raises(CheckpointMismatchError, match="CifarVGG"):
        load_checkpoint(create_model("cifar:vgg16_bn"), tmp_path / "r20.pt")


def _save(tmp_path: Path, model: nn.Module) -> Path:
    path = tmp_path / f"{type(model).__name__}-{n_params(model)}.pt"
    torch.save(model.state_dict(), path)
    return path


def test_checkpoint_for_another_number_of_classes(tmp_path: Path) -> None:
    path = _save(tmp_path, cifar_resnet20(num_classes=10))
    expected = r"linear.weight: checkpoint \(10, 64\) vs model \(100, 64\)"
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_checkpoint(cifar_resnet20(num_classes=100), path)
    # non-strict: everything but the head is loaded
    model = load_checkpoint(cifar_resnet20(num_classes=100), path, strict=False)
    assert torch.equal(model.conv1.weight, torch.load(path, weights_only=True)["conv1.weight"])


def test_non_strict_load_with_nothing_in_common_still_fails(tmp_path: Path) -> None:
    path = _save(tmp_path, create_model("cifar:vgg16_bn"))
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(cifar_resnet20(), path, strict=False)


def test_checkpoint_missing_unsafe_or_not_a_state_dict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint not found"):
        load_checkpoint(cifar_resnet20(), tmp_path / "nope.pt")
    torch.save({"model": cifar_resnet20()}, tmp_path / "pickled.pt")  # a whole pickled module
    with pytest.raises(CheckpointMismatchError, match="holds pickled Python objects .*; nd-plugin loads tensors only") as info:
        load_checkpoint(cifar_resnet20(), tmp_path / "pickled.pt")
    assert "re-save its weights as tensors" in str(info.value) and "\n" not in str(info.value)
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointMismatchError, match="no state dict"):
        load_checkpoint(cifar_resnet20(), tmp_path / "meta.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="not a torch.save file"):
        load_checkpoint(cifar_resnet20(), tmp_path / "junk.pt")


# --- public weights in ../shared -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, file", [("resnet20", "resnet20-12fca82f.th"), ("resnet56", "resnet56-4bfd9763.th")]
)
def test_public_checkpoints_load(shared_dir: Path, name: str, file: str) -> None:
    path = shared_dir / "weights" / file
    if not path.is_file():
        pytest.skip(f"needs {path}")
    model = create_model(name, checkpoint=path)
    assert isinstance(model, CifarResNet) and model.depth == int(name[6:])


def _public_resnet20(shared_dir: Path) -> nn.Module:
    path = shared_dir / "weights" / "resnet20-12fca82f.th"
    if not path.is_file():
        pytest.skip(f"needs {path}")
    return create_model("cifar:resnet20", checkpoint=path).eval()


def _top1(model: nn.Module, dataset: torch.utils.data.Dataset) -> float:
    correct = 0
    with torch.inference_mode():
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=1000):
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(dataset)


def test_public_resnet20_on_a_sample_of_shared_jpeg_cifar10(shared_dir: Path) -> None:
    """Fast check: 2,000 test images (200 per class) read straight from the archive."""
    import io
    import tarfile

    from PIL import Image

    from nd_plugin.data import IMAGENET_MEAN, IMAGENET_STD, TensorImageDataset

    archive = shared_dir / "data" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"needs {archive}")
    model = _public_resnet20(shared_dir)
    images, labels = {}, {}
    with tarfile.open(archive, "r:gz") as tf:
        for member in tf:
            parts = Path(member.name).parts[-3:]
            if len(parts) == 3 and parts[0] == "test" and int(Path(parts[2]).stem) < 200:
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                with Image.open(io.BytesIO(data)) as im:
                    images[member.name] = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
                labels[member.name] = parts[1]
    classes = sorted(set(labels.values()))
    names = sorted(images)
    assert len(classes) == 10 and len(names) == 2000
    x = torch.stack([images[n] for n in names]).permute(0, 3, 1, 2).contiguous()
    y = [classes.index(labels[n]) for n in names]
    accuracy = _top1(model, TensorImageDataset(x, y, IMAGENET_MEAN, IMAGENET_STD))
    print(f"ResNet-20 top-1 on 2,000 shared JPEG CIFAR-10 test images: {accuracy:.2%}")
    assert accuracy >= 0.78


@pytest.mark.slow
def test_public_resnet20_accuracy_on_shared_jpeg_cifar10(
    shared_dir: Path, cifar10_jpeg: Path
) -> None:
    """The public ResNet-20 evaluates at >= 80% top-1 on the shared JPEG copy (README: 81.03%).

    Slow: extracting 60,000 files and evaluating 10,000 images takes ~40 s on an idle 2-core
    machine and several minutes on a busy one.
    """
    from nd_plugin.data import load_image_folder

    model = _public_resnet20(shared_dir)
    test = load_image_folder(cifar10_jpeg / "test")
    assert len(test) == 10_000
    accuracy = _top1(model, test)
    print(f"ResNet-20 top-1 on the shared JPEG CIFAR-10 test split: {accuracy:.2%}")
    assert accuracy >= 0.80


# ------------------------------------------------------------------ open registry: your own models
USER_MODULE = '''
from torch import nn

VALUE = 3


def make_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def not_a_module(num_classes: int = 10):
    return 42


def no_classes() -> nn.Module:
    return make_net()
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of factories written into tmp_path and put on sys.path; its (unique) name."""
    import sys

    name = f"nd_user_nets_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in (name, f"{name}_broken"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    return name


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """An empty registry of factories for the test (the process-wide one is put back after)."""
    from nd_plugin.adapters import registry as reg

    fresh: dict = {}
    monkeypatch.setattr(reg, "_REGISTERED", fresh)
    return fresh


def _tiny(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def test_register_model_by_name_first_in_the_lookup(registry: dict) -> None:
    from nd_plugin.adapters import register_model, unregister_model

    assert register_model("my_tiny", _tiny) is _tiny
    register_model("resnet20")(_tiny)  # as a decorator; a registered name comes before the CIFAR zoo
    assert resolve_name("my_tiny") == "registered:my_tiny" and resolve_name("resnet20") == "registered:resnet20"
    assert resolve_name("cifar:resnet20") == "cifar:resnet20"
    assert create_model("registered:my_tiny", num_classes=4)[-1].out_features == 4
    assert create_model("my_tiny")[-1].out_features == 10  # num_classes omitted: the factory's default
    assert list_models("registered:*") == ["registered:my_tiny", "registered:resnet20"]
    assert list_models("my_t*") == ["registered:my_tiny"]
    assert unregister_model("resnet20") is _tiny and resolve_name("resnet20") == "cifar:resnet20"
    with pytest.raises(UnknownModelError, match="no model named 'resnet20' is registered"):
        unregister_model("resnet20")


@pytest.mark.parametrize(
    "name, factory, match",
    [("my_tiny", _tiny, "a model named 'my_tiny' is already registered .*choose another name"),
     ("a:b", _tiny, "without ':'"), ("", _tiny, "non-empty"), ("ok", 3, "needs a callable")],
    ids=["duplicate", "colon", "empty", "not-callable"],
)  # fmt: skip
def test_register_model_bad_input(registry: dict, name: str, factory: object, match: str) -> None:
    from nd_plugin.adapters import register_model
    from nd_plugin.errors import ModelSourceError

    register_model("my_tiny", _tiny)
    with pytest.raises(ModelSourceError, match=match):
        register_model(name, factory)  # type: ignore[arg-type]
    assert registry == {"my_tiny": _tiny}  # nothing replaced


def test_module_spec_builds_the_users_network(user_module: str) -> None:
    spec = f"module:{user_module}:make_net"
    assert resolve_name(spec) == spec
    model = create_model(spec, num_classes=4)
    assert isinstance(model, nn.Sequential) and model[-1].out_features == 4


@pytest.mark.parametrize(
    "suffix, match",
    [(":make_net", "cannot import module '.*_missing' \\(ModuleNotFoundError"),
     ("_broken:make_net", "cannot import module '.*_broken' \\(RuntimeError: boom at import\\)"),
     (":nothing_here", "has no attribute 'nothing_here'; its callables: make_net, no_classes, not_a_module"),
     (":VALUE", "'VALUE' is a int, not a callable"),
     (":not_a_module", "not_a_module returned a int, not an nn.Module"),
     (":no_classes", "no_classes takes no 'num_classes' argument; a factory is called as factory\\(num_classes=K\\)"),
     ("", "is not of the form module:PKG.MOD:FN")],
    ids=["no-module", "import-raises", "no-attribute", "not-callable", "not-a-module", "no-num-classes", "malformed"],
)  # fmt: skip
def test_module_spec_bad_input_is_one_typed_error(user_module: str, suffix: str, match: str) -> None:
    from nd_plugin.errors import ModelSourceError

    spec = f"module:{user_module}{'_missing' if suffix == ':make_net' else ''}{suffix}"
    with pytest.raises(ModelSourceError, match=match) as info:
        create_model(spec, num_classes=3)
    assert isinstance(info.value, NDError) and "\n" not in str(info.value)


def test_module_spec_is_found_in_the_current_directory(user_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as for the `nd` script
    monkeypatch.chdir(tmp_path)
    assert create_model(f"module:{user_module}:make_net", num_classes=2)[-1].out_features == 2


def test_cli_decouple_trains_a_module_spec_and_models_lists_registered(
    user_module: str, registry: dict, tmp_path: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from nd_plugin.adapters import register_model
    from nd_plugin.cli._app import app

    spec, out = f"module:{user_module}:make_net", tmp_path / "run"
    args = ["decouple", spec, "--data", "synthetic:32", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16",
            "--out", str(out), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model"] == spec
    from nd_plugin.run import open_run

    assert open_run(out).build_model().site_names  # the later commands rebuild it from the spec
    bad = CliRunner().invoke(app, ["decouple", f"module:{user_module}:not_a_module", "--data", "synthetic:32", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "not an nn.Module" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    register_model("my_tiny", _tiny)
    listed = CliRunner().invoke(app, ["models", "registered:*"])
    assert listed.exit_code == 0 and listed.output.split() == ["registered:my_tiny"]


@pytest.mark.parametrize("drop, extra", [(True, False), (False, True)])
def test_published_cifar_weights_that_do_not_fit_are_refused(monkeypatch: pytest.MonkeyPatch, drop: bool, extra: bool) -> None:
    from nd_plugin.adapters import create_model
    from nd_plugin.errors import CheckpointMismatchError

    state = {f"module.{k}": v for k, v in create_model("cifar:resnet20").state_dict().items()}
    if drop:
        state.pop("module.linear.weight")
    if extra:
        state["module.extra.weight"] = torch.zeros(1)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: {"state_dict": state})
    with pytest.raises(CheckpointMismatchError, match="do not fit"):
        create_model("cifar:resnet20", pretrained=True)
