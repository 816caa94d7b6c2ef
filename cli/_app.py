"""The typer application. Commands only parse options and call the commands layer (:mod:`nd_plugin.commands`)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from nd_plugin.errors import NDError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="nd",
    help="Network decoupling: per-input calculation paths for CNNs (train, analyse, prune, detect).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_err = Console(stderr=True)


def user_errors(func: F) -> F:
    """Turns user errors (:class:`NDError`) into one red line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NDError as exc:
            _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _err.print("interrupted; a run directory can be continued with --resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.command("models")
@user_errors
def models_command(
    pattern: Annotated[str | None, typer.Argument(help="fnmatch pattern, e.g. 'resnet*' or 'timm:efficientnet*'")] = None,
) -> None:
    """List the models that `nd decouple` can build (registered:, cifar:, tv:, timm:; your own: module:PKG.MOD:FN)."""
    from nd_plugin.adapters import list_models

    names = list_models(pattern)
    if not names:
        _err.print(f"no model matches {pattern!r}")
        raise typer.Exit(1)
    typer.echo("\n".join(names))


@app.command("decouple")
@user_errors
def decouple_command(
    model: Annotated[str, typer.Argument(help="model name: resnet18, cifar:resnet56, tv:mobilenet_v2, timm:resnet50d, ...")] = "resnet18",
    ratio: Annotated[
        float | None,
        typer.Option(help="R, the target fraction of each gated layer's filters that are ON for an average input (0.6 = 60% on, 40% off); 0 = plain L1 pressure. In [0, 1)."),
    ] = None,
    data: Annotated[str, typer.Option(help="digits (embedded), cifar10, cifar100, imagefolder:PATH, synthetic")] = "digits",
    epochs: Annotated[int | None, typer.Option(help="decoupling epochs")] = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="plain-model epochs first (default 3 without weights, 0 with)")] = None,
    batch_size: Annotated[int, typer.Option(help="batch size per process")] = 64,
    lr: Annotated[float | None, typer.Option(help="learning rate of the network (default 0.05 from scratch, 0.01 fine-tuning)")] = None,
    acm_lr: Annotated[float | None, typer.Option(help="learning rate of the gates and L_mi classifiers (default 0.1)")] = None,
    gate_bias: Annotated[float, typer.Option(help="initial gate logit (1, the paper's release; 3 starts every gate saturated open)")] = 1.0,
    lambda_m: Annotated[float | None, typer.Option(help="weight of L_mi (path/class mutual information)")] = None,
    lambda_k: Annotated[float | None, typer.Option(help="weight of L_kl (gate/output alignment)")] = None,
    lambda_s: Annotated[float | None, typer.Option(help="weight of L_s (sparsity towards --ratio)")] = None,
    sites: Annotated[str, typer.Option(help="internal (not coupled through residual additions) or all (the paper's placement)")] = "internal",
    weights: Annotated[Path | None, typer.Option(help="start from this checkpoint (state dict; 'module.' prefixes are fine)")] = None,
    pretrained: Annotated[bool, typer.Option(help="start from the library's pretrained weights (needs network)")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    schedule: Annotated[str | None, typer.Option(help="step (the paper's x0.1 at 1/2 and 3/4 of a phase) or cosine, per step")] = None,
    hard_share: Annotated[float | None, typer.Option(help="share of samples with hard gates in training, in [0, 1]")] = None,
    acm_init: Annotated[str | None, typer.Option(help="open (gates start open, input-independent) or kaiming (the authors' release)")] = None,
    mi_init: Annotated[str | None, typer.Option(help="L_mi classifier init: kaiming (the release) or torch")] = None,
    mi_scope: Annotated[str | None, typer.Option(help="what lambda_m scales: all (the release) or gates")] = None,
    gate_weight_decay: Annotated[float | None, typer.Option(help="weight decay of the gates and L_mi classifiers")] = None,
    kl_target: Annotated[str | None, typer.Option(help="L_kl target: output (before the gate) or activation (after the ReLU, the release)")] = None,
    sparsity_gates: Annotated[str | None, typer.Option(help="gates L_s counts: eval (1[z > 0]) or train (noisy training gates, the release)")] = None,
    density_schedule: Annotated[
        str | None,
        typer.Option(help="how L_s's target density moves to --ratio: constant (R from the first step, the paper), linear or cubic (from 1 down to R over --density-ramp of the decoupling epochs)"),
    ] = None,
    sparsity_scope: Annotated[
        str | None,
        typer.Option(help="what L_s pulls towards --ratio: layer (each layer's mean density, the paper), input (each input's density) or filter (each filter's on-rate: the network must route)"),
    ] = None,
    density_ramp: Annotated[float | None, typer.Option(help="share of the decoupling epochs over which the target density moves from 1 to --ratio, in [0, 1]")] = None,
    workers: Annotated[int, typer.Option(help="data-loader worker processes")] = 0,
    amp: Annotated[bool, typer.Option(help="bf16 autocast on a GPU (--no-amp trains in float32)")] = True,
    cuda_graphs: Annotated[bool, typer.Option(help="on one GPU, replay the decoupling step as a CUDA graph")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="compile forward and losses with torch.compile (fuses the gates' small ops; the first step of each phase compiles for a minute or two)")] = False,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/MODEL)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="start again in an --out that holds a run of the same model")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress display")] = False,
) -> None:
    """Train decoupling gates and write a run directory (config, checkpoint, metrics, paths, summary)."""
    from nd_plugin.commands.decoupling import decouple
    from nd_plugin.config import TrainConfig

    if sites not in ("internal", "all"):
        raise typer.BadParameter("--sites must be 'internal' or 'all'")
    chosen = {
        "schedule": schedule,
        "hard_share": hard_share,
        "acm_init": acm_init,
        "mi_init": mi_init,
        "mi_scope": mi_scope,
        "gate_weight_decay": gate_weight_decay,
        "kl_target": kl_target,
        "sparsity_gates": sparsity_gates,
        "density_schedule": density_schedule,
        "density_ramp": density_ramp,
        "sparsity_scope": sparsity_scope,
    }
    cfg = TrainConfig(
        **{k: v for k, v in chosen.items() if v is not None},
        model=model,
        data=data,
        ratio=ratio,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        batch_size=batch_size,
        lr=lr,
        acm_lr=acm_lr,
        gate_bias=gate_bias,
        lambda_m=lambda_m,
        lambda_k=lambda_k,
        lambda_s=lambda_s,
        sites=sites,
        weights=str(weights) if weights else None,
        pretrained=pretrained,
        device=device,
        seed=seed,
        workers=workers,
        amp=amp,
        cuda_graphs=cuda_graphs,
        compile=compile,
    )
    out = out or Path("runs") / model.replace(":", "-")
    summary = decouple(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet)
    if summary:
        print_summary(summary, out)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """Prints the short table that ends `nd decouple`."""
    table = Table(title=f"run {out}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("top-1 (val)", f"{100 * summary['top1']:.2f}%")
    table.add_row("mean gate density", f"{summary['density']:.3f}")
    states = summary["filter_states"]
    table.add_row("silent / dynamic / energetic", " / ".join(f"{100 * states[k]:.1f}%" for k in ("silent", "dynamic", "energetic")))
    flops = summary.get("flops")
    if flops:
        table.add_row("FLOPs original", f"{flops['original'] / 1e6:.2f}M")
        table.add_row("FLOPs static (silent removed)", f"{flops['compact_static'] / 1e6:.2f}M ({flops['static_reduction']:.2f}x fewer)")
        table.add_row("FLOPs expected (dynamic)", f"{flops['compact_expected'] / 1e6:.2f}M ({flops['expected_reduction']:.2f}x fewer)")
    value = summary.get("dynamic_value")
    if value:
        table.add_row("dynamic value (vs static twin)", f"{100 * value['value']:+.2f} points")
    Console().print(table)


def _register_commands() -> None:
    """Adds the analysis, pruning and detection commands (their modules import lazily-heavy code)."""
    from nd_plugin.cli._analyze import analyze_command
    from nd_plugin.cli._detect import detect_command
    from nd_plugin.cli._prune import prune_command

    app.command("analyze")(user_errors(analyze_command))
    app.command("prune")(user_errors(prune_command))
    app.command("detect")(user_errors(detect_command))


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="nd")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
