"""The ``lightfed`` command: LightningCLI for federated runs, plus ``strategies`` and ``data``.

``lightfed fit --config experiments/digits_fedavg.yaml`` parses a YAML with the usual LightningCLI
sections -- ``model`` and ``data`` (``class_path`` / ``init_args``), ``trainer`` (the
:class:`~lightfed.trainer.FederatedTrainer`'s arguments) -- plus top-level ``strategy``, ``privacy`` and
``secure_aggregation`` sections, each a registered plugin name or a ``class_path`` with ``init_args``
validated from the class's type hints. ``--print_config``, ``--help`` and ``--trainer.rounds 20`` work as
in Lightning.

A mistake in the config ends the command with one line, ``lightfed: error: <what and how to fix it>``,
and exit status 2; ``LIGHTFED_TRACEBACK=1`` shows the full traceback instead (:func:`main`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import linecache
import os
import re
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightfed.data.datamodule import FederatedDataModule
from lightfed.privacy.base import PrivacyMechanism
from lightfed.registry import EXECUTORS, PRIVACY, SECURE_AGGREGATION, STRATEGIES, load_all_plugins
from lightfed.secagg.base import SecureAggregation
from lightfed.strategy import Strategy
from lightfed.trainer import FederatedTrainer, RunFailedError

_PLUGIN_SECTIONS = ("strategy", "privacy", "secure_aggregation")

#: Every ``lightfed`` subcommand and what it does (the top-level ``--help``).
COMMANDS = {
    "fit": "run the federated rounds of a config (lightfed fit --config X.yaml)",
    "test": "evaluate a checkpoint on the central test set (lightfed test --config X.yaml --ckpt_path C)",
    "data": "print a config's partition statistics and plot its label distribution",
    "strategies": "list every registered strategy, privacy mechanism, secure aggregation protocol and executor",
    "central": "centralised Lightning training of the same model and data (lightfed central fit --config X.yaml)",
}

#: Set to 1 to see the full traceback of a config error instead of one line.
TRACEBACK_ENV = "LIGHTFED_TRACEBACK"


class LightFedCLI(LightningCLI):
    """LightningCLI whose trainer is a :class:`FederatedTrainer` and whose data is federated."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        load_all_plugins()
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=FederatedDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_class=FederatedTrainer,  # type: ignore[arg-type]
            save_config_callback=None,
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "datamodule"}, "test": {"model", "datamodule"}}

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(
            FederatedTrainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True,
            skip={*_PLUGIN_SECTIONS, "seed"},
        )
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=True)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Every plugin section defaults to None, never to an instance: jsonargparse carries a default's
        # init_args into any other class given later that has arguments of the same names (its issue #460),
        # so a default FedAvg would hand its weighted=True to a third-party GeoMed(weighted=False).
        parser.add_argument(
            "--strategy", type=Strategy | str | None, default=None,
            help="Aggregation strategy: a registered name (see `lightfed strategies`) or class_path/init_args; "
                 "null is FedAvg.",
        )
        parser.add_argument(
            "--privacy", type=PrivacyMechanism | None, default=None,
            help="Differential privacy mechanism (class_path/init_args), or null.",
        )
        parser.add_argument(
            "--secure_aggregation", type=SecureAggregation | None, default=None,
            help="Secure aggregation protocol (class_path/init_args), or null.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> FederatedTrainer:
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        config = self.config[self.subcommand] if self.subcommand else self.config
        extra = {key: init.get(key) for key in _PLUGIN_SECTIONS}
        trainer = super().instantiate_trainer(**extra, seed=int(config.get("seed_everything") or 0), **kwargs)
        trainer.config_yaml = self._parser(self.subcommand).dump(config)
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> FederatedTrainer:  # type: ignore[override]
        return FederatedTrainer(**config)


def print_plugins() -> None:
    """``lightfed strategies``: every registered plugin, its description and where it came from."""
    import lightfed.executors  # noqa: F401 - registers the built-in executors (vmap)
    import lightfed.privacy  # noqa: F401 - registers the built-in privacy mechanisms
    import lightfed.secagg  # noqa: F401 - registers the built-in secure aggregation protocols

    load_all_plugins()
    for registry in (STRATEGIES, PRIVACY, SECURE_AGGREGATION, EXECUTORS):
        entries = registry.entries()
        print(f"{registry.group}:")
        if not entries:
            print("  (none installed)")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            print(f"  {e.name:<{width}}  {e.description}  [{e.origin}]")
        print()


def data_command(args: list[str]) -> None:
    """``lightfed data --config X.yaml``: print the partition's statistics and plot its label histogram."""
    from lightfed.data.stats import format_statistics, partition_statistics, plot_label_distribution

    cli = LightFedCLI(args=args, run=False, parser_kwargs=raising_parser_kwargs(LightFedCLI))
    dm = cli.datamodule
    stats = partition_statistics(dm)
    print(format_statistics(stats))
    out = Path(cli.trainer.default_root_dir) / "partition.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_label_distribution(dm, str(out))
    print(f"label distribution plot: {out}")
    if cli.trainer.logger is not None and hasattr(cli.trainer.logger, "experiment"):
        cli.trainer.logger.experiment.add_figure("data/label_distribution", fig, global_step=0)
        cli.trainer.logger.experiment.flush()
        print(f"and in TensorBoard under {cli.trainer.log_dir} (tag data/label_distribution)")


def usage() -> str:
    """The top-level ``lightfed --help``: every subcommand, without building any parser."""
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join([
        "usage: lightfed {" + ",".join(COMMANDS) + "} ...",
        "",
        "Federated learning on PyTorch Lightning, driven by LightningCLI YAML configs.",
        "",
        "commands:",
        *lines,
        "",
        "`lightfed <command> --help` lists a command's options. A config error is reported on one line;",
        f"{TRACEBACK_ENV}=1 shows its full traceback.",
    ])


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightfed`` console script.

    Raises:
        SystemExit: with status 2 after printing ``lightfed: error: ...`` on one line, for a config error
            (see :func:`plain_errors`); with status 0 after ``--help``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        if not args:
            raise SystemExit(2)
        return
    if args[0] not in COMMANDS and args[0] != "plugins" and not args[0].startswith("-"):
        close = difflib.get_close_matches(args[0], COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else " `lightfed --help` says what each does."
        print(f"lightfed: error: unknown command {args[0]!r}; the commands are {', '.join(COMMANDS)}.{hint}", file=sys.stderr)
        raise SystemExit(2)
    # sub-commands of our own hand LightningCLI a slice of sys.argv on purpose
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    with plain_errors(command=" ".join(args[:2] if args[0] == "central" else args[:1])):
        if args[0] in ("strategies", "plugins"):
            print_plugins()
        elif args[0] == "data":
            data_command(args[1:])
        elif args[0] == "central":
            from lightfed.central import CentralCLI
            from lightfed.central import main as central_main

            central_main(args[1:], parser_kwargs=raising_parser_kwargs(CentralCLI))
        else:
            LightFedCLI(args=args, parser_kwargs=raising_parser_kwargs(LightFedCLI))


# ---- config errors on one line -------------------------------------------------------------------------

#: Exceptions that a bad config raises where the bad value enters: jsonargparse's parse errors, and the
#: ValueError / TypeError / FileNotFoundError that lightfed and its plugins raise while they are set up.
CONFIG_ERRORS = (ArgumentError, ValueError, TypeError, FileNotFoundError)

#: Modules whose frames are machinery between the config and the code that judged it.
_MACHINERY = ("jsonargparse", "argparse", "typing", "lightning.pytorch.cli")


def raising_parser_kwargs(cli_class: type[LightningCLI]) -> dict[str, Any]:
    """``parser_kwargs`` that make jsonargparse raise :class:`ArgumentError` instead of printing and exiting."""
    return {"exit_on_error": False, **{name: {"exit_on_error": False} for name in cli_class.subcommands()}}


@contextmanager
def plain_errors(command: str = "fit") -> Iterator[None]:
    """Turn a config error into ``lightfed: error: <message>`` on stderr and exit status 2.

    A config error is a jsonargparse parse error, or a ValueError / TypeError / FileNotFoundError raised by
    jsonargparse while it instantiates the config's classes, or raised by a ``raise`` statement of lightfed
    or of a registered plugin (the checks that say what is wrong and how to fix it). Anything else -- a bug,
    an error inside torch -- keeps its traceback. With ``LIGHTFED_TRACEBACK=1`` every error keeps it.

    Args:
        command: The subcommand, for the ``lightfed <command> --help`` tip.
    """
    try:
        yield
    except RunFailedError as err:  # the run ran but produced no trained model: one line, exit status 1
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"lightfed: error: {_single_line(str(err))}", file=sys.stderr)
        raise SystemExit(1) from None
    except CONFIG_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or not is_config_error(err):
            raise
        print(f"lightfed: error: {error_line(err, command)}", file=sys.stderr)
        raise SystemExit(2) from None


def is_config_error(err: BaseException) -> bool:
    """Whether ``err`` reports a bad config (see :func:`plain_errors`) rather than a crash."""
    if isinstance(err, ArgumentError):
        return True
    module, line = _origin(err.__traceback__)
    if _is_machinery(module):
        return True
    return line.startswith("raise") and module.split(".")[0] in _own_packages()


def error_line(err: BaseException, command: str = "fit") -> str:
    """One line saying what is wrong and how to fix it.

    lightfed's own checks already say both, so the first exception of the chain (``raise ... from``) that
    code outside jsonargparse raised is quoted as it is: for a plugin's ``__init__`` that jsonargparse
    reports as a failed Union, that is the plugin's own ValueError. A jsonargparse message (an unknown key, a value of the wrong type) is flattened to
    its path and its innermost complaint, plus a tip: the nearest valid key, or the ``--help`` that lists
    what is accepted.
    """
    for cause in _chain(err):
        module, _ = _origin(cause.__traceback__)
        if not _is_machinery(module) and str(cause).strip():
            return _single_line(str(cause))
    return _flatten_jsonargparse(str(err), command)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _origin(tb: TracebackType | None) -> tuple[str, str]:
    """The module and the source line of the innermost frame of a traceback."""
    if tb is None:
        return "", ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    return str(frame.f_globals.get("__name__", "")), linecache.getline(frame.f_code.co_filename, tb.tb_lineno).strip()


def _is_machinery(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in _MACHINERY)


def _own_packages() -> set[str]:
    """``lightfed`` and the top-level package of every registered plugin."""
    registries = (STRATEGIES, PRIVACY, SECURE_AGGREGATION, EXECUTORS)
    return {"lightfed"} | {e.cls.__module__.split(".")[0] for r in registries for e in r.entries()}


def _single_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


_NOISE = ("Subtypes:", "Errors:", "Given value type:", "Does not validate against any of the Union subtypes")
_OTHER_ARM = re.compile(r"Expected a <class '(NoneType|str)'>\.?")


def _flatten_jsonargparse(message: str, command: str) -> str:
    """``Parser key "strategy": ... class_path 'P': Option 'muu' is not accepted`` -> one readable line.

    jsonargparse nests its message one level per config key, class_path and Union arm; the line keeps the
    path (keys and class paths, outermost first) and the innermost complaint, and drops the arms that were
    only alternatives (``Expected a <class 'NoneType'>``).
    """
    path: list[str] = []
    keys: list[str] = []
    class_paths: list[str] = []
    complaints: list[str] = []
    given = ""
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_NOISE) or _OTHER_ARM.fullmatch(line):
            continue
        if line.startswith("Given value:"):
            value = line.removeprefix("Given value:").strip()
            if not given and not value.startswith(("{", "Namespace(")):
                given = value
        elif m := re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', line):
            path.append(m[1])
            keys.append(m[1])
            complaints += [m[2]] if m[2] else []
        elif m := re.fullmatch(r"Problem with given class_path '([^']+)':\s*(.*)", line):
            path.append(m[1])
            class_paths.append(m[1])
            complaints += [m[2]] if m[2] else []
        else:
            complaints.append(line)
    what = (complaints[0] if complaints else _single_line(message)).rstrip(".")
    what = re.sub(r"Expected a <class '([\w.]+)'>\.? Got value: (.*)", r"expected \1, got '\2'", what)
    what = re.sub(r"Expected a <class '([\w.]+)'>", r"expected \1", what)
    if given and "got " not in what:
        what += f", got {given!r}"
    text = ": ".join([*path, what])
    return f"{text}. {_tip(message, keys, class_paths, command)}"


