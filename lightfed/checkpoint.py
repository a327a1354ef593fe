"""Reading pretrained weights, writing and reading lightfed checkpoints, exporting the global model."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Weights from a Lightning ``.ckpt``, a lightfed checkpoint, a torch state dict or a ``.safetensors`` file.

    Torch files are read with ``weights_only=True``: loading a checkpoint never runs pickled code.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no recognisable state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist; fix the path (`trainer.init_checkpoint` / `--ckpt_path`).")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(
            f"could not read {str(p)!r} with torch.load(weights_only=True): {err}. Save plain tensors "
            f"(a state dict) or a .safetensors file."
        ) from err
    if isinstance(obj, dict):
        if obj.get("format") == 2 and isinstance(obj.get("model"), dict):
            # a lightfed checkpoint: what trained (frozen base parameters are only fingerprinted; they come
            # from the model's own initialisation: skip them with `trainer.init_ignore` if they are reported missing)
            obj = obj["model"]["state"]
        for key in ("state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if all(isinstance(v, Tensor) for v in obj.values()) and obj:
            return obj
    raise ValueError(f"{str(p)!r} holds no state dict (expected {{name: tensor}}, a Lightning .ckpt or a lightfed checkpoint).")


def load_into(module: nn.Module, state: dict[str, Tensor], ignore: Sequence[str] = (), source: str = "checkpoint") -> None:
    """Load ``state`` into ``module`` strictly, except keys matching an ``ignore`` pattern.

    Raises:
        ValueError: listing the first missing / unexpected / mis-shaped keys.
    """
    def kept(name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, pat) for pat in ignore)

    own = {k: v for k, v in module.state_dict().items() if kept(k)}
    given = {k: v for k, v in state.items() if kept(k)}
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k}: {tuple(given[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in given and given[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match {type(module).__name__}: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}, shape mismatches {shapes[:5]}. Use the checkpoint of this model, or skip keys "
            f"with `trainer.init_ignore` (e.g. ['head.*'] to re-initialise a new head)."
        )
    module.load_state_dict(given, strict=False)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: an interrupted save never corrupts an old file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, p)


def export_state_dict(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write the module's full state dict as ``.safetensors`` (or a torch file for any other suffix)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(p))
    else:
        torch.save(state, p)
    return p


def to_cpu(obj: Any) -> Any:
    """Recursively move tensors to CPU (checkpoints load on any device)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


#: How many ``round-*.ckpt`` files a run keeps by default (``trainer.keep_checkpoints``): the newest few, as
#: Lightning's ``save_top_k`` bounds its files, so a long run never fills the disk with old rounds.
DEFAULT_KEEP_CHECKPOINTS = 3


def write_checkpoint(state: dict[str, Any], target: Path, rotate: bool = True, keep: int | None = None) -> None:
    """Save ``state`` atomically to ``target``; with ``rotate``, point ``last.ckpt`` beside it at it and keep
    only the newest ``keep`` ``round-*.ckpt`` files (``target`` always among them, so ``last.ckpt`` never
    dangles, even when a resume from an older round writes below a newer file).

    Raises:
        OSError: naming the path (a full disk, a read-only folder).
    """
    try:
        save_atomic(state, target)
        if rotate:
            _link(target, target.parent / "last.ckpt")
            if keep is not None:
                prune_checkpoints(target, keep)
    except (OSError, RuntimeError) as err:  # torch.save reports some file errors as RuntimeError
        raise OSError(
            f"could not write the checkpoint {str(target)!r}: {err}. Free space or fix the permissions of "
            f"{str(target.parent)!r} (trainer.default_root_dir)."
        ) from err


def prune_checkpoints(target: Path, keep: int) -> list[Path]:
    """Delete all but ``target`` and the newest ``keep - 1`` other ``round-*.ckpt`` files; return the deleted."""
    others = sorted(p for p in target.parent.glob("round-*.ckpt") if p.name != target.name)
    doomed = others[: max(0, len(others) - (keep - 1))]
    for old in doomed:
        old.unlink(missing_ok=True)
    return doomed


