"""What several test modules share: small networks, real images, decoupled models with known
gates, and the benchmark scripts as modules.

pytest puts this folder on ``sys.path`` when it collects the tests beside it (its default
``prepend`` import mode; there is no ``tests/__init__.py``), so a test module imports these with
``from _helpers import ...``; no test edits ``sys.path`` itself. Fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import nd_plugin
from nd_plugin.pruning.synthetic import synthetic_gates

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


#: the benchmarks' shared modules, in import order (``_tp_baselines`` imports ``_suite``)
_SHARED = ("_suite", "_tp_baselines")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as a module, loaded from its file (the folder is not a package).

    The scripts import their shared code with ``from _suite import ...`` (and ``_tp_baselines``), so
    those modules are loaded the same way first, as ``sys.modules["_suite"]`` etc. (once; later loads
    reuse them). The
    script is registered as ``sys.modules["benchmarks.NAME"]`` while it runs (its dataclasses look
    their module up there) and loaded afresh by each call.
    """
    for shared in _SHARED:
        if shared not in sys.modules:
            _load(BENCHMARKS / f"{shared}.py", shared)
    return _load(BENCHMARKS / f"{name}.py", f"benchmarks.{name}")


def _load(file: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None, file
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ----------------------------------------------------------------------------------- networks
class ResidualTinyNet(nn.Module):
    """conv-bn-relu x3 with a residual add around the last conv."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return self.fc(x.mean((2, 3)))


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


def tiny_parts(cfg: nd_plugin.TrainConfig) -> tuple[nd_plugin.DecoupledModel, Any]:
    """``cfg``'s model wrapped at 32×32 and its data (the data set's own seed; the model's weights drawn as torch's RNG stands)."""
    from nd_plugin.adapters import create_model
    from nd_plugin.data import load_data

    data = load_data(cfg.data)
    return nd_plugin.wrap(create_model(cfg.model, num_classes=data.num_classes), torch.zeros(1, 3, 32, 32)), data


def tiny_trainer(cfg: nd_plugin.TrainConfig, out: Path | None = None) -> nd_plugin.Trainer:
    """A quiet :class:`~nd_plugin.Trainer` for ``cfg`` (resolved) on its data, the model wrapped at 32×32."""
    return nd_plugin.Trainer(*tiny_parts(cfg), cfg, out, progress=False)


def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
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
    elif kind == "squeezenet":  # Fire modules: each concatenates two expand convs
        model = torchvision.models.squeezenet1_0(num_classes=10)
    elif kind == "cifar:resnet20":
        adapters = pytest.importorskip("nd_plugin.adapters")
        model = adapters.create_model("cifar:resnet20", num_classes=10)
    else:  # pragma: no cover
        raise ValueError(kind)
    randomise_bn(model, torch.Generator().manual_seed(1))
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


# --- adversarial detection (tests/test_detect*.py) ------------------------------------------

#: The normalisation of the detection tests' toy images (CIFAR's).
DETECT_MEAN = (0.485, 0.456, 0.406)
DETECT_STD = (0.229, 0.224, 0.225)


def _detect_stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class DetectTiny(nn.Module):
    """Stem and two stages named like a ResNet's (Lee's feature sites: input:layer1, layer1, layer2)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.stem, self.layer1, self.layer2 = _detect_stage(3, 8), _detect_stage(8, 16), _detect_stage(16, 16)
        self.fc = nn.Linear(16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def detect_toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 8×8 images: which colour channel is brightened. Normalised like CIFAR."""
    from nd_plugin.detect import to_normalised

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    px = 0.7 * torch.rand(n, 3, 8, 8, generator=g)
    px[torch.arange(n), y] += 0.3
    return to_normalised(px, DETECT_MEAN, DETECT_STD), y


def detect_model() -> nn.Module:
    """A :class:`DetectTiny` trained a few steps on :func:`detect_toy_data`, wrapped with every site gated
    and ACMs that actually read their input (non-trivial gates); eval mode, seeded."""
    torch.manual_seed(0)
    net = DetectTiny()
    x, y = detect_toy_data(256, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(30):  # a few steps: a classifier whose predictions depend on the input
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    model = nd_plugin.wrap(net.eval(), torch.randn(1, 3, 8, 8), sites="all")
    for site in model.sites():
        nn.init.normal_(site.acm.fc1.weight, std=1.0)
        nn.init.normal_(site.acm.fc2.weight, std=3.0)
        nn.init.constant_(site.acm.fc2.bias, 0.5)
    return model.eval()


def detect_clean_set(dm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """480 toy inputs labelled with the model's own predictions: a "clean" set it classifies correctly."""
    x, _ = detect_toy_data(480, seed=1)
    with torch.no_grad():
        y = dm(x).argmax(1)
    assert len(set(y.tolist())) == 3
    return x, y


def fake_detect_run(path: Path, dm: nn.Module, checkpoint: bool = True) -> Path:
    """A run directory with a real config and checkpoint; its model and data are the tiny ones
    (monkeypatch ``Run.build_model`` and ``Run.data``, e.g. with :class:`DetectBundle`)."""
    import json

    cfg = {"model": "tiny", "num_classes": 3, "data": "tiny", "input_size": [3, 8, 8], "sites": dm.site_names,
           "mean": list(DETECT_MEAN), "std": list(DETECT_STD)}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    if checkpoint:
        loss = {f"classifiers.{l}.weight": torch.randn(3, s.acm.fc2.out_features) for l, s in enumerate(dm.sites())}
        torch.save({"model": dm.state_dict(), "loss": loss, "epoch": 1}, path / "checkpoint.pt")
    return path


class DetectBundle:
    """The toy inputs as a data bundle: the same tensors as the training and the validation split."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from torch.utils.data import TensorDataset

        self.train = TensorDataset(x, y)
        self.val = TensorDataset(x, y)
        self.mean, self.std = DETECT_MEAN, DETECT_STD
