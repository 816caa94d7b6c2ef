"""The engines a compact model ships to, and latency measured side by side on one of them.

An *engine* turns a module into a callable on CPU tensors:

- ``eager``: the module itself (PyTorch's eager kernels);
- ``compile``: ``torch.compile`` (Inductor; needs a C++ compiler), shapes specialised;
- ``onnx``: the module exported to ONNX and run by ONNX Runtime (``onnxruntime``);
- ``aoti``: AOTInductor, ``torch.export`` compiled ahead of time into a shared library packaged as
  ``.pt2`` (needs a C++ compiler; compiling takes minutes on a small CPU).

Only ``eager`` can skip filters per input (the dynamic runtime); the other engines get the static
compact model. :func:`side_by_side` times several callables alternately on the same inputs, so a
ratio between two of them is not skewed by the machine's load drifting between runs.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    >>> fn = engine_runner("eager", net, torch.zeros(1, 3, 8, 8))
    >>> sorted(side_by_side({"a": fn, "b": fn}, [torch.zeros(1, 3, 8, 8)], repeats=3))
    ['a', 'b']
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nd_plugin.errors import ConfigError, ExportError

__all__ = ["ENGINES", "aoti_package", "check_engines", "engine_runner", "side_by_side"]

ENGINES = ("eager", "compile", "onnx", "aoti")
_ALIASES = {"torch": "eager", "ort": "onnx", "onnxruntime": "onnx", "inductor": "compile", "aotinductor": "aoti", "aot": "aoti"}
_NEEDS = {"onnx": ("onnxruntime", "pip install onnxruntime")}
_NEEDS_COMPILER = ("compile", "aoti")


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)


def check_engines(names: Iterable[str]) -> tuple[str, ...]:
    """Normalises engine names (``ort`` -> ``onnx``) and checks that each is known and installed.

    Raises:
        ConfigError: an unknown name.
        ExportError: the engine's package is not installed (the message says what to install).

    Example:
        >>> check_engines(["eager", "ort"])
        ('eager', 'onnx')
    """
    out: list[str] = []
    for raw in names:
        name = _ALIASES.get(str(raw).strip().lower(), str(raw).strip().lower())
        if name not in ENGINES:
            known = ", ".join(ENGINES + tuple(_ALIASES))
            raise ConfigError(f"unknown engine {raw!r}; choose from {known}.")
        if name in _NEEDS and importlib.util.find_spec(_NEEDS[name][0]) is None:
            package, fix = _NEEDS[name]
            raise ExportError(
                f"engine {raw!r} needs {package}, which is not installed; {fix}, or leave it out of engines.", params=("engines",)
            )
        if name in _NEEDS_COMPILER and _compiler() is None:
            raise ExportError(
                f"engine {raw!r} needs a C++ compiler (c++, g++ or clang++ on PATH, or $CXX); install one, or leave it out of engines.",
                params=("engines",),
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def _onnx_session(module: nn.Module, example: torch.Tensor, threads: int | None) -> Callable[[torch.Tensor], Any]:
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> Any:
        return session.run(None, {"input": x.numpy()})[0]

    return run


def aoti_package(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, dynamic_batch: bool = True) -> str:
    """Compiles ``module`` with AOTInductor into the package ``path`` (a ``.pt2`` zip: no pickles).

    Load it with ``torch._inductor.aoti_load_package(path)``, which returns a callable.

    Args:
        module: an eval-mode module without parameters that need gradients.
        example: an input of the shape to compile for (batch at least 2 when ``dynamic_batch``).
        path: the package file to write.
        dynamic_batch: compile for any batch size from 1 to 4096 instead of ``example``'s.
    """
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with torch.no_grad():
        program = torch.export.export(module.eval(), (example,), dynamic_shapes=shapes)
        return str(torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path)))


def engine_runner(
    engine: str, module: nn.Module, example: torch.Tensor, threads: int | None = None
) -> Callable[[torch.Tensor], Any]:
    """A callable that runs ``module`` on ``engine`` (``example`` fixes the input shape to export or compile).

    Args:
        engine: one of :data:`ENGINES` (or an alias such as ``ort``).
        module: an eval-mode module (``aoti``: no parameter may need a gradient).
        example: an input of the shape the callable will see.
        threads: ONNX Runtime's intra-op threads (PyTorch's are ``torch.set_num_threads``).
    """
    (engine,) = check_engines([engine])
    module = module.eval()
    if engine == "eager":
        return module
    if engine == "compile":
        compiled = torch.compile(module, dynamic=False)
        with torch.inference_mode():
            compiled(example)  # compile now, not inside the timing
        return compiled
    if engine == "aoti":
        with tempfile.TemporaryDirectory() as tmp:  # the loaded package no longer needs its file
            return torch._inductor.aoti_load_package(
                aoti_package(module, example, os.path.join(tmp, "model.pt2"), dynamic_batch=False)
            )
    return _onnx_session(module, example, threads)


def side_by_side(
    fns: Mapping[str, Callable[[torch.Tensor], Any]], inputs: Sequence[torch.Tensor], repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median milliseconds per callable, called in turn on the same inputs (after ``warmup`` rounds).

    Args:
        fns: name -> callable.
        inputs: the inputs, cycled through.
        repeats: timed rounds (each calls every callable once).
        warmup: untimed rounds first.

    Returns:
        name -> median ms.
    """
    if not inputs:
        raise ConfigError("side_by_side needs at least one input.")
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            x = inputs[i % len(inputs)]
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
