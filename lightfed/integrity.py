"""The integrity hash of a checkpoint over every stateful part, unkeyed (corruption) or keyed (tampering).

A checkpoint is a nested dict of tensors, numbers, strings, lists and dicts (:mod:`lightfed.resume`). Its
digest is a hash of a canonical encoding of *all* of it (everything but the ``digest`` entry itself): the
model, the strategy state (FedAvgM's momentum), the privacy accountant, secure aggregation, client states,
the history, the round number, the config and callback state. Each value is written with its type, a
tensor with its dtype, shape and bytes, a float as its exact ``float.hex``, a dict in sorted key order,
so two states have the same encoding only if they are equal.

Two modes, told apart by the digest's prefix:

* ``sha256:<hex>`` (default): SHA-256 of the encoding. It detects corruption (a truncated or bit-flipped
  file, a partial copy), **not** an editor: whoever edits the file can recompute an unkeyed hash.
* ``hmac-sha256:<hex>``: HMAC-SHA256 (RFC 2104) of the encoding, keyed with the environment variable
  ``LIGHTFED_CHECKPOINT_KEY``. Without the key nobody can write a checkpoint that verifies, so an edit is
  evident. With the key set, unkeyed checkpoints are refused (a downgrade would strip the protection).

Beyond the hash, :func:`check_privacy_progress` recomputes what can be recomputed: the rounds the privacy
accountant has composed must equal the checkpoint's round (every round is charged once, see
:mod:`lightfed.server`), and LocalDP's per-client participation counts must equal the cohorts the sampler
draws for the rounds run.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

#: The environment variable holding the key of keyed checkpoints (any string; use 32+ random bytes).
KEY_ENV = "LIGHTFED_CHECKPOINT_KEY"


def checkpoint_key() -> bytes | None:
    """The HMAC key from ``$LIGHTFED_CHECKPOINT_KEY`` (``None`` when unset or empty)."""
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def encode(obj: Any, write: Callable[[bytes], None]) -> None:
    """Feed a canonical, type-tagged encoding of ``obj`` to ``write``.

    Raises:
        TypeError: for a value a checkpoint cannot hold (``torch.load(weights_only=True)`` would refuse it too).
    """
    if obj is None:
        write(b"N")
    elif isinstance(obj, bool):
        write(b"T" if obj else b"F")
    elif isinstance(obj, int):
        text = str(obj).encode()
        write(b"i" + struct.pack("<Q", len(text)) + text)
    elif isinstance(obj, float):
        write(b"f" + obj.hex().encode() + b";")
    elif isinstance(obj, str):
        text = obj.encode("utf-8", "surrogatepass")
        write(b"s" + struct.pack("<Q", len(text)) + text)
    elif isinstance(obj, bytes):
        write(b"b" + struct.pack("<Q", len(obj)) + obj)
    elif isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        write(f"t{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        keys = sorted(obj, key=lambda k: (type(k).__name__, repr(k)))
        write(b"d" + struct.pack("<Q", len(keys)))
        for k in keys:
            encode(k, write)
            encode(obj[k], write)
    elif isinstance(obj, (list, tuple)):
        write((b"l" if isinstance(obj, list) else b"u") + struct.pack("<Q", len(obj)))
        for v in obj:
            encode(v, write)
    else:
        raise TypeError(f"a checkpoint cannot hold a {type(obj).__name__} ({obj!r:.80}).")


def digest(state: dict[str, Any], key: bytes | None = None) -> str:
    """``sha256:<hex>`` or, with ``key``, ``hmac-sha256:<hex>`` over every entry of ``state`` but ``digest``."""
    h: Any = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    encode({k: v for k, v in state.items() if k != "digest"}, h.update)
    return f"{'hmac-sha256' if key is not None else 'sha256'}:{h.hexdigest()}"


def sign(state: dict[str, Any]) -> dict[str, Any]:
    """Set ``state["digest"]`` (keyed when ``$LIGHTFED_CHECKPOINT_KEY`` is set); returns ``state``."""
    state["digest"] = digest(state, checkpoint_key())
    return state


def verify(state: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose digest does not match, or whose mode does not match the environment.

    Raises:
        ValueError: naming ``where``, what failed and what to do.
    """
    written, key = state.get("digest"), checkpoint_key()
    if not isinstance(written, str) or ":" not in written:
        raise ValueError(
            f"{where} has no integrity hash over its whole state (it was written by an older lightfed whose hash "
            f"covered only the model tensors); its accountant and strategy state cannot be trusted. Start the run again."
        )
    mode = written.split(":", 1)[0]
    if mode == "hmac-sha256" and key is None:
        raise ValueError(
            f"{where} is signed with a key (HMAC-SHA256), but ${KEY_ENV} is not set: set it to the key the run was "
            f"written with to verify the checkpoint."
        )
    if mode == "sha256" and key is not None:
        raise ValueError(
            f"{where} carries only an unkeyed hash, but ${KEY_ENV} is set: anyone who edits a file can recompute an "
            f"unkeyed hash, so it is no evidence against tampering. Unset ${KEY_ENV} only if you trust this file."
        )
    if mode not in ("sha256", "hmac-sha256"):
        raise ValueError(f"{where} has an integrity hash of unknown kind {mode!r}; this lightfed writes sha256 and hmac-sha256.")
    if not hmac.compare_digest(written, digest(state, key)):
        what = "is corrupted, was edited, or was signed with another key" if key is not None else "is corrupted"
        raise ValueError(
            f"{where} {what}: its content does not match the integrity hash written with it. Resume from another "
            f"checkpoint (checkpoints/round-XXXXX.ckpt)."
        )