def _link(target: Path, link: Path) -> None:
    """Point ``link`` at ``target``: a relative symlink, else a hard link, else a copy."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)
    except OSError:
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def claim_directory(root: Path, resumed: bool) -> Path:
    """Take ``root/.lightfed.lock`` for this process; returns the lock file (delete it to release).

    The lock is taken atomically: its content (:func:`lock_identity`) is written to a private temporary file
    which is then hard-linked to the lock's name, so the lock never exists empty or half-written, and
    ``link`` fails for every claimer but one. A lock is stale (taken over) when its holder is provably gone:
    another boot of this machine, a pid that no longer runs, or a pid that now belongs to another process
    (its start time differs: a reused pid, or this very process after a container restart). Stale checks and
    take-overs are serialised by ``flock`` on ``.lightfed.lock.guard`` (released by the kernel when a claimer
    dies). A lock written on another host is never judged: it is refused, naming the host.

    Raises:
        ValueError: another live run holds the lock, or ``root`` already holds a run's checkpoints and this
            run does not resume it (an unversioned directory would be overwritten).
    """
    root.mkdir(parents=True, exist_ok=True)
    lock = root / ".lightfed.lock"
    me = lock_identity()
    tmp = root / f".lightfed.lock.{me['token']}"
    tmp.write_text(json.dumps(me))
    try:
        with _guard(root / ".lightfed.lock.guard"):
            try:
                _create_exclusive(tmp, lock)
            except FileExistsError:
                holder = _read_lock(lock)
                why = stale_reason(holder, me)
                if why is None:
                    raise ValueError(
                        f"trainer.default_root_dir {str(root)!r} is in use by another lightfed run "
                        f"({_describe(holder)}); with logger: false runs are not versioned. Give each run its own "
                        f"default_root_dir, or enable the logger (or delete {str(lock)!r} if that run is gone)."
                    ) from None
                lock.unlink(missing_ok=True)  # the lock of a run that is gone (``why``)
                _create_exclusive(tmp, lock)
    finally:
        tmp.unlink(missing_ok=True)
    if not resumed and (root / "checkpoints" / "last.ckpt").exists():
        lock.unlink(missing_ok=True)
        raise ValueError(
            f"trainer.default_root_dir {str(root)!r} already holds a run's checkpoints (logger: false does not version "
            f"runs): resume it with --ckpt_path {str(root / 'checkpoints' / 'last.ckpt')!r}, or use another "
            f"default_root_dir."
        )
    return lock


def lock_identity(pid: int | None = None) -> dict[str, Any]:
    """Who holds a lock: pid, the pid's start time (``/proc/<pid>/stat`` field 22, in clock ticks since
    boot), the host name, the boot id and a random token (unique to this claim)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": _start_time(pid), "host": socket.gethostname(), "boot": _boot_id(),
            "token": secrets.token_hex(8)}


def stale_reason(holder: dict[str, Any] | None, me: dict[str, Any]) -> str | None:
    """Why the lock of ``holder`` is stale as seen by ``me`` (``None``: it may be live, keep it).

    ``holder`` is ``None`` for an unreadable lock (never written by this version, which links complete files);
    ``{"pid": p}`` alone is a legacy pid-only lock: stale if ``p`` is dead or is this process.
    """
    if holder is None:
        return "unreadable lock file"
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "no pid in the lock file"
    if "host" in holder and holder["host"] != me["host"]:
        return None  # another machine (a shared file system): we cannot look at its processes
    if holder.get("boot") is not None and me["boot"] is not None and holder["boot"] != me["boot"]:
        return f"written before the last boot (boot id {holder['boot']})"
    if not _alive(pid):
        return f"pid {pid} is not running"
    start = _start_time(pid)
    if "start" not in holder:  # legacy lock: pid only
        return f"pid {pid} is this process" if pid == me["pid"] else None
    if holder["start"] is not None and start is not None and holder["start"] != start:
        return f"pid {pid} now belongs to another process (started at tick {start}, the holder at {holder['start']})"
    return None


def _create_exclusive(tmp: Path, lock: Path) -> None:
    """Make ``lock`` a complete copy of ``tmp``, failing with ``FileExistsError`` if it exists: a hard link
    (atomic with its content); where the file system has none, ``O_CREAT | O_EXCL`` then one write (the
    ``flock`` guard keeps other claimers from reading it half-written)."""
    try:
        os.link(tmp, lock)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, tmp.read_bytes())
        finally:
            os.close(fd)


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    if text.isdigit():
        return {"pid": int(text)}
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "unknown holder"
    host = f" on host {holder['host']}" if "host" in holder else ""
    return f"pid {holder.get('pid')}{host}"


def _start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (after the parenthesised command name, which may hold spaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def _guard(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block (best effort where the file system has none)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
