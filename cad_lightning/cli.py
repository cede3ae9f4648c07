"""The ``cad`` console script: LightningCLI over every module and data module of the project.

``cad fit --config configs/attribute.yaml`` runs attribution, ``cad fit --config configs/pretrain_tiny.yaml``
trains the embedded model, ``cad predict --config configs/generate.yaml`` generates images. ``cad erase --concepts
circle --method uce --out runs/erase`` is :func:`cad_lightning.erase.erase` on the command line (its arguments are
the function's, parsed by jsonargparse from its signature); it prints the exam's summary as JSON.

For modules that train nothing (``synchronizes_gradients = False``, e.g. CADModule) ``--trainer.strategy ddp``
(or ``auto`` with several devices or nodes) runs as ``ddp_attribution``: Lightning's DDP without the per-step
synchronisation of DistributedDataParallel (cad_lightning/strategy.py).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cad_lightning.errors import UserInputError, user_error_in
from cad_lightning.run_status import check_output_folder, output_snapshot, remove_refused_run
from cad_lightning.strategy import NAME as ATTRIBUTION_STRATEGY
from cad_lightning.strategy import uses_gradient_sync


MESSAGE_LINES = 8  # of a parse error (a union type's error lists every alternative)


class CADArgumentParser(LightningArgumentParser):
    """Parse errors in a few lines: the error and where to find the options, without the ~50 lines of usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # an inner parse whose failure the caller handles
            return super().error(message, ex)
        text = class_option_error(str(message))
        if text is None:
            lines = [line.rstrip() for line in str(message).splitlines() if line.strip()]
            text = "\n  ".join(lines[:MESSAGE_LINES]) + ("\n  ..." if len(lines) > MESSAGE_LINES else "")
        sys.stderr.write(f"cad: error: {text}\n`{self.prog.replace(' [options]', '')} --help` lists every option.\n")
        self.exit(2)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _innermost(lines: list[str]) -> tuple[list[str], list[str], str] | None:
    """The chain of keys and classes down to the innermost problem of a nested union error, and its detail."""
    keys, classes = [], []
    while lines:
        at = next((n for n, line in enumerate(lines) if re.match(r'\s*Parser key "[^"]+"', line)), None)
        if at is None:
            break
        key = re.match(r'\s*Parser key "([^"]+)":?\s*(.*)', lines[at])
        keys.append(key.group(1))
        rest = lines[at + 1:]
        problem = next((n for n, line in enumerate(rest)
                        if re.match(r"\s*- Problem with given class_path '[^']+':", line)), None)
        if problem is None:
            detail = " ".join([key.group(2), *(line.strip() for line in rest[:2])]).strip()
            return keys, classes, detail
        classes.append(re.match(r"\s*- Problem with given class_path '([^']+)':", rest[problem]).group(1))
        depth = _indent(rest[problem])
        block = []
        for line in rest[problem + 1:]:
            if line.strip() and _indent(line) <= depth:
                break
            block.append(line)
        if not any(re.match(r'\s*Parser key', line) for line in block):
            return keys, classes, " ".join(line.strip() for line in block if line.strip())
        lines = block
    return None


