"""Per-phase DDP wrappers vs one wrapper with ``find_unused_parameters=True`` (2 CPU processes, gloo).

Times a warm-up epoch (gates open) and a decoupling epoch of the Trainer per variant (each after an
untimed one), on the same data and seed, and writes the best (over --repeats) mean step time per phase and variant as JSON.

    python benchmarks/ddp_phases.py --model tv:resnet18 --data synthetic:512 --batch 64 --out ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, variant: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nd_plugin import wrap
    from nd_plugin.adapters import create_model
    from nd_plugin.data import load_data
    from nd_plugin.training.config import TrainConfig
    from nd_plugin.training.distributed import _Phase
    from nd_plugin.training.trainer import Trainer, seed_everything

    seed_everything(0)
    data = load_data(args.data)
    cfg = TrainConfig(model=args.model, data=args.data, batch_size=args.batch, epochs=1, warmup_epochs=1, device="cpu", bn_recalibrate=0).resolved()
    dm = wrap(create_model(cfg.model, num_classes=data.num_classes), torch.zeros(1, *data.input_size))
    trainer = Trainer(dm, data, cfg, None, progress=False)
    if variant == "find_unused":  # one wrapper for both phases, unused parameters searched every step
        # the L_mi classifiers are used outside forward, which the search cannot see (it marks them
        # unused, then their gradient arrives: "marked ready twice"), so this variant leaves them out
        one = _Phase(trainer.dm, trainer.loss_fn)
        ignore = [f"loss.{n}" for n, _ in trainer.loss_fn.named_parameters()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(one, ignore)
        one = nn.parallel.DistributedDataParallel(one, find_unused_parameters=True)
        trainer._ddp.module = lambda warmup: one  # type: ignore[method-assign]
    seconds = {}
    for epoch, phase in ((0, "warmup"), (1, "decouple")):
        trainer.train_epoch(epoch)  # untimed: builds the phase's wrapper, first-iteration costs
        t0 = time.perf_counter()
        trainer.train_epoch(epoch)
        seconds[phase] = (time.perf_counter() - t0) / len(trainer._loader("train", epoch, shuffle=True))
    if rank == 0:
        Path(result).write_text(json.dumps(seconds))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tv:resnet18")
    parser.add_argument("--data", default="synthetic:512")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="ddp_phases.json")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"per_phase": [], "find_unused": []}
    for _ in range(args.repeats):
        for variant in rows:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            result = f"/tmp/ddp_phases_{os.getpid()}.json"
            mp.spawn(_worker, args=(2, port, args, variant, result), nprocs=2, join=True)
            rows[variant].append(json.loads(Path(result).read_text()))
    summary = {v: {p: min(r[p] for r in rs) * 1e3 for p in ("warmup", "decouple")} for v, rs in rows.items()}
    out = {"model": args.model, "data": args.data, "batch_per_process": args.batch, "ms_per_step_best": summary, "runs": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
