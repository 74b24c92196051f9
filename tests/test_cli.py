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


def test_fast_path_switches_parse_to_on_off_or_unset():
    """Unset (None) leaves the choice to EngineSettings (on for bf16 on CUDA); --x / --no-x force it. The
    same options on render and bench."""
    from worldgen.cli import ENGINE_OPTIONS, build_parser, engine_options

    parser = build_parser()
    for command in (["render", "--job", "j.json", "--out", "o"], ["bench", "--out", "o"]):
        unset = parser.parse_args(command)
        assert (unset.compile, unset.triton_kernels, unset.gelu_epilogue) == (None, None, None)
        assert unset.fp8 is False and unset.fp8_fast_accum is True
        given = parser.parse_args([*command, "--compile", "--no-triton-kernels", "--no-fp8-fast-accum"])
        assert (given.compile, given.triton_kernels, given.fp8_fast_accum) == (True, False, False)
    render = parser.parse_args(["render", "--job", "j.json", "--out", "o", "--no-gelu-epilogue"])
    assert engine_options(render)["gelu_epilogue"] is False and set(engine_options(render)) == set(
        ENGINE_OPTIONS
    )
