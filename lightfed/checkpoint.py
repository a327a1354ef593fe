"""Reading pretrained weights, writing and reading lightfed checkpoints, exporting the global model."""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

CHECKPOINT_FORMAT = 1


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


def write_checkpoint(state: dict[str, Any], target: Path, rotate: bool = True, keep: int | None = None) -> None:
    """Save ``state`` atomically to ``target``; with ``rotate``, point ``last.ckpt`` beside it at it and keep
    only the newest ``keep`` ``round-*.ckpt`` files.

    Raises:
        OSError: naming the path (a full disk, a read-only folder).
    """
    try:
        save_atomic(state, target)
        if rotate:
            _link(target, target.parent / "last.ckpt")
            if keep is not None:
                for old in sorted(target.parent.glob("round-*.ckpt"))[:-keep]:
                    old.unlink(missing_ok=True)
    except (OSError, RuntimeError) as err:  # torch.save reports some file errors as RuntimeError
        raise OSError(
            f"could not write the checkpoint {str(target)!r}: {err}. Free space or fix the permissions of "
            f"{str(target.parent)!r} (trainer.default_root_dir)."
        ) from err


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

    Raises:
        ValueError: another live run holds the lock, or ``root`` already holds a run's checkpoints and this
            run does not resume it (an unversioned directory would be overwritten).
    """
    root.mkdir(parents=True, exist_ok=True)
    lock = root / ".lightfed.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = lock.read_text().strip()
        if pid.isdigit() and _alive(int(pid)):
            raise ValueError(
                f"trainer.default_root_dir {str(root)!r} is in use by another lightfed run (pid {pid}); with logger: "
                f"false runs are not versioned. Give each run its own default_root_dir, or enable the logger."
            ) from None
        lock.unlink(missing_ok=True)  # the lock of a run that died
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    if not resumed and (root / "checkpoints" / "last.ckpt").exists():
        lock.unlink(missing_ok=True)
        raise ValueError(
            f"trainer.default_root_dir {str(root)!r} already holds a run's checkpoints (logger: false does not version "
            f"runs): resume it with --ckpt_path {str(root / 'checkpoints' / 'last.ckpt')!r}, or use another "
            f"default_root_dir."
        )
    return lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
