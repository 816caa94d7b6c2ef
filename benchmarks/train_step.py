"""Decoupled training step vs plain training step, same model, batch and device.

Target (issue 3): a decoupled step costs at most 1.25x a plain step. Plain = the same wrapped model
with every gate forced open and cross-entropy only (identical to the unwrapped model, see tests);
decoupled = gates on, pre-gate recording and all three losses. Steps alternate, medians reported.

On CUDA both are timed twice: launched op by op (eager), and replayed as CUDA graphs of forward,
loss and backward (what the trainer does on one GPU, ``--cuda-graphs``); the optimiser step is
eager in both. With ``--compile`` both are also timed with forward and losses compiled by
``torch.compile`` (the trainer's ``--compile``; backward compiled with them by AOTAutograd), and on
CUDA compiled and replayed as graphs.

With ``--count-kernels`` one more forward + losses + backward of each (not graph-replayed) mode runs
under the profiler and the kernels it launches are counted (the optimiser step, the same per
parameter in both, is left out): CUDA kernels on a GPU; on the CPU the operator calls that do
work (leaf aten/mkldnn ops, Inductor's fused C++ kernels; views and allocations left out). On a GPU
at these sizes, the time of a graph-replayed step follows that count.

Usage: python benchmarks/train_step.py [--model tv:resnet18] [--size 32] [--batch 64] [--repeats 30] [--compile]
Takes about a minute on a 2-core CPU (plus ~2 minutes of compilation per model with --compile),
seconds on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time
from typing import Any

import torch

import nd_plugin
from _suite import git_state
from nd_plugin.adapters import create_model
from nd_plugin.losses import DecouplingLoss
from nd_plugin.training.steps import _GraphedStep, eager_step

# operators that launch no kernel of their own: views, allocation, metadata
_NO_KERNEL = frozenset(
    "aten::" + op
    for op in (
        "empty empty_strided empty_like view _unsafe_view as_strided t transpose expand permute detach alias "
        "reshape _reshape_alias unsqueeze squeeze slice select resolve_conj resolve_neg lift_fresh set_ "
        "resize_ unbind split narrow result_type numpy_T is_nonzero item _local_scalar_dense"
    ).split()
)


def count_kernels(step: Any, device: torch.device) -> int:
    """Kernels launched by one call of ``step`` (see the module docstring for what counts)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA and "Memcpy" not in e.name and "Memset" not in e.name)
    return sum(
        1
        for e in events
        if not e.cpu_children
        and e.name not in _NO_KERNEL
        and (e.name.startswith(("aten::", "mkldnn::")) or "cpp_fused" in e.name)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tv:resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also time both steps under torch.compile")
    p.add_argument("--count-kernels", action="store_true", help="also count the kernels of one step per mode")
    p.add_argument("--out", default=None, help="write JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = create_model(args.model, num_classes=10)
    plain = copy.deepcopy(model).to(dev).train()
    dm = nd_plugin.wrap(model, torch.randn(1, 3, args.size, args.size)).to(dev).train()
    loss_fn = DecouplingLoss(0.005, 1.0, 0.01, 0.6, channels=[s.channels for s in dm.gate_sites], num_classes=10).to(dev)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_dm = torch.optim.SGD(list(dm.parameters()) + list(loss_fn.parameters()), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    def autocast():
        if dev.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return torch.autocast("cpu", enabled=False)

    if dev.type == "cuda":
        plain = plain.to(memory_format=torch.channels_last)
        dm = dm.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain_compute(xb, yb):
        with autocast():
            logits = plain(xb)
            return loss_fn(logits, yb, [], None), logits, None

    def dm_compute(xb, yb):
        with autocast():
            logits, gates, pre, z = dm(xb, return_path=True, return_pre_gate=True, return_gate_logits=True)
            return loss_fn(logits, yb, gates, pre, gate_logits=z), logits, None

    def trainer_step(run):
        """The trainer's step: ``run`` does forward, loss and backward, the optimiser steps after."""

        def make(compute, opt):
            backward = run(compute, opt)

            def step() -> None:
                backward(x, y)
                opt.step()

            step.forward_backward = functools.partial(backward, x, y)  # what --count-kernels profiles
            return step

        return make

    eager = trainer_step(lambda compute, opt: functools.partial(eager_step, compute, opt))
    graphed = trainer_step(_GraphedStep)
    modes = {"eager": eager} | ({"cuda_graphs": graphed} if dev.type == "cuda" else {})
    if args.compile:
        if args.count_kernels and dev.type == "cpu":  # name Inductor's C++ kernels in the profile
            torch._inductor.config.cpp.enable_kernel_profile = True
        compiled = trainer_step(lambda compute, opt: functools.partial(eager_step, torch.compile(compute), opt))
        modes["compiled"] = compiled
        if dev.type == "cuda":
            modes["compiled_cuda_graphs"] = trainer_step(lambda compute, opt: _GraphedStep(torch.compile(compute), opt))
    result = {
        "model": args.model,
        "input": [args.batch, 3, args.size, args.size],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({args.threads} threads)",
        "torch": torch.__version__,
        "gated_layers": len(dm.gate_sites),
        **git_state(),
    }
    for mode, make in modes.items():
        steps = {"plain": make(plain_compute, opt_plain), "decoupled": make(dm_compute, opt_dm)}
        t0 = time.perf_counter()
        times: dict[str, list[float]] = {"plain": [], "decoupled": []}
        for _ in range(5):  # warm-up: compilation, graph capture
            for step in steps.values():
                step()
        sync()
        warmup_s = time.perf_counter() - t0
        for _ in range(args.repeats):
            for name, step in steps.items():
                sync()
                t = time.perf_counter()
                step()
                sync()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        result[mode] = {
            "plain_ms": 1000 * med["plain"],
            "decoupled_ms": 1000 * med["decoupled"],
            "ratio": med["decoupled"] / med["plain"],
            "warmup_s": warmup_s,
        }
        if args.count_kernels and "cuda_graphs" not in mode:
            counts = {name: count_kernels(step.forward_backward, dev) for name, step in steps.items()}
            result[mode]["kernels"] = counts
            result[mode]["extra_kernels_per_gated_layer"] = (counts["decoupled"] - counts["plain"]) / len(dm.gate_sites)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
