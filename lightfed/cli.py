"""The ``lightfed`` command: LightningCLI for federated runs, plus ``strategies``, ``data``, ``central`` and
``new-strategy``.

``lightfed fit --config experiments/digits_fedavg.yaml`` parses a YAML with the usual LightningCLI
sections -- ``model`` and ``data`` (``class_path`` / ``init_args``), ``trainer`` (the
:class:`~lightfed.trainer.FederatedTrainer`'s arguments) -- plus top-level ``strategy``, ``privacy`` and
``secure_aggregation`` sections, each a registered plugin name or a ``class_path`` with ``init_args``
validated from the class's type hints. ``--print_config``, ``--help`` and ``--trainer.rounds 20`` work as
in Lightning.

A mistake in the config ends the command with one line, ``lightfed: error: <what and how to fix it>``,
and exit status 2; a run that fails, 1; Ctrl-C, 130 (:mod:`lightfed.cli_errors`). ``LIGHTFED_TRACEBACK=1``
shows the full traceback instead.

``lightfed test --ckpt_path C`` needs no ``--config``: a checkpoint holds the resolved config of its run.
This module imports no Lightning (``lightfed --help`` and ``lightfed strategies`` stay quick); the
LightningCLI subclass is :class:`lightfed.cli_lightning.LightFedCLI`.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

# Nothing heavy at import time: `lightfed --help`, `strategies` and `new-strategy` never import Lightning.
# LightFedCLI lives in lightfed.cli_lightning and is re-exported lazily (see __getattr__ below).
from lightfed.cli_errors import (
    TRACEBACK_ENV,
    is_config_error,
    plain_errors,
    raising_parser_kwargs,
)

#: Every ``lightfed`` subcommand and what it does (the top-level ``--help``).
COMMANDS = {
    "fit": "run the federated rounds of a config (lightfed fit --config X.yaml)",
    "test": "evaluate a checkpoint on the central test set (lightfed test --ckpt_path C; the config is read from C)",
    "data": "print a config's partition statistics and draw every client's label counts as a heatmap",
    "strategies": "list every registered strategy, privacy mechanism, secure aggregation protocol, executor and audit",
    "central": "centralised Lightning training of the same model and data (lightfed central fit --config X.yaml)",
    "new-strategy": "write a strategy plugin package: entry point, one strategy, a conformance test (NAME [--dir D])",
    "audit": "attacks on a finished model: membership inference (lightfed audit --config X.yaml --ckpt_path C)",
    "generate": "complete a prompt with a trained CausalLM (lightfed generate --ckpt_path C --prompt P)",
}

def __getattr__(name: str) -> Any:
    """``from lightfed.cli import LightFedCLI`` keeps working; Lightning is imported only then."""
    if name in ("LightFedCLI", "DataOnlyCLI", "config_from_checkpoint"):
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


def _with_checkpoint_config(args: list[str]) -> list[str]:
    """``test --ckpt_path C`` without ``--config``: the config stored in ``C`` goes first on the command line."""
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        return args
    ckpt = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--ckpt_path"), None)
    ckpt = ckpt or next((a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")), None)
    if ckpt is None or "--help" in args or "-h" in args:
        return args
    from lightfed.cli_lightning import config_from_checkpoint

    # jsonargparse's --config takes a path or the YAML itself; later arguments still override it
    return [args[0], "--config", config_from_checkpoint(ckpt), *args[1:]]


#: Set to 1 to see every library's own messages (Lightning's tips and seed lines, FutureWarnings, progress
#: bars of Hugging Face loading): by default ``lightfed`` prints its own progress and results only.
VERBOSE_ENV = "LIGHTFED_VERBOSE"


def quiet() -> None:
    """Silence what other libraries print around a run, unless ``LIGHTFED_VERBOSE=1``.

    Lightning's ``Seed set to N`` (once per model built) and rank-zero tips, FutureWarnings and
    DeprecationWarnings addressed to library authors, and Hugging Face's loading progress bars. Warnings
    that concern the run (lightfed's own, a UserWarning) still show.
    """
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("lightning.fabric.utilities.seed", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


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
            (see :mod:`lightfed.cli_errors`), 1 for a failed run, 130 for Ctrl-C; 0 after ``--help``.
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
    quiet()
    with plain_errors(command=" ".join(args[:2] if args[0] == "central" else args[:1]), argv=args):
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
        elif args[0] == "generate":
            from lightfed.generate import main as generate_main

            generate_main(args[1:])
        elif args[0] == "central":
            from lightfed.baseline import CentralCLI
            from lightfed.baseline import main as central_main

            central_main(args[1:], parser_kwargs=raising_parser_kwargs(CentralCLI))
        else:
            from lightfed.cli_lightning import LightFedCLI

            if args[0] == "test":
                args = _with_checkpoint_config(args)
            LightFedCLI(args=args, parser_kwargs=raising_parser_kwargs(LightFedCLI))


__all__ = ["COMMANDS", "TRACEBACK_ENV", "VERBOSE_ENV", "config_from_checkpoint", "is_config_error", "main",  # noqa: F822
           "plain_errors",
           "quiet",
           "raising_parser_kwargs"]


if __name__ == "__main__":
    main()
