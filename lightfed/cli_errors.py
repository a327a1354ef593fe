"""One line instead of a traceback: how ``lightfed`` reports a bad config, a failed run and a Ctrl-C.

:func:`plain_errors` wraps every ``lightfed`` command. What it catches, and the exit status:

1. a config error (jsonargparse's parse errors; a ValueError / TypeError / FileNotFoundError raised by a
   check of lightfed or of a registered plugin): ``lightfed: error: <what and how to fix it>``, status 2;
2. a run that failed (:class:`~lightfed.trainer.RunFailedError`), a file it could not write (a read-only
   folder, a full disk) or memory it could not get: ``lightfed: error: ...``, status 1;
3. Ctrl-C: ``lightfed: interrupted ...`` with the round it stopped at and the command that resumes it,
   status 130 (128 + SIGINT, as a shell reports it).

Anything else -- a bug, an error inside torch -- keeps its traceback; ``LIGHTFED_TRACEBACK=1`` keeps every
traceback. jsonargparse nests its messages one level per key, class_path and Union arm: :func:`error_line`
flattens them to the path and the innermost complaint, plus a tip (the nearest valid key or registered name).
"""

from __future__ import annotations

import difflib
import errno
import importlib
import inspect
import linecache
import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

from lightfed.registry import PLUGIN_SECTIONS as _PLUGIN_SECTIONS  # noqa: E402 - stdlib-only module

#: Set to 1 to see the full traceback of an error instead of one line.
TRACEBACK_ENV = "LIGHTFED_TRACEBACK"

#: Exit statuses: a bad config (argparse's own), a run that failed, an interrupt (128 + SIGINT).
EXIT_CONFIG, EXIT_RUN, EXIT_INTERRUPTED = 2, 1, 130


#: Exceptions that a bad config raises where the bad value enters: jsonargparse's parse errors, and the
#: ValueError / TypeError / FileNotFoundError that lightfed and its plugins raise while they are set up.
CONFIG_ERRORS = (ArgumentError, ValueError, TypeError, FileNotFoundError)

#: Modules whose frames are machinery between the config and the code that judged it.
_MACHINERY = ("jsonargparse", "argparse", "typing", "lightning.pytorch.cli")


def raising_parser_kwargs(cli_class: type[LightningCLI]) -> dict[str, Any]:
    """``parser_kwargs`` that make jsonargparse raise :class:`ArgumentError` instead of printing and exiting,
    and take no abbreviation (``--trainer.round 5`` is an unknown option, not ``--trainer.rounds 5``)."""
    own = {"exit_on_error": False, "allow_abbrev": False}
    return {**own, **{name: dict(own) for name in cli_class.subcommands()}}


class _Run:
    """The run a command is training (set by :func:`watch_run`), for the line that a Ctrl-C prints."""

    trainer: Any = None


def watch_run(trainer: Any) -> None:
    """Remember the trainer of the command being run: a Ctrl-C then says which round it stopped at."""
    _Run.trainer = trainer


@contextmanager
def plain_errors(command: str = "fit", argv: list[str] | None = None) -> Iterator[None]:
    """Turn an error into one line on stderr and an exit status (see the module docstring for which).

    Args:
        command: The subcommand, for the ``lightfed <command> --help`` tip.
        argv: The command's arguments (without ``lightfed``), for the resume command a Ctrl-C prints.

    Raises:
        SystemExit: 2 for a config error, 1 for a failed run, 130 for an interrupt.
    """
    _Run.trainer = None
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - what is not recognised is raised again
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        reported = report(err, command, argv or [])
        if reported is None:
            raise
        status, line = reported
        print(line, file=sys.stderr)
        raise SystemExit(status) from None
    finally:
        _Run.trainer = None


def report(err: BaseException, command: str, argv: list[str]) -> tuple[int, str] | None:
    """The exit status and the one line for ``err``; ``None`` for an error that keeps its traceback."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"lightfed: interrupted: {interrupted_line(_Run.trainer, command, argv)}"
    if isinstance(err, CONFIG_ERRORS) and is_config_error(err):
        return EXIT_CONFIG, f"lightfed: error: {error_line(err, command)}"
    if _is_run_failed(err):  # the run produced no trained model
        return EXIT_RUN, f"lightfed: error: {_single_line(str(err))}"
    if isinstance(err, MemoryError):
        return EXIT_RUN, f"lightfed: error: {memory_line(err)}"
    write = _write_error(err)
    if write is not None:
        return EXIT_RUN, f"lightfed: error: {write_line(write, _Run.trainer, command, argv)}"
    return None


#: errno values of a file that could not be written: no permission, a read-only file system, a full disk,
#: a path through a file.
WRITE_ERRNOS = (
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
)


def _write_error(err: BaseException) -> OSError | None:
    """The OSError of a failed write in ``err``'s chain (lightfed wraps some: ``raise OSError() from e``)."""
    for cause in _chain(err):
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            if cause.errno in WRITE_ERRNOS or (cause.errno is None and _raised_by_lightfed(cause)):
                return cause
    return None


