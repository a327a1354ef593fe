"""A run's checkpoint: a dict over its stateful parts, written and read back with every check a resume needs.

Format 2 (format 1 checkpoints are refused; lightfed has no users to migrate yet)::

    {"format": 2, "digest": a hash over everything below (:mod:`lightfed.integrity`; keyed with
     $LIGHTFED_CHECKPOINT_KEY for tamper evidence),
     "progress": {round, seed, num_clients, history, config},
     "model": {payload_names, global_params, state, frozen},
     "strategy": {name, state}, "privacy": {...}, "secure_aggregation": {...},
     "client_states": {cid: {...}}, "callbacks": {state_key: {...}},
     "clock": {...} (a timed run's whole clock, :meth:`lightfed.simtime.RoundClock.state_dict`; {} untimed)}

``model.state`` holds every tensor of the module except frozen parameters, which a fine-tuning run never
changes: they are replaced by ``model.frozen``, a SHA-256 fingerprint over their names and bytes, and a
resume refuses a module whose frozen weights differ. A LoRA checkpoint therefore costs what is trained.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import Tensor, nn

from lightfed import checkpoint as ckpt_io
from lightfed import integrity

if TYPE_CHECKING:
    from lightfed.callbacks import Callback
    from lightfed.trainer import FederatedTrainer

log = logging.getLogger("lightfed")
FORMAT = 2

#: Config keys a resume may change: they do not touch the sequence of global models.
SAFE_TO_CHANGE = (
    "ckpt_path", "config", "trainer.rounds", "trainer.eval_every", "trainer.eval_batch_size", "trainer.checkpoint_every",
    "trainer.keep_checkpoints", "trainer.logger", "trainer.enable_progress_bar", "trainer.default_root_dir",
    "trainer.name", "trainer.num_threads", "trainer.max_failed_rounds", "trainer.stop_on_failed_round",
    "trainer.fed_eval_fraction", "trainer.fed_eval_metric", "trainer.fed_eval_higher_is_better",
    "trainer.callbacks", "trainer.accelerator",
    "trainer.devices", "trainer.num_nodes", "trainer.fabric_strategy", "privacy.init_args.verbose",
    "privacy.init_args.max_epsilon",
)


def frozen_parameters(module: nn.Module, payload_names: list[str]) -> dict[str, Tensor]:
    """Parameters that never train in this run (not in the payload and ``requires_grad=False``)."""
    payload = set(payload_names)
    return {n: p for n, p in module.named_parameters() if n not in payload and not p.requires_grad}


def frozen_fingerprint(trainer: FederatedTrainer, frozen: dict[str, Tensor]) -> str:
    """The fingerprint of the run's frozen parameters, hashed once per run (they never change during it)."""
    if trainer.frozen_fingerprint is None:
        trainer.frozen_fingerprint = fingerprint(frozen)
    return trainer.frozen_fingerprint