def check_privacy_progress(
    privacy_state: dict[str, Any],
    round_idx: int,
    where: str,
    *,
    epsilon: Callable[[int], float] | None = None,
    cohorts: Callable[[int], Sequence[int]] | None = None,
) -> None:
    """Cross-check the privacy state against what the schedule implies for round ``round_idx``.

    Args:
        privacy_state: The checkpoint's ``privacy`` entry (``{}`` without DP).
        round_idx: The checkpoint's round: the number of rounds run, each charged once.
        where: How to name the checkpoint in an error.
        epsilon: Epsilon after ``t`` rounds of this run's mechanism (to name the numbers).
        cohorts: The cohort of round ``r`` (recomputes LocalDP's participation counts).

    Raises:
        ValueError: the accountant has composed another number of rounds than the checkpoint ran, or the
            participation counts differ from the sampler's cohorts.
    """
    accountant = privacy_state.get("accountant")
    if isinstance(accountant, dict) and "rounds" in accountant:
        composed = int(accountant["rounds"])
        if composed != round_idx:
            eps = ""
            if epsilon is not None:
                eps = f" (epsilon {epsilon(composed):.4g} instead of {epsilon(round_idx):.4g})"
            raise ValueError(
                f"{where} is inconsistent: its privacy accountant has composed {composed} rounds, but the checkpoint "
                f"is at round {round_idx} and every round is charged once; resuming would report a smaller privacy "
                f"spend{eps} and the budget stop would undercount. Resume from another checkpoint."
            )
    participations = privacy_state.get("participations")
    if isinstance(participations, dict) and cohorts is not None:
        expected: dict[int, int] = {}
        for r in range(round_idx):
            for cid in cohorts(r):
                expected[int(cid)] = expected.get(int(cid), 0) + 1
        given = {int(k): int(v) for k, v in participations.items()}
        if given != expected:
            diff = sorted(c for c in expected.keys() | given.keys() if expected.get(c, 0) != given.get(c, 0))
            c = diff[0]
            raise ValueError(
                f"{where} is inconsistent: its privacy state counts {given.get(c, 0)} reports of client {c}, but the "
                f"sampler drew it {expected.get(c, 0)} times in rounds 0..{round_idx - 1} ({len(diff)} clients differ). "
                f"Resume from another checkpoint."
            )


__all__ = ["KEY_ENV", "check_privacy_progress", "checkpoint_key", "digest", "encode", "sign", "verify"]