def _raised_by_lightfed(err: BaseException) -> bool:
    module, line = _origin(err.__traceback__)
    return line.startswith("raise") and module.split(".")[0] == "lightfed"


def write_line(err: OSError, trainer: Any, command: str, argv: list[str]) -> str:
    """``cannot write <file>: <why>`` and the fix: free space, or a writable ``trainer.default_root_dir``."""
    if err.errno is None:  # lightfed's own message already names the file and the fix
        what = _single_line(str(err)).rstrip(".") + "."
    else:
        target = f" {str(err.filename)!r}" if err.filename else ""
        what = f"cannot write{target}: {err.strerror or os.strerror(err.errno)}."
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            what += " Free space on that disk, or point trainer.default_root_dir at another one."
        elif err.errno in (errno.ENOTDIR, errno.EISDIR):
            what += " A file stands where a folder is needed (or the reverse); choose another path."
        else:
            what += " Make it writable, or point trainer.default_root_dir at a writable folder."
    ckpt = _newest_checkpoint(trainer, argv)
    if trainer is not None and command == "fit" and ckpt is not None:
        what += (f" The checkpoint {str(ckpt)!r} holds round {_checkpoint_round(ckpt)}: "
                 f"{_resume_command(argv, ckpt)}")
    return what


def memory_line(err: MemoryError) -> str:
    """Out of memory: the config's size that most often causes it (``trainer.rounds`` under privacy)."""
    detail = _single_line(str(err)) or "MemoryError"
    return (f"out of memory ({detail}). Lower what grows with the config: trainer.rounds (a DP accountant "
            f"composes every round), clients_per_round, batch_size, or the model.")


def interrupted_line(trainer: Any, command: str, argv: list[str]) -> str:
    """The round a Ctrl-C stopped at, the newest checkpoint, and the command that resumes from it."""
    if trainer is None or getattr(trainer, "global_params", None) is None:
        return "stopped before the first round; nothing to resume."
    release = getattr(trainer, "_release_log_dir", None)
    if callable(release):  # the run is over: its folder is free for the resume
        release()
    done, rounds = int(trainer.round_idx), int(trainer.rounds)
    where = f"stopped in round {done + 1} of {rounds} ({done} complete)"
    where = "stopped at the end" if done >= rounds else where
    if command != "fit":
        return f"{where}."
    ckpt = _newest_checkpoint(trainer, argv)
    if ckpt is None:
        every = getattr(trainer, "checkpoint_every", None)
        return (f"{where}; no checkpoint was written yet (trainer.checkpoint_every={every}), so the run "
                f"starts over: lightfed {' '.join(argv)}")
    return (f"{where}; the checkpoint {str(ckpt)!r} holds round {_checkpoint_round(ckpt)}: "
            f"{_resume_command(argv, ckpt)}")


def _newest_checkpoint(trainer: Any, argv: list[str]) -> Path | None:
    """The checkpoint this run wrote last, else the one it resumed from."""
    written = getattr(trainer, "last_checkpoint", None)
    if written is not None and Path(written).is_file():
        return Path(written)
    given = _option(argv, "--ckpt_path")
    return Path(given) if given and Path(given).is_file() else None


def _checkpoint_round(path: Path) -> str:
    """The round count in a checkpoint's name (``round-00003.ckpt``; ``last.ckpt`` links to one)."""
    m = re.search(r"round-(\d+)", Path(path).resolve().name)
    return str(int(m[1])) if m else "?"


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _resume_command(argv: list[str], ckpt: Path) -> str:
    """``argv`` with ``--ckpt_path ckpt`` in place of any other: the command that continues the run."""
    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--ckpt_path":
            skip = True
        elif not a.startswith("--ckpt_path="):
            kept.append(a)
    return f"resume with `lightfed {' '.join(kept)} --ckpt_path {ckpt}`"


