"""``nd detect``: adversarial-sample detection from calculation paths (thin: :func:`nd_plugin.commands.detect.run_detection` does the work).

Registered in ``nd_plugin.cli._app`` as ``app.command("detect")(user_errors(detect_command))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nd_plugin.commands.detect import list_detectors
from nd_plugin.run import DETECTOR_PATH

__all__ = ["detect_command"]


def detect_command(
    run: Annotated[Path, typer.Argument(help="run directory written by `nd decouple`")],
    attack: Annotated[
        str,
        typer.Option(
            help="fgsm, pgd, bim, mifgsm, cw, deepfool, or any torchattacks attack by its class name (case-insensitive): apgd, square, fab, ..."
        ),
    ] = "fgsm",
    attack_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--attack-arg",
            help="NAME=VALUE, a parameter of the attack's __init__ (repeatable), e.g. --attack-arg steps=20 --attack-arg loss=dlr; values read as int, float, bool (true/false), None or text",
        ),
    ] = None,
    eps: Annotated[
        float,
        typer.Option(
            help="L-inf budget in [0, 1] pixel units, in (0, 1]; 8/255 = 0.0314 (cw and deepfool are minimum-norm attacks and ignore it)"
        ),
    ] = 8 / 255,
    data: Annotated[str | None, typer.Option(help="data spec instead of the run's (its validation split is attacked)")] = None,
    n: Annotated[int, typer.Option(help="clean test inputs to draw (the correctly classified ones are attacked)")] = 1000,
    steps: Annotated[int, typer.Option(help="iterations of iterative attacks (PGD-10 by default)")] = 10,
    fit_n: Annotated[
        int | None, typer.Option(help="training inputs to fit the detectors on (default: the whole training split)")
    ] = None,
    refit: Annotated[bool, typer.Option(help=f"refit the detectors even when RUN/{DETECTOR_PATH} exists")] = False,
    out: Annotated[Path | None, typer.Option(help="output directory (default RUN/detect/ATTACK-epsEPS)")] = None,
    batch_size: Annotated[int, typer.Option(help="inputs per forward pass and attack batch")] = 200,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of the input draw and the attack")] = 0,
    detectors: Annotated[
        str | None,
        typer.Option(
            help=f"comma-separated detectors (default all registered): {', '.join(list_detectors())}, or one a module of nd --import registers"
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(
            help="repetitions of Lee's 5/5/90 split (mean and std reported); a small set is cross-validated instead: stratified K-fold, repeated SEEDS // K times"
        ),
    ] = 5,
    transfer_from: Annotated[
        str | None, typer.Option(help="ATTACK:EPS to fit the supervised detectors on and test on --attack, e.g. fgsm:0.05")
    ] = None,
) -> None:
    """Attack N test inputs and measure every detector on Lee et al.'s protocol; write detect.json and figures.

    The detectors' clean statistics (RUN/detector*.npz) are fitted on the training split the first
    time and reused afterwards. Clean = correctly classified inputs, positives = successful attacks;
    supervised detectors fit a logistic regression on 5% of them, choose their hyperparameter on
    5%, and are tested on 90%, over --seeds splits (protocol lee-5/5/90). When the 5% fit part
    cannot hold 10 attacked inputs (a small validation split, a weak attack), every input is used
    in a stratified K-fold cross-validation instead (protocol stratified-kfold-K: 3 folds, or 5 or
    10 when 3 would fit on too few attacks). Reports AUROC (mean ± std) and TPR at 5% FPR, and
    marks the recommended detector (combined).
    """
    from nd_plugin.commands.detect import parse_attack_args, run_detection
    from nd_plugin.errors import ConfigError
    from nd_plugin.run import DETECT_JSON

    source = None
    if transfer_from is not None:
        name, sep, budget = transfer_from.partition(":")
        try:
            source = (name, float(budget) if sep else eps)
        except ValueError:
            raise ConfigError(f"--transfer-from takes ATTACK:EPS (e.g. fgsm:0.05), got {transfer_from!r}.") from None
    res = run_detection(
        run,
        attack=attack,
        eps=eps,
        n=n,
        data=data,
        steps=steps,
        attack_args=parse_attack_args(attack_arg),
        fit_n=fit_n,
        refit=refit,
        out=out,
        batch_size=batch_size,
        device=device,
        seed=seed,
        seeds=seeds,
        transfer_from=source,
        detectors=None if detectors is None else detectors.split(","),
        log=lambda s: typer.echo(s, err=True),
    )
    typer.echo(
        f"{res.attack} eps={res.eps:.4g}: clean accuracy {res.clean_accuracy:.2%} on {res.n} inputs, "
        f"attack success {res.success_rate:.2%} ({res.successful}/{res.correct})"
    )
    info = res.protocol_info
    typer.echo(f"protocol {res.protocol}, {info.get('splits', '?')} test parts: {info.get('reason', '')}")
    _table(res.detectors, res.recommended)
    if res.recommended:
        typer.echo(f"recommended: {res.recommended} (*)")
    if res.transfer:
        typer.echo(
            f"fitted on {res.transfer['fitted_on']} (protocol {res.transfer.get('protocol', res.protocol)}), tested on {res.attack}:"
        )
        _table(res.transfer["detectors"])
    typer.echo(f"wrote {Path(res.out_dir) / DETECT_JSON}")


def _table(detectors: dict, recommended: str | None = None) -> None:
    for name, m in detectors.items():
        mark = "*" if name == recommended else " "
        typer.echo(f" {mark}{name:<24} AUROC {m['auroc']:.4f} ± {m['auroc_std']:.4f}  TPR@5%FPR {m['tpr_at_5fpr']:.4f}")
