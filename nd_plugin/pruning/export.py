"""Export of compact models: weights + manifest, ``torch.export`` program, ONNX.

An export directory holds::

    manifest.json   what to rebuild: model name, classes, input size, prune records, which form
                    each engine gets
    weights.pt      the eager compact state dict (tensors only: ``torch.load(..., weights_only=True)``)
    static.pt       the static compact model's state dict (every gate dropped)
    model.pt2       ``torch.export`` program of the static compact model
    model.onnx      the same as ONNX (opset of the installed exporter)
    model_aoti.pt2  the same compiled by AOTInductor for this machine (only when asked for: it takes
                    minutes; ``torch._inductor.aoti_load_package`` loads it)
    prune.json      FLOPs, parameters, latency per engine, and the result of every export check

:func:`load` rebuilds either compact model from ``manifest.json`` and its weights without
unpickling any class (``nd prune``, which writes these directories, is
:func:`nd_plugin.commands.pruning.prune_run`). Every exported form is compared with the eager compact model on real inputs
before the directory appears; a directory is written under a temporary name next to the target
and renamed at the end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nd_plugin.errors import ExportError
from nd_plugin.files import atomic_dir, load_tensors, read_json, weights_mismatch
from nd_plugin.pruning.structural import CompactModel, PruneRecord, apply_record
from nd_plugin.run import PRUNE

__all__ = ["CHECK_RTOL", "FORMAT", "agreement", "check_export_dir", "export", "load"]

FORMAT = "nd-plugin-compact/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
STATIC_WEIGHTS = "static.pt"
PROGRAM = "model.pt2"
ONNX = "model.onnx"
AOTI = "model_aoti.pt2"
CHECK_RTOL = 1e-4  # the largest relative error (of the logits) an exported form may show


def check_export_dir(directory: str | os.PathLike, force: bool = False) -> Path:
    """Refuses an existing non-empty directory unless ``force``; returns the path."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"export target {directory} exists and is not a directory; choose another directory.")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ExportError(
            f"export directory {directory} exists and is not empty; pass force=True to replace it.", params=("force",)
        )
    return directory


def agreement(reference: torch.Tensor, got: torch.Tensor, *, strict: bool = True) -> dict[str, Any]:
    """How closely ``got`` (logits of an exported or compact form) follows ``reference``: the one check of every form.

    Args:
        reference: logits of the model the form was made from, ``(N, K)``.
        got: the form's logits on the same inputs.
        strict: whether the relative error must stay within :data:`CHECK_RTOL` for ``ok``
            (False: the error is reported, ``ok`` holds anyway, e.g. with a pruning tolerance).

    Returns:
        ``{"max_rel_err", "same_prediction", "strict", "ok"}``: the largest error relative to the
        largest reference logit, and the share of inputs whose top-1 class agrees.

    Example:
        >>> a = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
        >>> agreement(a, a + 1e-6)["ok"], agreement(a, a.flip(1))["same_prediction"]
        (True, 0.0)
    """
    err = float((reference - got).abs().max() / reference.abs().max().clamp_min(1e-12))
    same = float((reference.argmax(1) == got.argmax(1)).float().mean())
    return {"max_rel_err": err, "same_prediction": same, "strict": strict, "ok": err <= CHECK_RTOL or not strict}


