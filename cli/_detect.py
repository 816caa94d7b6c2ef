"""``nd detect``: adversarial-sample detection from calculation paths (thin; the API does the work).

Registered in ``nd_plugin.cli._app`` as ``app.command("detect")(user_errors(detect_command))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["detect_command"]


def detect_command(
    run: Annotated[Path, typer.Argument(help="run directory written by `nd decouple`")],
    attack: Annotated[str, typer.Option(help="fgsm, pgd, bim, mifgsm, cw or deepfool (torchattacks)")] = "fgsm",
    eps: Annotated[float, typer.Option(help="L-inf budget in [0, 1] pixel units, in (0, 1]; 8/255 = 0.0314 (cw and deepfool are minimum-norm attacks and ignore it)")] = 8 / 255,
    data: Annotated[str | None, typer.Option(help="data spec instead of the run's (its validation split is attacked)")] = None,
    n: Annotated[int, typer.Option(help="clean test inputs to draw (the correctly classified ones are attacked)")] = 1000,
    steps: Annotated[int, typer.Option(help="iterations of iterative attacks (PGD-10 by default)")] = 10,
    fit_n: Annotated[int, typer.Option(help="training inputs to fit the detectors on when RUN has none saved")] = 10000,
    refit: Annotated[bool, typer.Option(help="refit the detectors even when RUN/detector.npz exists")] = False,
    out: Annotated[Path | None, typer.Option(help="output directory (default RUN/detect/ATTACK-epsEPS)")] = None,
    batch_size: Annotated[int, typer.Option(help="inputs per forward pass and attack batch")] = 200,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of the input draw and the attack")] = 0,
) -> None:
    """Attack N test inputs, score clean vs attacked paths, write detect.json and ROC / per-layer figures.

    The path detector (RUN/detector.npz) and the Mahalanobis baseline are fitted on the training
    split the first time and reused afterwards. Reports attack success rate, and AUROC and TPR at
    5% FPR of the path detector, Mahalanobis (penultimate features) and max-softmax.
    """
    from nd_plugin.detect import run_detection

    res = run_detection(
        run, attack=attack, eps=eps, n=n, data=data, steps=steps, fit_n=fit_n, refit=refit, out=out,
        batch_size=batch_size, device=device, seed=seed, log=lambda s: typer.echo(s, err=True),
    )
    typer.echo(
        f"{res.attack} eps={res.eps:.4g}: clean accuracy {res.clean_accuracy:.2%} on {res.n} inputs, "
        f"attack success {res.success_rate:.2%} ({res.successful}/{res.correct})"
    )
    for name, m in res.detectors.items():
        typer.echo(f"  {name:<12} AUROC {m['auroc']:.4f}  TPR@5%FPR {m['tpr_at_5fpr']:.4f}")
    typer.echo(f"wrote {Path(res.out_dir) / 'detect.json'}")
