"""The command line: instant help, config files with command-line overrides, readable output."""

import subprocess
import sys

from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()

HEAVY = ("torch", "torch_geometric", "lightning", "mlflow", "transformers")


def test_help_imports_no_heavy_library():
    probe = (
        "import sys\n"
        "sys.argv = ['metanet', '--help']\n"
        "from cli.main import app\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "inspect" in out and "graph" in out
    assert out.strip().splitlines()[-1] == "[]"


def graph_counts(*args):
    result = runner.invoke(app, ["graph", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_config_values_are_defaults_and_the_command_line_wins(tiny_models, tmp_path):
    path = str(tiny_models["gpt_neox"].path)
    config = tmp_path / "graph.yaml"
    config.write_text("layer: 2\nnormalize: false\n")
    assert "layer 2 of" in graph_counts(path, "--config", str(config))
    assert "2^0, 2^0" in graph_counts(path, "--config", str(config))  # normalize: false from the file
    assert "layer 1 of" in graph_counts(path, "--config", str(config), "--layer", "1")
    assert "layer 1 of" in graph_counts(path, "--layer", "1", "--config", str(config))  # order does not matter


def test_shipped_graph_config_is_valid(tiny_models):
    assert "layer 0 of" in graph_counts(str(tiny_models["bert"].path), "--config", "configs/graph.yaml")


def test_config_with_an_unknown_key_is_refused(tiny_models, tmp_path):
    config = tmp_path / "graph.yaml"
    config.write_text("layers: 2\n")
    result = runner.invoke(app, ["graph", str(tiny_models["bert"].path), "--config", str(config)])
    assert result.exit_code == 2
    assert "unknown option(s) layers" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_inspect_table_names_family_and_counts(minilm_path):
    result = runner.invoke(app, ["inspect", str(minilm_path)])
    assert result.exit_code == 0, result.output
    for text in ("bert", "384", "1536", "gelu", "7,089,408"):
        assert text in result.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("metanet ")
