"""Safe loading of model weights from checkpoint files.

Checkpoints are read with ``torch.load(..., weights_only=True)``, which never unpickles arbitrary
classes. Accepted layouts: a bare state dict, ``{"state_dict": ...}``, ``{"model": ...}`` (also
``{"model_state_dict": ...}`` and ``{"state_dict_ema": ...}`` as a fallback); ``module.``
(DataParallel/DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are stripped.

Example:
    >>> import torch
    >>> from nd_plugin.adapters import create_model, load_checkpoint
    >>> model = create_model("cifar:resnet20")
    >>> torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp / "r20.th")
    >>> load_checkpoint(create_model("cifar:resnet20"), tmp / "r20.th").linear.out_features
    10
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nd_plugin.errors import CheckpointMismatchError, ConfigError

__all__ = ["load_checkpoint", "read_state_dict"]

_logger = logging.getLogger(__name__)

_STATE_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 3


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _strip_prefixes(obj)
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                return _extract_state_dict(inner, path)
    raise CheckpointMismatchError(
        f"checkpoint {path} holds no state dict (expected a dict of tensors, or one under "
        f"'state_dict' or 'model'); found {type(obj).__name__}"
        + (f" with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, Mapping) else "")
    )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads the state dict from a checkpoint file without unpickling arbitrary objects.

    Args:
        path: A file written by ``torch.save``.

    Returns:
        The state dict with ``module.`` / ``_orig_mod.`` prefixes stripped.

    Raises:
        ConfigError: The file does not exist.
        CheckpointMismatchError: The file is not a readable checkpoint, needs unsafe unpickling,
            or holds no state dict.

    Example:
        >>> torch.save({"best_prec1": 91.7, "state_dict": {"module.conv1.weight": torch.zeros(16, 3, 3, 3)}}, tmp / "r20.th")
        >>> sd = read_state_dict(tmp / "r20.th")
        >>> sd["conv1.weight"].shape
        torch.Size([16, 3, 3, 3])
    """
    from nd_plugin.files import load_tensors

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint not found: {path}")
    fix = (
        "in a Python session you trust, re-save its weights as tensors: "
        f"torch.save({{'state_dict': torch.load({path!r}, weights_only=False).state_dict()}}, 'weights.pt') "
        "(for a whole pickled model; use the state dict inside it otherwise) and pass weights.pt"
    )
    obj = load_tensors(path, fix=fix, error=CheckpointMismatchError)
    return _extract_state_dict(obj, path)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True
) -> nn.Module:
    """Loads weights from a checkpoint file into ``model``, checking that they fit.

    ``num_batches_tracked`` buffers of BatchNorm layers are optional (old checkpoints lack them).

    Args:
        model: The model to load into (modified in place).
        path: A checkpoint file (see the module docstring for the layouts accepted).
        strict: When True, any missing or unexpected key or any shape mismatch raises. When
            False, only the tensors whose names and shapes match are loaded (the others are
            logged), e.g. to reuse a backbone with a new classifier; if nothing matches it raises.

    Returns:
        ``model``, for chaining.

    Raises:
        ConfigError: The file does not exist.
        CheckpointMismatchError: The checkpoint cannot be read safely or does not fit ``model``.

    Example:
        >>> from nd_plugin.adapters import create_model
        >>> torch.save(create_model("cifar:resnet20").state_dict(), tmp / "r20.pt")
        >>> model = load_checkpoint(create_model("cifar:resnet20"), tmp / "r20.pt")
    """
    path = os.fspath(path)
    state = read_state_dict(path)
    own = model.state_dict()

    def optional(key: str) -> bool:
        return key.endswith("num_batches_tracked")

    missing = [k for k in own if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in own and not optional(k)]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    loadable = {
        k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)
    }
    problems = []
    if mismatched:
        problems.append(f"shape mismatch in {_listing(mismatched)}")
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if problems and (strict or not any(not optional(k) for k in loadable)):
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(problems)} "
            f"(it was written for another architecture or number of classes)"
        )
    if problems:
        _logger.warning("partially loaded checkpoint %s: %s", path, "; ".join(problems))
    model.load_state_dict(loadable, strict=False)
    return model
