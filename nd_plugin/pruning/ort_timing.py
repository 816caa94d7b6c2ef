"""Latency without torch: alternating medians, and ONNX Runtime sessions built as deployed.

ONNX Runtime runs a session's operators on an intra-op thread pool whose idle workers *spin*
(busy-wait for the next task) by default, after every parallel section and after the call. Timed
inside ``nd prune``'s process, with torch's threads next to them and a dense and a compact session
alternating, each with its own spinning pool, the two models competed for the cores with each
other's idle workers: neither would deployed. :func:`time_sessions` builds the sessions the way
one model is deployed and calls them in turn (:func:`alternate`, medians):

- several threads, spinning on: the sessions share one global thread pool, so the workers spinning
  after one call are the ones that run the next, as when one model serves calls back to back;
  ONNX Runtime allows a global pool only before its first session and then only, so such a setting
  needs a process of its own;
- spinning off, or one thread (no worker thread to spin): each session has its own pool.

This module imports only the standard library at its top (numpy and onnxruntime inside the
functions that need them) and nothing of ``nd_plugin``, so that
:func:`nd_plugin.pruning.engines.onnx_latency` can run it as a file in a fresh Python process that
never imports torch: ``python ort_timing.py SPEC.json`` prints the medians as JSON.

Example:
    >>> ms = alternate({"a": abs, "b": abs}, [-1, 2], repeats=3, warmup=1)
    >>> sorted(ms), all(v >= 0 for v in ms.values())
    (['a', 'b'], True)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["alternate", "main", "ort_session", "time_sessions"]

SPIN_KEY = "session.intra_op.allow_spinning"


def alternate(fns: Mapping[str, Callable[[Any], Any]], inputs: Sequence[Any], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per callable, each round calling every callable once on the same input.

    Args:
        fns: name -> callable.
        inputs: the inputs, cycled through (round ``i`` uses ``inputs[i % len(inputs)]``).
        repeats: timed rounds.
        warmup: untimed rounds first.

    Returns:
        name -> median ms over the timed rounds.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        x = inputs[i % len(inputs)]
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def ort_session(model: bytes | str, threads: int | None, spinning: bool, shared_pool: bool = False) -> Any:
    """An ONNX Runtime CPU session of ``model`` (ONNX bytes or a file) with explicit thread settings.

    Args:
        model: the ONNX model.
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core); inter-op 1.
        spinning: whether idle intra-op workers spin (``session.intra_op.allow_spinning``).
        shared_pool: use the process's global thread pool (which the caller has sized before the
            first session) instead of a pool of the session's own; its workers spin.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if shared_pool:
        options.use_per_session_threads = False
    else:
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry(SPIN_KEY, "1" if spinning else "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def time_sessions(
    models: Mapping[str, bytes | str],
    inputs: Sequence[Any],
    settings: Sequence[Mapping[str, Any]],
    repeats: int,
    warmup: int = 3,
) -> list[dict[str, Any]]:
    """Per setting, the models' sessions called in turn on the same inputs: median ms each.

    Args:
        models: name -> ONNX model (bytes or file); each has one input.
        inputs: numpy arrays, cycled through.
        settings: ``{"threads": int, "spinning": bool | None}`` each; a setting with several
            threads and spinning on shares one global pool between its sessions, so it must be the
            only setting and come before any session of the process.
        repeats: timed rounds per setting.
        warmup: untimed rounds first.

    Returns:
        One ``{"threads", "spinning", "pool", "ms": {name: median ms}}`` per setting, in order.

    Raises:
        ValueError: a shared-pool setting among others.
    """
    import onnxruntime.capi._pybind_state as capi

    shared = [bool(s["spinning"]) and s["threads"] > 1 for s in settings]
    if any(shared) and len(settings) > 1:
        raise ValueError("a setting with spinning workers shares the global pool: time it in a process of its own.")
    out = []
    for setting, share in zip(settings, shared, strict=True):
        threads = int(setting["threads"])
        if share:
            capi.set_global_thread_pool_sizes(threads, 1)
        sessions = {name: ort_session(m, threads, bool(setting["spinning"]), shared_pool=share) for name, m in models.items()}
        fns = {name: _runner(s) for name, s in sessions.items()}
        pool = "shared" if share else ("none" if threads == 1 else "per session")
        out.append(
            {"threads": threads, "spinning": setting["spinning"], "pool": pool, "ms": alternate(fns, inputs, repeats, warmup)}
        )
    return out


def _runner(session: Any) -> Callable[[Any], Any]:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def main(argv: Sequence[str] | None = None) -> None:
    """``python ort_timing.py SPEC.json``: times the spec's models and prints the result as JSON.

    The spec holds ``models`` (name -> ONNX file), ``inputs`` (a ``.npy`` file whose first axis
    lists the inputs), ``settings``, ``repeats`` and ``warmup`` (see :func:`time_sessions`); relative
    files are read from the spec's folder.
    """
    import numpy as np

    path = Path((argv if argv is not None else sys.argv[1:])[0])
    spec = json.loads(path.read_text(encoding="utf-8"))
    models = {name: str(path.parent / file) for name, file in spec["models"].items()}
    inputs = list(np.load(path.parent / spec["inputs"]))
    result = time_sessions(models, inputs, spec["settings"], int(spec["repeats"]), int(spec["warmup"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
