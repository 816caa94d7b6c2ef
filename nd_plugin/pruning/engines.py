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

ONNX Runtime is timed the way it is deployed by :func:`onnx_latency`: the models are exported
once and their sessions alternate in a fresh Python process that imports no torch
(:mod:`nd_plugin.pruning.ort_timing`), one per setting of :func:`onnx_settings` (intra-op
threads, idle workers spinning or not), so neither torch's threads nor another session's spinning
workers take the cores from the session being timed.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    >>> fn = engine_runner("eager", net, torch.zeros(1, 3, 8, 8))
    >>> sorted(side_by_side({"a": fn, "b": fn}, [torch.zeros(1, 3, 8, 8)], repeats=3))
    ['a', 'b']
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nd_plugin.errors import ConfigError, ExportError
from nd_plugin.pruning import ort_timing

__all__ = [
    "ENGINES",
    "SPINNING",
    "aoti_package",
    "check_engines",
    "check_spinning",
    "check_threads",
    "describe_settings",
    "engine_runner",
    "onnx_bytes",
    "onnx_latency",
    "onnx_settings",
    "side_by_side",
]

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


def onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """``module`` exported to ONNX (input ``input``, output ``logits``, the batch axis dynamic)."""
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
            dynamo=False,  # the TorchScript exporter needs no onnxscript rewrite of the gate ops
        )
    return buffer.getvalue()


def _onnx_session(module: nn.Module, example: torch.Tensor, threads: int | None, spinning: bool) -> Callable[[torch.Tensor], Any]:
    session = ort_timing.ort_session(onnx_bytes(module, example), threads, spinning)

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
    engine: str, module: nn.Module, example: torch.Tensor, threads: int | None = None, spinning: bool = False
) -> Callable[[torch.Tensor], Any]:
    """A callable that runs ``module`` on ``engine`` (``example`` fixes the input shape to export or compile).

    Args:
        engine: one of :data:`ENGINES` (or an alias such as ``ort``).
        module: an eval-mode module (``aoti``: no parameter may need a gradient).
        example: an input of the shape the callable will see.
        threads: ONNX Runtime's intra-op threads (PyTorch's are ``torch.set_num_threads``).
        spinning: ONNX Runtime's idle workers spin. Off by default: sessions alternating in one
            process would compete with each other's spinning workers; to time ONNX Runtime as
            deployed use :func:`onnx_latency`.
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
    return _onnx_session(module, example, threads, spinning)


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
    with torch.inference_mode():
        return ort_timing.alternate(fns, inputs, repeats, warmup)


SPINNING = ("auto", "on", "off")


def check_threads(threads: int | None) -> int | None:
    """``threads`` if it is None or a positive integer.

    Raises:
        ConfigError: anything else (the message names ``threads``).

    Example:
        >>> check_threads(2), check_threads(None)
        (2, None)
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(
            f"threads must be a positive integer (or None: leave torch's setting), got {threads!r}.", params=("threads",)
        )
    return threads


def check_spinning(onnx_spinning: str) -> str:
    """``onnx_spinning`` normalised (``"ON"`` -> ``"on"``) if it is one of :data:`SPINNING`.

    Raises:
        ConfigError: anything else (the message names ``onnx_spinning``).

    Example:
        >>> check_spinning(" Auto ")
        'auto'
    """
    choice = str(onnx_spinning).strip().lower()
    if choice not in SPINNING:
        raise ConfigError(
            f"onnx_spinning must be one of {', '.join(SPINNING)}; got {onnx_spinning!r}.", params=("onnx_spinning",)
        )
    return choice


def describe_settings(settings: Mapping[str, Any]) -> str:
    """How an engine was timed, in words (for the latency tables).

    Example:
        >>> describe_settings({"threads": 2, "spinning": True, "process": "own"})
        '2 threads, spinning, own process'
        >>> describe_settings({"threads": 1, "spinning": None, "process": "caller"})
        '1 thread'
    """
    threads = settings.get("threads")
    words = [f"{threads} thread{'' if threads == 1 else 's'}"]
    if settings.get("spinning") is not None:
        words.append("spinning" if settings["spinning"] else "no spinning")
    if settings.get("process") == "own":
        words.append("own process")
    return ", ".join(words)