def _tip(message: str, keys: list[str], class_paths: list[str], command: str) -> str:
    """How to fix it: the nearest valid key or argument, else the ``--help`` that lists the valid ones."""
    close: list[str] = []
    if m := re.search(r"(?:Group '([^']+)' )?does not accept option '([^']+)'", message):
        key = f"{m[1]}.{m[2]}" if m[1] else m[2]
        close = [f"'{c}'" for c in difflib.get_close_matches(key, _known_keys(key), n=1)]
    elif (m := re.search(r"unrecognized arguments: --([\w.]+)", message)) and command in COMMANDS:
        close = [f"--{c}" for c in difflib.get_close_matches(m[1], _known_keys(m[1]), n=1)]
    elif (m := re.search(r"Option '([^']+)' is not accepted", message)) and class_paths:
        close = [f"'{c}'" for c in difflib.get_close_matches(m[1], _init_arguments(class_paths[-1]) or [], n=1)]
    if close:
        return f"Did you mean {close[0]}?"
    if keys == ["config"]:
        return "Check the path given to --config."
    if class_paths and keys:
        if _init_arguments(class_paths[-1]) is None:
            listing = " (`lightfed strategies` lists the registered plugins)" if keys[0] in _PLUGIN_SECTIONS else ""
            return f"Give the dotted path of an importable class{listing}."
        return f"`lightfed {command} --{keys[0]}.help {class_paths[-1]}` lists what it accepts."
    return f"`lightfed {command} --help` lists every option."


def _known_keys(key: str) -> list[str]:
    """Valid keys near ``key``: the trainer's arguments, or the top-level sections."""
    if key.startswith("trainer."):
        return [f"trainer.{name}" for name in inspect.signature(FederatedTrainer).parameters]
    sections = ["model", "data", "trainer", *_PLUGIN_SECTIONS, "seed_everything", "ckpt_path", "optimizer", "lr_scheduler"]
    return sections if "." not in key else []


def _init_arguments(class_path: str) -> list[str] | None:
    """The ``__init__`` argument names of ``class_path``; ``None`` if it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return None


if __name__ == "__main__":
    main()
