"""The ``lightfed`` command: LightningCLI for federated runs, plus ``strategies``, ``data``, ``central`` and
``new-strategy``.

``lightfed fit --config experiments/digits_fedavg.yaml`` parses a YAML with the usual LightningCLI
sections -- ``model`` and ``data`` (``class_path`` / ``init_args``), ``trainer`` (the
:class:`~lightfed.trainer.FederatedTrainer`'s arguments) -- plus top-level ``strategy``, ``privacy`` and
``secure_aggregation`` sections, each a registered plugin name or a ``class_path`` with ``init_args``
validated from the class's type hints. ``--print_config``, ``--help`` and ``--trainer.rounds 20`` work as
in Lightning.

A mistake in the config ends the command with one line, ``lightfed: error: <what and how to fix it>``,
and exit status 2; ``LIGHTFED_TRACEBACK=1`` shows the full traceback instead (:func:`main`).

``lightfed test --ckpt_path C`` needs no ``--config``: a checkpoint holds the resolved config of its run.
This module imports no Lightning (``lightfed --help`` and ``lightfed strategies`` stay quick); the
LightningCLI subclass is :class:`lightfed.cli_lightning.LightFedCLI`.
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
from typing import TYPE_CHECKING, Any

# Nothing heavy at import time: `lightfed --help`, `strategies` and `new-strategy` never import Lightning.
# LightFedCLI lives in lightfed.cli_lightning and is re-exported lazily (see __getattr__ below).
if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

from lightfed.registry import PLUGIN_SECTIONS as _PLUGIN_SECTIONS  # noqa: E402 - stdlib-only module

#: Every ``lightfed`` subcommand and what it does (the top-level ``--help``).
COMMANDS = {
    "fit": "run the federated rounds of a config (lightfed fit --config X.yaml)",
    "test": "evaluate a checkpoint on the central test set (lightfed test --ckpt_path C; the config is read from C)",
    "data": "print a config's partition statistics and draw every client's label counts as a heatmap",
    "strategies": "list every registered strategy, privacy mechanism, secure aggregation protocol, executor and audit",
    "central": "centralised Lightning training of the same model and data (lightfed central fit --config X.yaml)",
    "new-strategy": "write a strategy plugin package: entry point, one strategy, a conformance test (NAME [--dir D])",
    "audit": "attacks on a finished model: membership inference (lightfed audit --config X.yaml --ckpt_path C)",
}

#: Set to 1 to see the full traceback of a config error instead of one line.
TRACEBACK_ENV = "LIGHTFED_TRACEBACK"


def __getattr__(name: str) -> Any:
    """``from lightfed.cli import LightFedCLI`` keeps working; Lightning is imported only then."""
    if name in ("LightFedCLI", "DataOnlyCLI"):
        return getattr(importlib.import_module("lightfed.cli_lightning"), name)
    raise AttributeError(f"module 'lightfed.cli' has no attribute {name!r}")


def print_plugins() -> None:
    """``lightfed strategies``: every registered plugin (strategies, privacy, secure aggregation, executors, audits)."""
    import lightfed.executors  # noqa: F401 - registers the built-in executors (vmap)
    import lightfed.privacy  # noqa: F401 - registers the built-in privacy mechanisms
    import lightfed.secagg  # noqa: F401 - registers the built-in secure aggregation protocols
    from lightfed.registry import AUDITS, EXECUTORS, PRIVACY, SECURE_AGGREGATION, STRATEGIES, load_all_plugins

    load_all_plugins()
    for registry in (STRATEGIES, PRIVACY, SECURE_AGGREGATION, EXECUTORS, AUDITS):
        entries = registry.entries()
        print(f"{registry.group}:")
        if not entries:
            print("  (none installed)")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            print(f"  {e.name:<{width}}  {e.description}  [{e.origin}]")
        print()


def data_command(args: list[str]) -> None:
    """``lightfed data --config X.yaml``: print the partition's statistics and draw its label heatmap.

    Only the datamodule (and the trainer, for where to write) is built: the model section is parsed but no
    model is instantiated, so no pretrained weights are loaded.
    """
    from lightfed.cli_lightning import DataOnlyCLI
    from lightfed.data.stats import format_statistics, log_partition, partition_statistics, plot_partition

    cli = DataOnlyCLI(args=args, run=False, parser_kwargs=raising_parser_kwargs(DataOnlyCLI))
    dm = cli.datamodule
    stats = partition_statistics(dm)
    print(format_statistics(stats))
    out = Path(cli.trainer.default_root_dir) / "partition.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_partition(dm, str(out), stats=stats)
    print(f"partition heatmap ({stats['num_clients']} clients, sorted): {out}")
    if log_partition(cli.trainer.logger, dm, stats=stats):
        print(f"and in TensorBoard under {cli.trainer.log_dir} (tag data/partition)")


def config_from_checkpoint(path: str) -> str:
    """The resolved config (YAML) that a lightfed checkpoint was written with.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file holds no config (not a lightfed checkpoint, or written by the Python API).
    """
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt_path {path!r} does not exist; point it at a lightfed checkpoint (.../checkpoints/last.ckpt).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    progress = state.get("progress", {}) if isinstance(state, dict) else {}
    config = (progress.get("config") if isinstance(progress, dict) else None) or (
        state.get("config") if isinstance(state, dict) else None
    )
    if not config:
        raise ValueError(
            f"checkpoint {path!r} holds no config (not written by `lightfed fit`); give the run's config too: "
            f"lightfed test --config X.yaml --ckpt_path {path}"
        )
    return str(config)


def _with_checkpoint_config(args: list[str]) -> list[str]:
    """``test --ckpt_path C`` without ``--config``: the config stored in ``C`` goes first on the command line."""
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        return args
    ckpt = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--ckpt_path"), None)
    ckpt = ckpt or next((a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")), None)
    if ckpt is None or "--help" in args or "-h" in args:
        return args
    # jsonargparse's --config takes a path or the YAML itself; later arguments still override it
    return [args[0], "--config", config_from_checkpoint(ckpt), *args[1:]]


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
        elif args[0] == "new-strategy":
            from lightfed.strategy_template import main as new_strategy

            new_strategy(args[1:])
        elif args[0] == "data":
            data_command(args[1:])
        elif args[0] == "audit":
            from lightfed.audit.cli import main as audit_main

            audit_main(args[1:])
        elif args[0] == "central":
            from lightfed.baseline import CentralCLI
            from lightfed.baseline import main as central_main

            central_main(args[1:], parser_kwargs=raising_parser_kwargs(CentralCLI))
        else:
            from lightfed.cli_lightning import LightFedCLI

            if args[0] == "test":
                args = _with_checkpoint_config(args)
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
    except CONFIG_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or not is_config_error(err):
            raise
        print(f"lightfed: error: {error_line(err, command)}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as err:
        if not _is_run_failed(err) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"lightfed: error: {_single_line(str(err))}", file=sys.stderr)  # the run produced no trained model
        raise SystemExit(1) from None


def _is_run_failed(err: BaseException) -> bool:
    """Whether ``err`` is the trainer's :class:`~lightfed.trainer.RunFailedError` (looked up without importing it)."""
    trainer = sys.modules.get("lightfed.trainer")  # not imported: no run happened, so no run failed
    return trainer is not None and isinstance(err, trainer.RunFailedError)


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
    from lightfed.registry import EXECUTORS, PRIVACY, SECURE_AGGREGATION, STRATEGIES

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
        close = [f"'{c}'" for c in difflib.get_close_matches(key, _known_keys(key, command), n=1)]
    elif (m := re.search(r"unrecognized arguments: --([\w.]+)", message)) and command.split()[0] in COMMANDS:
        close = [f"--{c}" for c in difflib.get_close_matches(m[1], _known_keys(m[1], command), n=1)]
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


def _known_keys(key: str, command: str = "fit") -> list[str]:
    """Valid keys near ``key``: the trainer's arguments, or the top-level sections.

    ``lightfed central`` takes ``lightning.Trainer``'s arguments; the other commands the
    :class:`~lightfed.trainer.FederatedTrainer`'s.
    """
    central = command.startswith("central")
    if key.startswith("trainer."):
        if central:
            from lightning import Trainer
        else:
            from lightfed.trainer import FederatedTrainer as Trainer  # type: ignore[assignment]
        return [f"trainer.{name}" for name in inspect.signature(Trainer).parameters]
    own = ["export", "init_checkpoint", "init_ignore", "trainable"] if central else list(_PLUGIN_SECTIONS)
    sections = ["model", "data", "trainer", *own, "seed_everything", "ckpt_path", "optimizer", "lr_scheduler"]
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