def onnx_settings(threads: int, onnx_spinning: str = "auto") -> list[dict[str, Any]]:
    """The ONNX Runtime settings to time: ``threads`` intra-op threads, spinning as asked, and 1 thread.

    With one thread ONNX Runtime has no worker thread, so spinning does not apply (``None``).

    Args:
        threads: the intra-op threads asked for.
        onnx_spinning: ``auto`` (time spinning on and off), ``on`` or ``off``.

    Returns:
        ``{"threads", "spinning"}`` per setting, ``threads`` first, 1 thread last.

    Raises:
        ConfigError: ``threads`` not a positive integer, ``onnx_spinning`` not one of :data:`SPINNING`.

    Example:
        >>> onnx_settings(2)
        [{'threads': 2, 'spinning': True}, {'threads': 2, 'spinning': False}, {'threads': 1, 'spinning': None}]
        >>> onnx_settings(2, "off")
        [{'threads': 2, 'spinning': False}, {'threads': 1, 'spinning': None}]
    """
    if check_threads(threads) is None:
        raise ConfigError("threads must be a positive integer for ONNX Runtime's settings, got None.", params=("threads",))
    choice = check_spinning(onnx_spinning)
    if threads == 1:
        return [{"threads": 1, "spinning": None}]
    spins = {"auto": (True, False), "on": (True,), "off": (False,)}[choice]
    return [{"threads": threads, "spinning": s} for s in spins] + [{"threads": 1, "spinning": None}]


def onnx_latency(
    modules: Mapping[str, nn.Module],
    inputs: Sequence[torch.Tensor],
    settings: Sequence[Mapping[str, Any]],
    repeats: int = 20,
    warmup: int = 3,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """ONNX Runtime latency of each module, as deployed: sessions alternating in a process of their own.

    Each module is exported once; a fresh Python process that imports no torch builds a session
    of each per setting and calls them in turn on the same inputs (median ms). A setting with
    spinning workers (several threads) gets a process of its own, its sessions sharing one global
    pool; the other settings share one process, each session with its own pool.

    Args:
        modules: name -> eval-mode module.
        inputs: inputs of one shape (the first is the export's example).
        settings: ``{"threads": int, "spinning": bool | None}`` each (:func:`onnx_settings`).
        repeats: timed rounds per setting (each calls every module once).
        warmup: untimed rounds first.
        timeout: seconds a timing process may take.

    Returns:
        One ``{"threads", "spinning", "pool", "process": "own", "ms": {name: median ms}}`` per
        setting, in the order given.

    Raises:
        ConfigError: no input, or a bad setting.
        ExportError: the timing process failed (the message holds its last line).
    """
    if not inputs:
        raise ConfigError("onnx_latency needs at least one input.")
    for k, setting in enumerate(settings):
        threads = setting.get("threads")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"settings[{k}]['threads'] must be a positive integer, got {threads!r}.", params=("settings",))
    shared = [i for i, s in enumerate(settings) if s.get("spinning") and s["threads"] > 1]
    groups = [[i for i in range(len(settings)) if i not in shared], *([i] for i in shared)]
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="nd-ort-") as tmp:
        folder = Path(tmp)
        files = {name: f"model{k}.onnx" for k, name in enumerate(modules)}
        for name, module in modules.items():
            (folder / files[name]).write_bytes(onnx_bytes(module.eval(), inputs[0]))
        np.save(folder / "inputs.npy", torch.stack([x.detach().cpu() for x in inputs]).numpy())
        for n, group in enumerate(g for g in groups if g):
            spec = {
                "models": files,
                "inputs": "inputs.npy",
                "settings": [{"threads": settings[i]["threads"], "spinning": settings[i].get("spinning")} for i in group],
                "repeats": repeats,
                "warmup": warmup,
            }
            (folder / f"spec{n}.json").write_text(json.dumps(spec), encoding="utf-8")
            for i, row in zip(group, _timing_process(folder / f"spec{n}.json", timeout), strict=True):
                results[i] = {**row, "process": "own"}
    return [results[i] for i in range(len(settings))]


def _timing_process(spec: Path, timeout: float) -> list[dict[str, Any]]:
    """Runs :mod:`ort_timing` as a file on ``spec`` in a fresh interpreter (cwd: the spec's folder)."""
    # run as a file, not as nd_plugin.pruning.ort_timing: importing the package would import torch
    code = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    command = [sys.executable, "-c", code, ort_timing.__file__, spec.name]
    try:
        done = subprocess.run(command, cwd=spec.parent, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExportError(f"timing ONNX Runtime in a process of its own failed: {exc}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ExportError(f"timing ONNX Runtime in a process of its own failed (exit {done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])
