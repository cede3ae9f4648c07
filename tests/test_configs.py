"""Every shipped config parses against the CLI, and unknown keys are refused with their name."""

from pathlib import Path

import pytest
from conftest import run_cli

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))
SUBCOMMAND = {"generate": "predict", "evaluate": "test"}


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{c.parent.name}/{c.stem}" for c in CONFIGS])
def test_config_parses(config, capsys):
    assert run_cli([SUBCOMMAND.get(config.stem, "fit"), "--config", str(config), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


def test_unknown_key_is_refused(capsys):
    config = Path(__file__).resolve().parent.parent / "configs" / "generate.yaml"
    code = run_cli(["predict", "--config", str(config), "--model.no_such_key", "1", "--print_config"])
    assert code != 0
    assert "no_such_key" in capsys.readouterr().err


def test_parse_errors_are_short_and_name_the_file(tmp_path, capsys):
    attribute = str(Path(__file__).resolve().parent.parent / "configs" / "attribute.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  init_args:\n    no_such_key: 3\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: [1\n")
    cases = [
        (["--config", attribute, "--trainer.no_such_flag", "1"], "no_such_flag"),
        (["--config", attribute, "--config", str(unknown)], "--model.no_such_key: CADModule has no option 'no_such_key'"),
        (["--config", attribute, "--data.sample", "3"], "AttributionDataModule has no option 'sample'; did you mean 'samples'?"),
        (["--config", attribute, "--model.init_args.chunk_size", "abc"], "--model.chunk_size (CADModule): Expected a <class 'int'>"),
        (["--config", str(broken)], f"The config file '{broken}' is not valid YAML (while parsing a flow sequence at line 2"),
        (["--config", str(tmp_path / "absent.yaml")], f"The config file '{tmp_path / 'absent.yaml'}' cannot be read"),
    ]
    for args, expected in cases:
        assert run_cli(["fit", *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.startswith("cad: error:"), (args, err)
        assert len(err.strip().splitlines()) <= 2 and "usage:" not in err, err  # the error and where the options are listed
