"""The ``leank`` command line itself: --help lists only commands that exist, --version."""

import subprocess
import sys

import pytest

import leank
from leank import cli


def test_help_lists_only_real_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "bench" not in out
    for name in cli.SUBCOMMANDS:
        assert name in out
    # every registered subcommand builds its parser (no silently skipped module)
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(cli.SUBCOMMANDS)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"leank {leank.__version__} (torch ")


def test_version_matches_project_metadata():
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == leank.__version__


def test_unknown_command_is_an_error():
    r = subprocess.run([sys.executable, "-m", "leank.cli", "bench"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'bench'" in r.stderr


def test_bad_input_found_late_is_one_error_line_not_a_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["train", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leank train: error: ") and missing in err and "Traceback" not in err
    with pytest.raises(ValueError, match="recipe: expected an existing YAML file"):  # -v: the traceback
        cli.main(["-v", "train", missing])
    with pytest.raises(SystemExit) as e:  # checked by argparse, before anything loads
        cli.main(["train", missing, "--max-steps", "0"])
    assert e.value.code == 2 and "expected a positive integer, got '0'" in capsys.readouterr().err
