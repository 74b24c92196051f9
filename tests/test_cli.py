import subprocess
import sys

import worldgen
from worldgen.cli import main


def test_package_imports_with_a_version():
    assert isinstance(worldgen.__version__, str) and worldgen.__version__


def test_cli_prints_its_version(capsys):
    try:
        main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    assert capsys.readouterr().out.strip() == f"worldgen {worldgen.__version__}"


def test_console_entry_point_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "worldgen.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("worldgen ")


def test_attention_help_names_every_backend():
    from worldgen.cli import ATTENTION_HELP
    from worldgen.models.attention import ATTENTION_BACKENDS

    assert ATTENTION_HELP.split("|") == list(ATTENTION_BACKENDS)