def _check(name: str, reference: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    return {"format": name, **agreement(reference, got)}


def _frozen(compact: CompactModel) -> nn.Module:
    """The compact network for tracing: eval mode, no parameter needs a gradient."""
    import copy

    net = copy.deepcopy(compact.model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def export(
    compact: CompactModel,
    directory: str | os.PathLike,
    inputs: torch.Tensor,
    *,
    static: CompactModel | None = None,
    model_spec: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    force: bool = False,
    formats: Sequence[str] = ("weights", "pt2", "onnx"),
) -> dict[str, Any]:
    """Writes a compact model's export directory and checks every form against the eager model.

    ``torch.export`` and ONNX cannot skip filters per input. Given ``static`` (the compact model with
    every gate dropped, :func:`~nd_plugin.pruning.static_record`), ``model.pt2`` and ``model.onnx``
    hold that model, ``static.pt`` its weights, and the manifest's ``engines`` says which form each
    file is; without it they hold ``compact`` with its gates as masks (full width).

    Args:
        compact: the compact model (the eager runtime's form).
        directory: target directory (created; must be absent or empty unless ``force``).
        inputs: real inputs ``(N, C, H, W)`` for the checks.
        static: the static compact model for the engines that cannot skip.
        model_spec: how :func:`load` rebuilds the architecture: ``{"name": registry name,
            "num_classes": K, "sites": ..., "noise_std": ...}``; without a name, ``load`` needs the
            base model passed in.
        extra: more results to store in ``prune.json`` (FLOPs, latency, ...).
        force: replace a non-empty ``directory``.
        formats: which of ``"weights"``, ``"pt2"``, ``"onnx"``, ``"aoti"`` to write.

    Returns:
        The content of ``prune.json``.

    Raises:
        ExportError: the directory is not empty (without ``force``), or a check failed (nothing
            is left behind).

    Example:
        >>> manifest = export(compact, tmp / "out", x, model_spec={"name": "cifar:resnet20", "num_classes": 10})
        >>> sorted(p.name for p in (tmp / "out").iterdir())[:2]
        ['manifest.json', 'model.onnx']
    """
    target = check_export_dir(directory, force)
    with atomic_dir(target) as tmp:  # the export appears complete or not at all
        compact = compact.eval()
        with torch.no_grad():
            eager_reference = _frozen(compact)(inputs)
        fixed = (static if static is not None else compact).eval()
        net = _frozen(fixed)
        with torch.no_grad():
            reference = net(inputs)
        checks: list[dict[str, Any]] = []
        spec = dict(model_spec or {})
        spec.setdefault("input_size", list(compact.input_size))
        form = "static compact model (gates dropped)" if static is not None else "compact model, gates as masks (full width)"
        manifest = {
            "format": FORMAT,
            "model": spec,
            "prune": compact.record.to_dict(),
            "dynamic": [s.name for s in compact.gate_sites],
            "files": {},
            "engines": {
                "eager": f"nd_plugin.load(DIR): {len(compact.gate_sites)} gated layers skip filters per input (dynamic_runtime)",
                "pt2": form + ": torch.export cannot skip filters per input",
                "onnx": form + ": ONNX cannot skip filters per input",
            },
            "versions": {"torch": torch.__version__},
        }
        if static is not None:
            manifest["static"] = static.record.to_dict()
        if "weights" in formats:
            forms = [(WEIGHTS, compact, "eager", eager_reference)]
            if static is not None:
                forms.append((STATIC_WEIGHTS, static, "static", reference))
            for file, model, which, _ in forms:
                state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                torch.save(state, tmp / file)
                manifest["files"]["weights" if which == "eager" else "static"] = file
            _write_json(tmp / MANIFEST, manifest)
            if spec.get("name"):
                for _, _, which, ref in forms:
                    rebuilt = load(tmp, form=which)
                    with torch.no_grad():
                        checks.append(_check(f"weights+manifest ({which})", ref, rebuilt.model(inputs)))
        if "pt2" in formats:
            example = inputs[:2] if len(inputs) > 1 else inputs.expand(2, *inputs.shape[1:])  # batch 1 would be specialised
            program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
            torch.export.save(program, tmp / PROGRAM)
            manifest["files"]["pt2"] = PROGRAM
            loaded = torch.export.load(tmp / PROGRAM).module()
            with torch.no_grad():
                checks.append(_check("torch.export", reference, loaded(inputs)))
        if "aoti" in formats:
            from nd_plugin.pruning.engines import aoti_package

            example = inputs[:2] if len(inputs) > 1 else inputs.expand(2, *inputs.shape[1:])
            aoti_package(net, example, tmp / AOTI)
            manifest["files"]["aoti"] = AOTI
            manifest["engines"]["aoti"] = form + ": AOTInductor, compiled for this machine's CPU"
            compiled = torch._inductor.aoti_load_package(str(tmp / AOTI))
            with torch.no_grad():
                checks.append(_check("aotinductor", reference, compiled(inputs)))
        if "onnx" in formats:
            import onnxruntime as ort

            from nd_plugin.pruning.engines import onnx_bytes

            (tmp / ONNX).write_bytes(onnx_bytes(net, inputs[:1]))
            manifest["files"]["onnx"] = ONNX
            session = ort.InferenceSession(str(tmp / ONNX), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"input": inputs.cpu().numpy()})[0])
            checks.append(_check("onnx", reference.cpu(), got))
        _write_json(tmp / MANIFEST, manifest)
        result = {"checks": checks, "ok": all(c["ok"] for c in checks), **(extra or {})}
        _write_json(tmp / PRUNE, result)
        failed = [c for c in checks if not c["ok"]]
        if failed:
            detail = ", ".join(f"{c['format']} (max rel. error {c['max_rel_err']:.2e})" for c in failed)
            raise ExportError(
                f"export check failed: {detail} differ from the eager model by more than {CHECK_RTOL}; nothing was written."
            )
    return result


