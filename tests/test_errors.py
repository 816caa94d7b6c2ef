"""Library errors name Python parameters; the CLI prints the command's flags for them, exit code 2."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import nd_plugin
from nd_plugin.cli._app import app, decouple_command, flag_message, option_flags
from nd_plugin.errors import ConfigError, ExportError
from nd_plugin.training.config import TrainConfig


def test_a_library_error_names_the_parameter() -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(ratio=1.5).validate()
    assert str(info.value).startswith("ratio must be in [0, 1)") and "--" not in str(info.value)
    assert info.value.params == ("ratio",)
    with pytest.raises(ConfigError, match="^sparsity_scope must be one of") as info:
        TrainConfig(sparsity_scope="channel").validate()
    assert info.value.params == ("sparsity_scope",)


def test_the_cli_prints_the_flag_and_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["decouple", "--ratio", "1.5", "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "--ratio must be in [0, 1)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_force_true_becomes_the_flag(tmp_path: Path) -> None:
    """``force=True`` in the library's message is ``--force`` on the command line; ``nd prune`` names its export option."""
    from nd_plugin.pruning.export import check_export_dir

    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="pass force=True to replace it") as info:
        check_export_dir(out)
    assert info.value.params == ("force",)
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "no-run"), "--export", str(out)])
    assert result.exit_code == 2, result.output
    assert "pass --force to replace it" in result.output and "force=True" not in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_cifar_points_to_the_download_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CIFAR copy that is not there: the library asks for ``download=True``, ``nd decouple`` for ``--download``."""
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "empty"))
    result = CliRunner().invoke(
        app, ["decouple", "cifar:resnet20", "--data", "cifar10", "--out", str(tmp_path / "run"), "--quiet"]
    )
    assert result.exit_code == 2, result.output
    assert "pass --download when online" in result.output and "download=True" not in result.output


def _raised_text(node: ast.expr) -> str:
    """The string literals of a raised expression, joined (f-string values left out)."""
    return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def test_library_errors_name_no_cli_flag() -> None:
    """Outside the commands layer an error names parameters; a flag appears only inside a whole suggested `nd ...` command."""
    root = Path(nd_plugin.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if "commands" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = re.sub(r"`nd [^`]*`", "", _raised_text(node.exc))
                if re.search(r"(?<![\w-])--[a-z]", text):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found


def test_a_parameter_without_a_flag_keeps_its_name() -> None:
    """bn_recalibrate has no `nd decouple` option: the CLI prints the parameter, not an invented flag."""
    with pytest.raises(ConfigError) as info:
        TrainConfig(bn_recalibrate=-1).validate()
    assert info.value.params == ("bn_recalibrate",)
    flags = option_flags(decouple_command)
    assert "bn_recalibrate" not in flags and "ratio" in flags
    assert flag_message(info.value, flags) == str(info.value)
    assert flag_message(info.value, flags).startswith("bn_recalibrate must be >= 0")


def _help_texts() -> list[tuple[str, str]]:
    """``(where, help)`` of every command, argument and option of ``nd``, as typer hands them to rich."""
    import typer

    group = typer.main.get_command(app)
    out = [("nd", group.help or "")] + [(p.name or "", p.help or "") for p in group.params]
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        out.append((name, command.help or ""))
        out += [(f"{name} {p.name}", getattr(p, "help", None) or "") for p in command.params]
    return out


def test_help_texts_keep_their_square_brackets() -> None:
    """Rich reads ``[z > 0]`` as markup and drops it: every help string with brackets shows them all."""
    from rich.text import Text

    eaten = [
        where for where, text in _help_texts() if Text.from_markup(text).plain.count("[") != text.replace("\\[", "[").count("[")
    ]
    assert not eaten, eaten
    result = CliRunner().invoke(app, ["decouple", "--help"])
    assert result.exit_code == 0, result.output
    assert "eval (1[z > 0]) or train" in re.sub(r"[\s│]+", " ", result.output)
