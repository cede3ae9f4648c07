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


def test_composed_configs_state_only_what_differs_and_resolve_their_parts(capsys):
    """A family's job takes the shared real-model part, then the family's settings, then its own: the resolved
    config holds all three, the later replacing the earlier."""
    import yaml

    configs = Path(__file__).resolve().parent.parent / "configs"
    assert run_cli(["fit", "--config", str(configs / "sd3" / "erase_unsafe.yaml"), "--print_config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    trainer, model, data = resolved["trainer"], resolved["model"]["init_args"], resolved["data"]["init_args"]
    # the shared part
    assert trainer["max_epochs"] is None and trainer["enable_checkpointing"] is False and resolved["seed_everything"] == 0
    assert not trainer["callbacks"]  # the module adds its writer
    assert model["editing"]["ratios"] == [0.01, 0.02, 0.05] and model["exam"]["evaluate"] is False
    assert model["editing"]["save_unet"] is False and model["components"] == ["ff"] and data["batch_size"] == 1
    # the family's
    assert model["dtype"] == "bf16" and model["num_inference_steps"] == 28 and model["gradient_checkpointing"] is True
    # the job's own, one replacing the part's
    assert trainer["default_root_dir"] == "runs/sd3_erase_unsafe" and data["concept"] == "nudity"
    assert data["prompt_templates"] is None and data["prompts_file"] == "configs/sd/unsafe_prompts.txt"
    assert data["samples"] == 16
    # a job file states only its differences
    job = (configs / "sd3" / "erase_unsafe.yaml").read_text()
    assert "max_epochs" not in job and "dtype" not in job


def test_help_lists_the_choices_and_the_parser_refuses_others(capsys):
    """Closed choices are typed (cad_lightning/choices.py): ``--help`` lists them, and another value is refused
    when the config is parsed, before the model is built."""
    assert run_cli(["fit", "--model.help", "cad_lightning.attribution.module.CADModule"]) == 0
    out = capsys.readouterr().out
    assert "--model.exam.evaluate_at {all,goal,floor}" in out and "--model.editing.scope {row,matrix,global}" in out
    assert "objective {erase,amplify}" in out
    attribute = Path(__file__).resolve().parent.parent / "configs" / "attribute.yaml"
    assert run_cli(["fit", "--config", str(attribute), "--model.model_path", "/no/such/folder",
                    "--model.objective", "erasse"]) == 2
    err = capsys.readouterr().err
    assert "objective" in err and "/no/such/folder" not in err  # refused at parsing, not when the model loads
    assert run_cli(["fit", "--config", str(attribute), "--model.model_path", "/no/such/folder",
                    "--model.editing.scope", "rows"]) == 2
    err = capsys.readouterr().err
    assert "--model.editing.scope (CADModule)" in err and "'row', 'matrix', 'global'" in err
    assert "/no/such/folder" not in err
    # a cross-field check of the edit settings, before the model loads
    assert run_cli(["fit", "--config", str(attribute), "--model.model_path", "/no/such/folder",
                    "--model.editing.selections", "[cad]"]) == 2
    err = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("cad: error"))
    assert "rescore_every" in err and "/no/such/folder" not in err


def test_an_old_writer_key_is_refused_naming_its_new_key(capsys):
    """The edit and exam settings moved from AttributionWriter's options to the module's: a config that still
    gives them is refused in one sentence naming the new key."""
    attribute = Path(__file__).resolve().parent.parent / "configs" / "attribute.yaml"
    assert run_cli(["fit", "--config", str(attribute), "--trainer.callbacks+=cad_lightning.callbacks.AttributionWriter",
                    "--trainer.callbacks.init_args.evaluate_at", "all"]) == 2
    err = capsys.readouterr().err
    assert "'evaluate_at' is now model.init_args.exam.evaluate_at" in err and len(err.strip().splitlines()) == 2


def test_the_module_declares_its_epochs(tmp_path, capsys):
    """The default job scores in two epochs (the edit is scored again at rescore_every): the saved config says so,
    and another trainer.max_epochs is refused in one sentence."""
    attribute = Path(__file__).resolve().parent.parent / "configs" / "attribute.yaml"
    assert run_cli(["fit", "--config", str(attribute), "--trainer.max_epochs", "1",
                    "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "declares max_epochs 2" in capsys.readouterr().err
    from cad_lightning.attribution.module import CADModule
    from cad_lightning.editing.settings import EditSettings

    assert CADModule(editing=EditSettings(ratios=[0.1, 0.3], selections=["selective"], rescore_every=0.1)).epochs == 3
    assert CADModule(editing=EditSettings(ratios=[0.01], selections=["iterative"], iterative_step=0.005)).epochs == 2
    assert CADModule(editing=EditSettings(selections=[])).trainer_arguments == {"max_epochs": 1}