def load(
    directory: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    form: str = "eager",
) -> CompactModel:
    """Rebuilds an exported compact model from ``manifest.json`` and ``weights.pt``.

    The architecture comes from the registry name in the manifest (or ``model``, the unwrapped
    base network, for models the registry does not know); it is wrapped with the same gated
    layers, the prune record is applied (the same torch-pruning removal as at export time), and
    the weights are loaded with ``torch.load(..., weights_only=True)``.

    Args:
        directory: an export directory.
        model: the base (unwrapped, unpruned) network, when the manifest names none.
        device: where to put the model.
        form: ``"eager"`` (the runtime's model, dynamic layers gated) or ``"static"`` (every gate
            dropped: what ``model.pt2`` / ``model.onnx`` hold, when the export has it).

    Returns:
        The :class:`~nd_plugin.pruning.CompactModel`, in eval mode.

    Example:
        >>> _ = export(compact, tmp / "out", x, model_spec={"name": "cifar:resnet20", "num_classes": 10})
        >>> loaded = nd_plugin.load(tmp / "out")
        >>> torch.allclose(loaded(x), compact(x), atol=1e-5)
        True
    """
    from nd_plugin.decoupled import wrap

    directory = Path(directory)
    file = directory / MANIFEST
    fix = f"export the model again with `nd prune RUN --export {directory} --force`"
    if not file.is_file():
        raise ExportError(f"{directory} has no {MANIFEST}; export a model with `nd prune RUN --export {directory}`.")
    manifest = read_json(file, fix=fix, error=ExportError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportError(f"{file} is not an nd-plugin compact-model manifest (format {found!r}, expected {FORMAT!r}); {fix}.")
    if form not in ("eager", "static"):
        raise ExportError(f"form must be 'eager' or 'static', got {form!r}.")
    if form == "static" and "static" not in manifest:
        raise ExportError(f"{file} has no static form; export with `nd prune RUN --export DIR` (which writes it).")
    try:
        spec = dict(manifest["model"])
        record = PruneRecord.from_dict(manifest["prune" if form == "eager" else "static"])
        key, default = ("weights", WEIGHTS) if form == "eager" else ("static", STATIC_WEIGHTS)
        weights = directory / manifest["files"].get(key, default)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ExportError(f"{file} is damaged (field {exc} missing or malformed); {fix}.") from None
    if model is None:
        if not spec.get("name"):
            raise ExportError(f"{file} names no registry model; pass the base network: load({str(directory)!r}, model=...).")
        from nd_plugin.adapters import create_model

        model = create_model(spec["name"], num_classes=spec.get("num_classes"))
    dm = wrap(
        model,
        torch.zeros(1, *spec["input_size"]),
        sites=record.sites,
        reduction=record.reduction,
        noise_std=spec.get("noise_std", 1.0),
    )
    compact = apply_record(dm, record, inplace=True)
    state = load_tensors(weights, fix=fix, error=ExportError)
    problem = weights_mismatch(state, compact.state_dict()) if isinstance(state, dict) else f"holds a {type(state).__name__}"
    if problem:
        raise ExportError(f"{weights} does not fit the model {file} describes ({problem}; another export's weights?); {fix}.")
    compact.load_state_dict(state)
    return compact.to(device).eval()
