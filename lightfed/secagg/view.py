"""The server view: everything the SecAgg+ server received or computed in one round, and nothing else.

The server object writes into its :class:`ServerView` as messages arrive and holds no other state about
the clients, so auditing the view audits the server. A privacy researcher can save it (``.npz`` with a
JSON header) and check offline that no individual input can be recovered from it: the tests do exactly
that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightfed.secagg.crypto import digest
from lightfed.secagg.messages import AdvertiseKeys, EncryptedShare, ShareKeys, UnmaskResponse


@dataclass
class ServerView:
    """What the server saw in round :attr:`round_idx`.

    Attributes:
        round_idx: The round.
        cohort: The sampled clients.
        threshold: Shamir threshold ``t`` (shares needed per secret).
        graph: The SecAgg+ neighbourhoods the server generated over the clients that advertised keys.
        advertised: Stage 0 messages (public keys), by sender (``U1`` is their keys).
        shared: Stage 1 messages (encrypted shares the server forwards and cannot read), by sender (``U2``).
        masked_inputs: Stage 2 masked vectors by sender (``U3``) when vectors are recorded; else empty.
        masked_digests: SHA-256 of every masked vector (always kept).
        responses: Stage 3 unmasking responses (Shamir shares in the clear), by sender (``U5``).
        self_seeds: Reconstructed self-mask seeds ``b_u`` (only for ``u`` in ``U3``).
        mask_keys: Reconstructed mask-agreement private keys ``s_sk_u`` (only for ``u`` in ``U2 \\ U3``).
        masked_sum: ``sum_(u in U3) y_u mod 2**b``.
        unmasked_sum: The sum of the survivors' encoded inputs mod ``2**b`` (``None`` if the round failed).
        failed: ``True`` when the round failed closed.
        reason: Why it failed (empty otherwise).
    """

    round_idx: int
    cohort: list[int]
    threshold: int = 0
    graph: dict[int, tuple[int, ...]] = field(default_factory=dict)
    advertised: dict[int, AdvertiseKeys] = field(default_factory=dict)
    shared: dict[int, ShareKeys] = field(default_factory=dict)
    masked_inputs: dict[int, np.ndarray] = field(default_factory=dict)
    masked_digests: dict[int, str] = field(default_factory=dict)
    responses: dict[int, UnmaskResponse] = field(default_factory=dict)
    self_seeds: dict[int, bytes] = field(default_factory=dict)
    mask_keys: dict[int, bytes] = field(default_factory=dict)
    masked_sum: np.ndarray | None = None
    unmasked_sum: np.ndarray | None = None
    failed: bool = False
    reason: str = ""

    # ------------------------------------------------------------------ the survivor sets
    @property
    def u1(self) -> list[int]:
        """Clients that advertised keys."""
        return sorted(self.advertised)

    @property
    def u2(self) -> list[int]:
        """Clients that sent encrypted shares."""
        return sorted(self.shared)

    @property
    def u3(self) -> list[int]:
        """Clients whose masked input arrived (their inputs are in the sum)."""
        return sorted(self.masked_digests)

    @property
    def u5(self) -> list[int]:
        """Clients that answered the unmasking request."""
        return sorted(self.responses)

    def arrays(self) -> list[np.ndarray]:
        """Every vector the server holds (masked inputs, masked sum, unmasked sum)."""
        out = list(self.masked_inputs.values())
        out += [a for a in (self.masked_sum, self.unmasked_sum) if a is not None]
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly header (bytes as hex) without the vectors."""
        return {
            "round_idx": self.round_idx,
            "cohort": list(self.cohort),
            "threshold": self.threshold,
            "graph": {str(u): list(v) for u, v in self.graph.items()},
            "advertised": {str(u): [m.c_pk.hex(), m.s_pk.hex()] for u, m in self.advertised.items()},
            "shared": {
                str(u): [[s.receiver, s.ciphertext.hex()] for s in m.shares] for u, m in self.shared.items()
            },
            "masked_digests": {str(u): d for u, d in self.masked_digests.items()},
            "responses": {
                str(v): {
                    "self_seed_shares": {str(u): [x, hex(y)] for u, (x, y) in r.self_seed_shares.items()},
                    "mask_key_shares": {str(u): [x, hex(y)] for u, (x, y) in r.mask_key_shares.items()},
                }
                for v, r in self.responses.items()
            },
            "self_seeds": {str(u): b.hex() for u, b in self.self_seeds.items()},
            "mask_keys": {str(u): b.hex() for u, b in self.mask_keys.items()},
            "failed": self.failed,
            "reason": self.reason,
        }

    def save(self, path: str | Path) -> Path:
        """Write the view to ``path`` (``.npz``: a ``header`` JSON string plus the vectors)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"masked/{u}": v for u, v in self.masked_inputs.items()}
        for name in ("masked_sum", "unmasked_sum"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        with path.open("wb") as fh:
            np.savez_compressed(fh, header=np.array(json.dumps(self.to_dict())), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ServerView:
        """Read a view written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            head = json.loads(str(data["header"]))
            arrays = {k: data[k] for k in data.files if k != "header"}

        def share(pair: list[Any]) -> tuple[int, int]:
            return int(pair[0]), int(pair[1], 16)

        view = cls(round_idx=head["round_idx"], cohort=head["cohort"], threshold=head["threshold"])
        view.graph = {int(u): tuple(v) for u, v in head["graph"].items()}
        view.advertised = {
            int(u): AdvertiseKeys(int(u), bytes.fromhex(c), bytes.fromhex(s)) for u, (c, s) in head["advertised"].items()
        }
        view.shared = {
            int(u): ShareKeys(int(u), tuple(EncryptedShare(int(u), int(r), bytes.fromhex(ct)) for r, ct in shares))
            for u, shares in head["shared"].items()
        }
        view.masked_digests = {int(u): d for u, d in head["masked_digests"].items()}
        view.responses = {
            int(v): UnmaskResponse(
                int(v),
                {int(u): share(p) for u, p in r["self_seed_shares"].items()},
                {int(u): share(p) for u, p in r["mask_key_shares"].items()},
            )
            for v, r in head["responses"].items()
        }
        view.self_seeds = {int(u): bytes.fromhex(b) for u, b in head["self_seeds"].items()}
        view.mask_keys = {int(u): bytes.fromhex(b) for u, b in head["mask_keys"].items()}
        view.masked_inputs = {int(k.split("/", 1)[1]): v for k, v in arrays.items() if k.startswith("masked/")}
        view.masked_sum = arrays.get("masked_sum")
        view.unmasked_sum = arrays.get("unmasked_sum")
        view.failed, view.reason = bool(head["failed"]), str(head["reason"])
        return view

    def record_masked(self, sender: int, vector: np.ndarray, keep: bool) -> None:
        """Note a masked input (its digest always, the vector if ``keep``)."""
        self.masked_digests[sender] = digest(vector)
        if keep:
            self.masked_inputs[sender] = vector