def class_option_error(message: str) -> str | None:
    """A parse error of a class's option in one line, from the parser's union error (which lists every
    alternative type, nested for a class's own class-typed options): ``--data.sample: AttributionDataModule has no
    option 'sample'; did you mean 'samples'?``, or the option and what was wrong with its value. None when the
    message is not of that kind."""
    found = _innermost(str(message).splitlines())
    if found is None or not found[1]:
        return None
    keys, classes, detail = found
    class_path = classes[-1]
    name = class_path.rpartition(".")[2]
    dotted = ".".join(keys[: len(classes)])
    unknown = re.fullmatch(r"Option '([^']+)' is not accepted", detail)
    if unknown:
        option = unknown.group(1)
        moved = moved_option(class_path, option)
        if moved:
            return moved
        accepted = init_parameters(class_path)
        close = difflib.get_close_matches(option, accepted, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; it accepts {', '.join(accepted)}." if accepted else ".")
        return f"--{dotted}.{option}: {name} has no option '{option}'{hint}"
    if len(keys) > len(classes):
        return f"--{'.'.join(keys)} ({name}): {detail}"
    return f"--{dotted} ({name}): {detail}"


def moved_option(class_path: str, option: str) -> str | None:
    """The sentence for an option of AttributionWriter's from before the edits became the module's arguments."""
    if class_path.rpartition(".")[2] != "AttributionWriter":
        return None
    from cad_lightning.editing.settings import MOVED

    if option not in MOVED:
        return None
    new = MOVED[option]
    return (f"AttributionWriter's '{option}' is now {new} (--{new.replace('.init_args', '')} on the command line): "
            "the module selects and evaluates the edits and adds the writer itself, so remove the AttributionWriter "
            "from trainer.callbacks.")


def init_parameters(class_path: str) -> list[str]:
    """The options of a class given in a config (the names of its constructor's parameters)."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def check_config_files(args: list[str]) -> None:
    """Every ``--config``/``-c`` file exists and reads as YAML; else a UserInputError naming the file, the line
    and the problem (the parser's own message names no file)."""
    for n, arg in enumerate(args):
        if arg in ("-c", "--config") and n + 1 < len(args):
            path = args[n + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if path.lstrip().startswith(("{", "[")) or "\n" in path:  # a config given inline, not a path
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise UserInputError(f"The config file '{path}' cannot be read ({error.strerror}).") from error
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as error:
            def at(mark) -> str:
                return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

            problem = (getattr(error, "problem", None) or str(error).splitlines()[0]) + at(getattr(error, "problem_mark", None))
            if getattr(error, "context", None):
                problem = f"{error.context}{at(getattr(error, 'context_mark', None))}: {problem}"
            raise UserInputError(f"The config file '{path}' is not valid YAML ({problem}).") from error


class CADCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", CADArgumentParser)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        class_path = getattr(config.get("model"), "class_path", None)
        if not class_path or config.trainer.strategy not in ("ddp", "auto"):
            return
        module_name, _, class_name = class_path.rpartition(".")
        if uses_gradient_sync(getattr(importlib.import_module(module_name), class_name)):
            return
        trainer = config.trainer
        several = trainer.devices not in (1, "1") or (trainer.num_nodes or 1) > 1
        if trainer.strategy == "ddp" or several:
            trainer.strategy = ATTRIBUTION_STRATEGY

    def instantiate_trainer(self, **kwargs):
        """The Trainer with the settings the module declares (``trainer_arguments``: e.g. CADModule's epochs), also
        written into the config the run saves."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        callbacks = (self._get(self.config_init, "trainer", default={}) or {}).get("callbacks") or []
        declared = {}
        for owner in [self.model, *(callbacks if isinstance(callbacks, list) else [callbacks])]:
            for key, value in (getattr(owner, "trainer_arguments", None) or {}).items():
                given = config.trainer.get(key)
                if given is not None and given != value:
                    raise UserInputError(
                        f"trainer.{key} {given}: {type(owner).__name__} declares {key} {value} for these settings; "
                        f"leave trainer.{key} out (cad fit sets it).")
                declared[key] = value
        for key, value in declared.items():
            config.trainer[key] = value
        return super().instantiate_trainer(**{**declared, **kwargs})

    def before_fit(self) -> None:
        check_output_folder(self.trainer.default_root_dir)  # before any work
        self._outputs_before = output_snapshot(self.trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException as error:
            before = getattr(self, "_outputs_before", None)
            if before is not None and user_error_in(error) is not None and self.trainer.is_global_zero:
                remove_refused_run(self.trainer, before)  # a refused input leaves nothing behind
            raise


NULLS = ("null", "None", "~")
NESTED_SETTING = re.compile(r"--model\.(?:init_args\.)?(editing|exam)\.(\w+)$")


def null_settings(args: list[str]) -> list[str]:
    """``--model.editing.rescore_every null`` as ``--model.editing '{rescore_every: null}'``: the parser reads a
    lone null of a field of the module's settings as the text 'None' (a subclass's dataclass argument), while the
    same value in a mapping merges into the settings as given."""
    out, n = [], 0
    while n < len(args):
        arg = args[n]
        key, value = (arg.split("=", 1) + [None])[:2] if arg.startswith("--") and "=" in arg else (arg, None)
        match = NESTED_SETTING.match(key)
        if match and value is None and n + 1 < len(args):
            value, n = args[n + 1], n + 1
        if match and value in NULLS:
            out += [f"--model.{match.group(1)}", f"{{{match.group(2)}: null}}"]
        elif match:
            out += [key, value]
        else:
            out.append(arg)
        n += 1
    return out


def erase_command(args: list[str]) -> dict:
    """``cad erase ...``: :func:`cad_lightning.erase.erase` with its arguments from the command line; prints and
    returns the summary."""
    import json

    from jsonargparse import auto_cli

    from cad_lightning.erase import erase

    summary = auto_cli(erase, args=args, as_positional=False, parser_class=CADArgumentParser, prog="cad erase",
                       description=erase.__doc__.splitlines()[0])
    print(json.dumps(summary, indent=2))
    return summary


def main(args: list[str] | None = None) -> None:
    try:
        given = sys.argv[1:] if args is None else list(args)
        if given[:1] == ["erase"]:
            erase_command(given[1:])
            return
        if args is None:  # the command line: the parser reads sys.argv
            sys.argv[1:] = null_settings(sys.argv[1:])
        else:
            args = null_settings(list(args))
        check_config_files(list(sys.argv[1:] if args is None else args))
        CADCLI(args=args)
    except Exception as error:
        user_error = user_error_in(error)
        if user_error is None:
            raise
        print(f"cad: error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
