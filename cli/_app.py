"""The typer application. Commands only parse options and call the commands layer (:mod:`nd_plugin.commands`)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nd_plugin.data import list_data_sources
from nd_plugin.errors import NDError
from nd_plugin.training.config import EPOCHS, LR, WARMUP_EPOCHS, TrainConfig

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="nd",
    help="Network decoupling: per-input calculation paths for CNNs (train, analyse, prune, detect).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_err = Console(stderr=True)


# Library parameters that a command's option sets under another name: create_model(checkpoint=)
# is `nd decouple --weights`.
_SAME_AS = {"checkpoint": "weights"}


def option_flags(callback: Callable[..., Any]) -> dict[str, tuple[str, str | None]]:
    """``{python name: (flag, negative flag or None)}`` of the options of the command ``callback`` runs.

    Read from the click command typer builds, so the flags are the ones the command declares
    (``engines`` is ``--engine``, ``compile`` has no ``--no-compile``); empty for an unregistered callback.
    """
    name = next((c.name for c in app.registered_commands if c.callback is callback), None)
    command = typer.main.get_command(app).commands.get(name) if name else None  # type: ignore[attr-defined]
    params = command.params if command is not None else []
    return {
        p.name: (p.opts[0], p.secondary_opts[0] if p.secondary_opts else None)
        for p in params
        if getattr(p, "param_type_name", None) == "option" and p.name
    }


def flag_message(exc: NDError, flags: dict[str, tuple[str, str | None]]) -> str:
    """The error's message with each parameter it names written as the command's flag.

    The library names parameters as Python spells them (``ratio``, ``force=True``,
    ``cuda_graphs=False``); the command line knows them as flags (``--ratio``, ``--force``,
    ``--no-cuda-graphs``). A parameter that the command has no option for keeps its name.

    Example:
        >>> flags = {"force": ("--force", None), "cuda_graphs": ("--cuda-graphs", "--no-cuda-graphs"),
        ...          "out": ("--out", None)}
        >>> err = NDError("out runs/out is taken; pass force=True or cuda_graphs=False", params=("out", "force", "cuda_graphs"))
        >>> flag_message(err, flags)
        '--out runs/out is taken; pass --force or --no-cuda-graphs'
        >>> flag_message(err, {"out": ("--out", None)})
        '--out runs/out is taken; pass force=True or cuda_graphs=False'
    """
    text = str(exc)
    for name in exc.params:
        on, off = flags.get(_SAME_AS.get(name, name)) or flags.get(name) or (None, None)
        if on is None:
            continue

        def flag(match: re.Match[str], on: str = on, off: str | None = off) -> str:
            return off if match.group(1) == "=False" and off else on

        # the name as a word of the message: not inside a path, a quoted value or another name
        text = re.sub(rf"(?<![\w./'\"-]){re.escape(name)}(=True|=False)?(?![\w/'\"-])", flag, text)
    return text


def user_errors(func: F) -> F:
    """Turns user errors (:class:`NDError`) into one red line on stderr and exit code 2.

    The line names the command's flags where the library's message names parameters (:func:`flag_message`).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NDError as exc:
            message = flag_message(exc, option_flags(wrapper))
            _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _err.print("interrupted; a run directory can be continued with --resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def import_modules(names: Sequence[str]) -> None:
    """Imports the user's modules that register models, data sources or detectors, in order.

    Each name is a module on ``sys.path`` (``PKG.MOD``; ``PYTHONPATH`` adds folders) or a
    ``FILE.py``; several may be joined by commas. Importing runs the module's
    ``register_model`` / ``register_data_source`` / ``register_detector`` calls, so that the
    command that follows knows their names.

    Raises:
        typer.Exit: (code 2) a module that cannot be imported, after one line naming it.
    """
    for name in (part.strip() for entry in names for part in entry.split(",")):
        if not name:
            continue
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                if not path.is_file():
                    raise FileNotFoundError(f"no file {path}")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            else:
                importlib.import_module(name)
        except Exception as exc:  # a user's module may fail in any way: one line, not a traceback
            sys.modules.pop(Path(name).stem if name.endswith(".py") else name, None)
            lines = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            _err.print(
                f"[bold red]error:[/] {escape(f'--import {name} failed: {reason}')} "
                "(name a module on PYTHONPATH as PKG.MOD, or a FILE.py)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None


@app.callback()
def options(
    imports: Annotated[
        list[str] | None,
        typer.Option(
            "--import",
            envvar="ND_IMPORT",
            metavar="MODULE",
            help="import MODULE (PKG.MOD on PYTHONPATH, or FILE.py) before the command, so that the models, data sources "
            "and detectors it registers can be named; repeatable; ND_IMPORT takes a comma-separated list",
        ),
    ] = None,
) -> None:
    """Network decoupling: per-input calculation paths for CNNs (train, analyse, prune, detect)."""
    import_modules(imports or [])


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


# Every option of `nd decouple` that is a TrainConfig field takes its default from the field: the
# dataclass is the one owner of the defaults (tests/test_cli_defaults.py checks that they agree).
_D = TrainConfig
_SCRATCH, _TRAINED = WARMUP_EPOCHS["scratch"], WARMUP_EPOCHS["trained"]


@app.command("decouple")
@user_errors
def decouple_command(
    model: Annotated[
        str, typer.Argument(help="model name: resnet18, cifar:resnet56, tv:mobilenet_v2, timm:resnet50d, ...")
    ] = _D.model,
    ratio: Annotated[
        float | None,
        typer.Option(
            help="R, the target fraction of each gated layer's filters that are ON for an average input (0.6 = 60% on, 40% off); 0 = plain L1 pressure. In [0, 1). Default: the model's preset."
        ),
    ] = _D.ratio,
    data: Annotated[
        str,
        typer.Option(
            help=f"data spec: {', '.join(list_data_sources())} (digits is embedded), or a source a module of nd --import registers"
        ),
    ] = _D.data,
    epochs: Annotated[
        int | None, typer.Option(help=f"decoupling epochs (default {EPOCHS['digits']} on digits, {EPOCHS['other']} otherwise)")
    ] = _D.epochs,
    warmup_epochs: Annotated[
        int | None, typer.Option(help=f"plain-model epochs first (default {_SCRATCH} without weights, {_TRAINED} with)")
    ] = _D.warmup_epochs,
    batch_size: Annotated[int, typer.Option(help="batch size per process")] = _D.batch_size,
    lr: Annotated[
        float | None,
        typer.Option(
            help=f"learning rate of the network (default {LR['scratch']:g} from scratch, {LR['trained']:g} fine-tuning)"
        ),
    ] = _D.lr,
    acm_lr: Annotated[float, typer.Option(help="learning rate of the gates and L_mi classifiers")] = _D.acm_lr,
    gate_bias: Annotated[
        float, typer.Option(help="initial gate logit (1, the paper's release; 3 starts every gate saturated open)")
    ] = _D.gate_bias,
    lambda_m: Annotated[
        float | None, typer.Option(help="weight of L_mi (path/class mutual information); default: the model's preset")
    ] = _D.lambda_m,
    lambda_k: Annotated[
        float | None, typer.Option(help="weight of L_kl (gate/output alignment); default: the model's preset")
    ] = _D.lambda_k,
    lambda_s: Annotated[
        float | None, typer.Option(help="weight of L_s (sparsity towards --ratio); default: the model's preset")
    ] = _D.lambda_s,
    sites: Annotated[
        str, typer.Option(help="internal (not coupled through residual additions) or all (the paper's placement)")
    ] = _D.sites,
    weights: Annotated[
        Path | None, typer.Option(help="start from this checkpoint (state dict; 'module.' prefixes are fine)")
    ] = _D.weights,
    pretrained: Annotated[bool, typer.Option(help="start from the library's pretrained weights (needs network)")] = _D.pretrained,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = _D.device,
    seed: Annotated[int, typer.Option(help="random seed")] = _D.seed,
    schedule: Annotated[
        str, typer.Option(help="step (the paper's x0.1 at 1/2 and 3/4 of a phase) or cosine, per step")
    ] = _D.schedule,
    hard_share: Annotated[float, typer.Option(help="share of samples with hard gates in training, in [0, 1]")] = _D.hard_share,
    acm_init: Annotated[
        str, typer.Option(help="open (gates start open, input-independent) or kaiming (the authors' release)")
    ] = _D.acm_init,
    mi_init: Annotated[str, typer.Option(help="L_mi classifier init: kaiming (the release) or torch")] = _D.mi_init,
    mi_scope: Annotated[str, typer.Option(help="what lambda_m scales: all (the release) or gates")] = _D.mi_scope,
    gate_weight_decay: Annotated[
        float, typer.Option(help="weight decay of the gates and L_mi classifiers")
    ] = _D.gate_weight_decay,
    kl_target: Annotated[
        str, typer.Option(help="L_kl target: output (before the gate) or activation (after the ReLU, the release)")
    ] = _D.kl_target,
    sparsity_gates: Annotated[
        str, typer.Option(help=escape("gates L_s counts: eval (1[z > 0]) or train (noisy training gates, the release)"))
    ] = _D.sparsity_gates,
    density_schedule: Annotated[
        str,
        typer.Option(
            help="how L_s's target density moves to --ratio: constant (R from the first step, the paper), linear or cubic (from 1 down to R over --density-ramp of the decoupling epochs)"
        ),
    ] = _D.density_schedule,
    sparsity_scope: Annotated[
        str,
        typer.Option(
            help="what L_s pulls towards --ratio: layer (each layer's mean density, the paper), input (each input's density) or filter (each filter's on-rate: the network must route)"
        ),
    ] = _D.sparsity_scope,
    sparsity_cap: Annotated[
        float,
        typer.Option(
            help="highest on-rate a filter may have for free, in [--ratio, 1]: above it L_s charges the excess, so no filter runs for every input (1: off)"
        ),
    ] = _D.sparsity_cap,
    lambda_c: Annotated[
        float,
        typer.Option(
            help="weight of L_c (ours): rewards each filter for the mutual information between its gate and the class, >= 0 (0: off)"
        ),
    ] = _D.lambda_c,
    lambda_c_until: Annotated[
        float,
        typer.Option(help="share of the decoupling epochs during which L_c is on, in [0, 1]; after it lambda_c is 0 (1: throughout)"),
    ] = _D.lambda_c_until,
    freeze_gates_after: Annotated[
        float,
        typer.Option(
            help="share of the decoupling epochs after which the gates stop learning and the network adapts to their routes, in [0, 1] (1: never)"
        ),
    ] = _D.freeze_gates_after,
    density_ramp: Annotated[
        float,
        typer.Option(help="share of the decoupling epochs over which the target density moves from 1 to --ratio, in [0, 1]"),
    ] = _D.density_ramp,
    distill_weight: Annotated[
        float,
        typer.Option(
            help="weight of a distillation term from the network as decoupling begins (the trained network with --weights), >= 0 (0: off)"
        ),
    ] = _D.distill_weight,
    distill_temperature: Annotated[float, typer.Option(help="distillation temperature, > 0")] = _D.distill_temperature,
    workers: Annotated[int, typer.Option(help="data-loader worker processes")] = _D.workers,
    download: Annotated[
        bool,
        typer.Option("--download", help="fetch CIFAR-10/100 into $ND_DATA_DIR (default ~/.cache/nd-plugin/data) when missing"),
    ] = _D.download,
    amp: Annotated[bool, typer.Option(help="bf16 autocast on a GPU (--no-amp trains in float32)")] = _D.amp,
    cuda_graphs: Annotated[bool, typer.Option(help="on one GPU, replay the decoupling step as a CUDA graph")] = _D.cuda_graphs,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="compile forward and losses with torch.compile (fuses the gates' small ops; the first step of each phase compiles for a minute or two)",
        ),
    ] = _D.compile,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/MODEL)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="start again in an --out that holds a run of the same model")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress display")] = False,
) -> None:
    """Train decoupling gates and write a run directory (config, checkpoint, metrics, paths, summary)."""
    from nd_plugin.commands.decoupling import decouple

    if sites not in ("internal", "all"):
        raise typer.BadParameter("--sites must be 'internal' or 'all'")
    cfg = TrainConfig(
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
        schedule=schedule,
        hard_share=hard_share,
        acm_init=acm_init,
        mi_init=mi_init,
        mi_scope=mi_scope,
        gate_weight_decay=gate_weight_decay,
        kl_target=kl_target,
        sparsity_gates=sparsity_gates,
        density_schedule=density_schedule,
        density_ramp=density_ramp,
        sparsity_scope=sparsity_scope,
        sparsity_cap=sparsity_cap,
        lambda_c=lambda_c,
        lambda_c_until=lambda_c_until,
        freeze_gates_after=freeze_gates_after,
        distill_weight=distill_weight,
        distill_temperature=distill_temperature,
        workers=workers,
        download=download,
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
    table.add_row(
        "silent / dynamic / energetic", " / ".join(f"{100 * states[k]:.1f}%" for k in ("silent", "dynamic", "energetic"))
    )
    flops = summary.get("flops")
    if flops:
        table.add_row("FLOPs original", f"{flops['original'] / 1e6:.2f}M")
        table.add_row(
            "FLOPs static (silent removed)", f"{flops['compact_static'] / 1e6:.2f}M ({flops['static_reduction']:.2f}x fewer)"
        )
        table.add_row(
            "FLOPs expected (dynamic)", f"{flops['compact_expected'] / 1e6:.2f}M ({flops['expected_reduction']:.2f}x fewer)"
        )
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
