"""ONNX Runtime alone: dense vs static compact, 1 and 2 intra-op threads, spinning on and off.

Usage::

    python benchmarks/ort_threads.py RUN [RUN ...]

Medians (ms) of 40 alternating calls per run and batch size (1 and 32), printed one line each.
"""

from __future__ import annotations

import argparse
import io
import warnings
from collections.abc import Callable

import onnxruntime as ort
import torch
from torch import nn

from nd_plugin.pruning import apply_record, fold_batchnorm, static_record
from nd_plugin.pruning.engines import side_by_side
from nd_plugin.pruning.plan import plain_copy
from nd_plugin.run import open_run


def session(model: nn.Module, example: torch.Tensor, threads: int, spin: bool) -> Callable[[torch.Tensor], object]:
    """An ORT session of ``model`` with ``threads`` intra-op threads, spinning on or off."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buffer, input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}}, dynamo=False
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    sess = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda t: sess.run(None, {"input": t.numpy()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    args = p.parse_args()
    torch.set_num_threads(2)
    for run_dir in args.runs:
        run = open_run(run_dir)
        dm, stats = run.build_model().eval(), run.stats()
        val = run.data().val
        x = torch.stack([val[i][0] for i in range(0, len(val), max(len(val) // 20, 1))][:20])
        dense = fold_batchnorm(plain_copy(dm.model), x[:1])
        static = fold_batchnorm(plain_copy(apply_record(dm, static_record(dm, stats, round_to=8)).model), x[:1])
        for batch in (1, 32):
            inputs = [x[:1]] * 8 if batch == 1 else [x.repeat(2, 1, 1, 1)[:32]]
            fns = {
                f"{name} {threads}t spin{int(spin)}": session(model, x[:1], threads, spin)
                for name, model in (("dense", dense), ("static", static))
                for threads in (1, 2)
                for spin in (True, False)
            }
            ms = side_by_side(fns, inputs, 40)
            print(run_dir, "batch", batch, {k: round(v, 3) for k, v in ms.items()}, flush=True)


if __name__ == "__main__":
    main()
