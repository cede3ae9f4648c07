"""Every shipped config parses against the CLI, and unknown keys are refused with their name."""

from pathlib import Path

import pytest
from conftest import run_cli

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))
SUBCOMMAND = {"generate": "predict", "evaluate": "test"}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config, capsys):
    assert run_cli([SUBCOMMAND.get(config.stem, "fit"), "--config", str(config), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


def test_unknown_key_is_refused(capsys):
    config = Path(__file__).resolve().parent.parent / "configs" / "generate.yaml"
    code = run_cli(["predict", "--config", str(config), "--model.no_such_key", "1", "--print_config"])
    assert code != 0
    assert "no_such_key" in capsys.readouterr().err