def fingerprint(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digest(state: dict[str, Any]) -> str:
    """The integrity hash of a checkpoint: every stateful part (keyed when $LIGHTFED_CHECKPOINT_KEY is set)."""
    return integrity.digest(state, integrity.checkpoint_key())


def collect(trainer: FederatedTrainer) -> dict[str, Any]:
    """Everything needed to continue ``trainer``'s run exactly where it stopped (on CPU)."""
    assert trainer.module is not None and trainer.spec is not None and trainer.global_params is not None
    trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
    names = list(trainer.spec.names)
    frozen = frozen_parameters(trainer.module, names)
    state = ckpt_io.to_cpu({
        "format": FORMAT,
        "progress": {"round": trainer.round_idx, "seed": trainer.seed, "num_clients": trainer.num_clients,
                     "history": trainer.history, "config": trainer.config_yaml or ""},
        "model": {"payload_names": names, "global_params": trainer.global_params,
                  "state": {k: v for k, v in trainer.module.state_dict().items() if k not in frozen},
                  "frozen": frozen_fingerprint(trainer, frozen)},
        "strategy": {"name": type(trainer.strategy).__name__, "state": trainer.strategy.state_dict()},
        "privacy": trainer.privacy.state_dict() if trainer.privacy is not None else {},
        "secure_aggregation": trainer.secure_aggregation.state_dict() if trainer.secure_aggregation is not None else {},
        "client_states": trainer.client_states,
        "callbacks": callback_states(trainer.callbacks),
        "clock": trainer.clock.state_dict() if trainer.clock is not None else {},
    })
    return integrity.sign(state)


def callback_keys(callbacks: list[Callback]) -> list[str]:
    """Each callback's checkpoint key: its :attr:`~lightfed.callbacks.Callback.state_key`, with ``#2``,
    ``#3`` ... added to the second and later callbacks sharing one (their states never overwrite each other).
    """
    keys: list[str] = []
    for cb in callbacks:
        key, n = cb.state_key, 1
        while (key if n == 1 else f"{key}#{n}") in keys:
            n += 1
        keys.append(key if n == 1 else f"{key}#{n}")
    return keys


def callback_states(callbacks: list[Callback]) -> dict[str, dict[str, Any]]:
    """Each callback's ``state_dict`` under its key (:func:`callback_keys`)."""
    return {key: cb.state_dict() for key, cb in zip(callback_keys(callbacks), callbacks)}


def read(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, checked for format and integrity.

    Raises:
        FileNotFoundError, ValueError: naming the path and what to do.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--ckpt_path {str(p)!r} does not exist; point it at a lightfed checkpoint (…/checkpoints/last.ckpt).")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which, and what to do
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"--ckpt_path {str(p)!r} could not be read ({type(err).__name__}: {first}); it is truncated or not a "
            f"lightfed checkpoint. Resume from another one (checkpoints/round-XXXXX.ckpt)."
        ) from err
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(f"{str(p)!r} is not a lightfed checkpoint; to start from its weights use `trainer.init_checkpoint`.")
    if state["format"] != FORMAT:
        raise ValueError(
            f"{str(p)!r} is a lightfed checkpoint of format {state['format']}, this lightfed reads format {FORMAT} "
            f"(checkpoints became a dict over the run's stateful parts). Start the run again."
        )
    integrity.verify(state, f"--ckpt_path {str(p)!r}")
    return state


def config_changes(old_yaml: str, new_yaml: str) -> tuple[list[str], list[str]]:
    """``(unsafe, safe)`` dotted keys whose values differ between two resolved configs."""
    old, new = _flatten(yaml.safe_load(old_yaml) or {}), _flatten(yaml.safe_load(new_yaml) or {})
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    safe = [k for k in changed if k.startswith(SAFE_TO_CHANGE)]
    return [k for k in changed if k not in safe], safe


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def check_compatible(trainer: FederatedTrainer, state: dict[str, Any], where: str) -> None:
    """Refuse a resume that cannot be exact, naming what differs."""
    progress, model = state["progress"], state["model"]
    if int(progress["seed"]) != trainer.seed:
        raise ValueError(
            f"{where} was written with seed_everything={progress['seed']}, this run has {trainer.seed}: an exact "
            f"resume needs the same seed. Use --seed_everything {progress['seed']}."
        )
    if int(progress["num_clients"]) != trainer.num_clients:
        raise ValueError(
            f"{where} was written for {progress['num_clients']} clients, this run's data has {trainer.num_clients}: "
            f"resume with the same data and partitioner."
        )
    if state["privacy"] and trainer.privacy is None:
        raise ValueError(
            f"{where} was written by a DP run ({state['privacy'].get('mechanism')}), but this run has no privacy "
            f"section: resuming would silently drop DP and its accountant. Resume with the same `privacy:` section."
        )
    assert trainer.spec is not None and trainer.module is not None
    if list(model["payload_names"]) != list(trainer.spec.names):
        raise ValueError(
            f"{where} was written for another payload (first names {model['payload_names'][:3]} vs "
            f"{list(trainer.spec.names)[:3]}); resume with the same model and `trainer.trainable`."
        )
    if model["frozen"] != frozen_fingerprint(trainer, frozen_parameters(trainer.module, list(trainer.spec.names))):
        raise ValueError(
            f"{where} was trained on another frozen base model (the fingerprint of the frozen weights differs); "
            f"resume with the same pretrained model and `trainer.init_checkpoint`."
        )
    if state["strategy"]["name"] != type(trainer.strategy).__name__:
        raise ValueError(f"{where} was written by strategy {state['strategy']['name']}, this run uses {type(trainer.strategy).__name__}.")
    if progress["config"] and trainer.config_yaml:
        unsafe, safe = config_changes(progress["config"], trainer.config_yaml)
        target_eps = "privacy.init_args.target_epsilon" in _flatten(yaml.safe_load(trainer.config_yaml) or {})
        fixed_rounds = target_eps and "trainer.rounds" in safe
        if fixed_rounds:
            unsafe.append("trainer.rounds (the noise was calibrated for the planned rounds: target_epsilon)")
        if unsafe:
            may = ("" if target_eps else "rounds, ") + "evaluation, logging and checkpoint settings"
            longer = (" To train more rounds under target_epsilon, start a new run with the rounds you want, or "
                      "give privacy.init_args.noise_multiplier instead." if fixed_rounds else "")
            raise ValueError(
                f"{where} was written with another config; these keys differ and break an exact resume: "
                f"{', '.join(unsafe[:8])}{' ...' if len(unsafe) > 8 else ''}. Resume with the checkpoint's config "
                f"(its config.yaml) changing only: {may}.{longer}"
            )
        if safe:
            log.warning("resuming %s with changed settings: %s", where, ", ".join(safe))


def restore(trainer: FederatedTrainer, path: str | Path) -> None:
    """Load a checkpoint into a set-up trainer, after every check."""
    where = f"--ckpt_path {str(path)!r}"
    state = read(path)
    check_compatible(trainer, state, where)
    accountant = getattr(trainer.privacy, "accountant", None)
    integrity.check_privacy_progress(
        state["privacy"], int(state["progress"]["round"]), where,
        epsilon=accountant.epsilon if accountant is not None and hasattr(accountant, "epsilon") else None,
        cohorts=trainer.sample,
    )
    assert trainer.module is not None and trainer.spec is not None
    device = trainer.fabric.device
    frozen = frozen_parameters(trainer.module, list(trainer.spec.names))
    ckpt_io.load_into(trainer.module, state["model"]["state"], ignore=list(frozen), source=f"checkpoint {str(path)!r}")
    trainer.global_params = state["model"]["global_params"].to(device)
    stored = trainer.spec.flatten(trainer.spec.tensors(trainer.module)).to(device)
    if not torch.equal(stored.to(trainer.global_params.dtype), trainer.global_params):
        raise ValueError(f"{where} is inconsistent: its global payload and its model state disagree. Resume from another checkpoint.")
    trainer.strategy.load_state_dict(ckpt_io.to_device(state["strategy"]["state"], device))
    trainer.client_states = ckpt_io.to_device(state["client_states"], device)
    if trainer.privacy is not None:
        trainer.privacy.load_state_dict(state["privacy"])
    if trainer.secure_aggregation is not None:
        trainer.secure_aggregation.load_state_dict(state["secure_aggregation"])
    for key, cb in zip(callback_keys(trainer.callbacks), trainer.callbacks):
        if key in state["callbacks"]:
            cb.load_state_dict(state["callbacks"][key])
    restore_clock(trainer, state.get("clock") or {}, int(state["progress"]["round"]), where)
    trainer.history = list(state["progress"]["history"])
    trainer.round_idx = int(state["progress"]["round"])


def restore_clock(trainer: FederatedTrainer, clock: dict[str, Any], round_idx: int, where: str) -> None:
    """Load a timed run's clock; refuse a timed checkpoint without a clock, or a clock without its state.

    Raises:
        ValueError: naming what is missing, or (the clock's own check) the first clock setting that differs.
    """
    if trainer.clock is None:
        if clock:
            name = clock.get("config", {}).get("trainer.clock.class_path")
            raise ValueError(f"{where} was written by a timed run (trainer.clock {name}); resume with the same trainer.clock.")
        return
    if not clock:
        if round_idx > 0:
            raise ValueError(
                f"{where} holds no virtual clock (an untimed run, or a lightfed before timed resume), but this run has "
                f"trainer.clock {type(trainer.clock).__name__}: start the timed run from round 0."
            )
        return
    trainer.clock.load_state_dict(clock)


__all__ = [
    "FORMAT", "callback_keys", "callback_states", "check_compatible", "collect", "config_changes", "digest",
    "fingerprint", "read", "restore",
    "restore_clock",
]