def unreadable_checkpoint(path: str, err: BaseException) -> str:
    """The one line for a ``--ckpt_path`` that exists but cannot be read."""
    text = " ".join(str(err).split())
    # torch's weights-only loader prefixes three sentences of advice; its reason comes after "error:"
    why = (text.rsplit("Unpickler error:", 1)[-1] if "Unpickler error:" in text else text).strip()[:120]
    why = why.split(" Check the documentation")[0].rstrip(". ") or type(err).__name__
    return (f"--ckpt_path {path!r} is not a readable checkpoint (truncated, or not a torch file: {why}). "
            f"Point it at a complete lightfed checkpoint: .../checkpoints/last.ckpt, or an earlier "
            f"round-*.ckpt.")


def _is_run_failed(err: BaseException) -> bool:
    """Whether ``err`` is the trainer's :class:`~lightfed.trainer.RunFailedError` (not imported to check)."""
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
    reports as a failed Union, that is the plugin's own ValueError. A jsonargparse message (an unknown key, a
    value of the wrong type, a class_path that does not import) is flattened to its path and its innermost
    complaint, plus a tip: the nearest valid key or class, or the ``--help`` that lists what is accepted.
    """
    for cause in _chain(err):
        module, _ = _origin(cause.__traceback__)
        if isinstance(cause, (AttributeError, ImportError)):  # a class_path that does not import: name the key
            continue
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
    name = str(frame.f_globals.get("__name__", ""))
    spec = frame.f_globals.get("__spec__")
    if name == "__main__" and spec is not None:  # `python -m lightfed.cli`: the module is lightfed.cli
        name = str(spec.name)
    return name, linecache.getline(frame.f_code.co_filename, tb.tb_lineno).strip()


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
            if not given and not value.startswith(("{", "Namespace(", "NestedArg(")):
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
    elif (m := re.search(r"unrecognized arguments: --([\w.]+)", message)) :
        close = [f"--{c}" for c in difflib.get_close_matches(m[1], _known_keys(m[1], command), n=1)]
    elif (m := re.search(r"Option '([^']+)' is not accepted", message)) and class_paths:
        accepted = _init_arguments(class_paths[-1]) or []
        close = [f"'{c}'" for c in difflib.get_close_matches(m[1], accepted, n=1)]
    if close:
        return f"Did you mean {close[0]}?"
    if keys == ["config"]:
        return "Check the path given to --config."
    if keys and (m := re.search(r"Expected a dot import path string: ([\w.]+)", message)):
        class_paths = [m[1]]
    if class_paths and keys:
        if (near := _closest_class(class_paths[-1], keys[0])) is not None:
            return f"Did you mean {near!r}?"
        if _init_arguments(class_paths[-1]) is None:
            plugin = keys[0] in _PLUGIN_SECTIONS
            listing = " (`lightfed strategies` lists the registered plugins)" if plugin else ""
            return f"Give the dotted path of an importable class{listing}."
        return f"`lightfed {command} --{keys[0]}.help {class_paths[-1]}` lists what it accepts."
    return f"`lightfed {command} --help` lists every option."


def _closest_class(class_path: str, section: str) -> str | None:
    """The importable class nearest to a ``class_path`` that does not import: a public class of its module
    (``lightfed.models.MLPClasifier`` -> ``lightfed.models.MLPClassifier``) or, for a plugin section, the
    nearest registered name (``FedProxx`` -> ``FedProx``)."""
    module_name, _, name = class_path.rpartition(".")
    candidates: dict[str, str] = {}
    try:
        module = importlib.import_module(module_name) if module_name else None
    except ImportError:
        module = None
    if section in _PLUGIN_SECTIONS:
        from lightfed.registry import PRIVACY, SECURE_AGGREGATION, STRATEGIES

        registries = {"strategy": STRATEGIES, "privacy": PRIVACY, "secure_aggregation": SECURE_AGGREGATION}
        registry = registries[section]
        candidates.update({e.name: e.name for e in registry.entries()})
    if module is not None:  # the module's own classes win: their dotted path always imports
        names = set(getattr(module, "__all__", [])) | {n for n in vars(module) if not n.startswith("_")}
        candidates.update({n: f"{module_name}.{n}" for n in names if n[:1].isupper()})
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return candidates[close[0]] if close and close[0] != name else None


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


