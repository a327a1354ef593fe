"""One SecAgg+ round as a trainer :class:`~lightfed.aggregation.Aggregator`: clients and server, message by message."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from lightfed.aggregation import Aggregator
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.secagg.crypto import KeyMaterial
from lightfed.secagg.dropout import STAGES
from lightfed.secagg.protocol import SecAggClient, SecAggServer
from lightfed.secagg.quantize import Layout


class RoundSettings(Protocol):
    """What a round's aggregator reads from its protocol (:class:`~lightfed.secagg.secagg_plus.SecAggPlus`).

    A structural type, so this module does not import the plugin that imports it.
    """

    clock: Callable[[], float]
    codec: Any
    dropout: Any
    seed: int
    key_source: str
    num_neighbours: int | None
    threshold: float
    record_vectors: bool
    max_weight: float
    numel: int
    clip: float

    def min_survivors(self, cohort_size: int) -> int: ...
    def noise_params(self) -> tuple[float, float]: ...
    def noise_std_per_client(self, cohort_size: int) -> float: ...
    def make_graph(self, round_idx: int) -> Any: ...
    def layout_for(self, update: ClientUpdate, cohort_size: int = 1) -> Layout: ...
    def encode(self, update: ClientUpdate, weight: float, round_idx: int, layout: Layout, noise: tuple[float, float]) -> tuple[np.ndarray, int]: ...
    def record_round(self, metrics: dict[str, float], view: Any) -> None: ...

log = logging.getLogger("lightfed.secagg")


class SecAggPlusAggregator(Aggregator):
    """One SecAgg+ round: the key stages at construction, masked input per :meth:`add`, unmasking in :meth:`result`.

    Attributes:
        clients: The simulated client devices (secrets stay inside them).
        server: The server (its :attr:`SecAggServer.view` is everything it knows).
    """

    def __init__(self, protocol: RoundSettings, round_idx: int, cohort: list[int]) -> None:
        self.protocol = protocol
        self.clock = protocol.clock
        self.round_idx = round_idx
        self.cohort = cohort
        self.n_min = protocol.min_survivors(len(cohort))
        z, clip_norm = protocol.noise_params()
        #: ``(sigma, C)`` of each client's noise share this round (``sigma = z C / sqrt(n_min)``).
        self.noise = (protocol.noise_std_per_client(len(cohort)), clip_norm)
        self.noise_target = z * clip_norm
        self.codec = protocol.codec
        self.server = SecAggServer(
            round_idx, cohort, self.codec, num_neighbours=protocol.num_neighbours, threshold=protocol.threshold,
            min_survivors=self.n_min, graph=protocol.make_graph(round_idx), record_vectors=protocol.record_vectors,
            clock=protocol.clock,
        )
        self.layout: Layout | None = None
        self.dropped: dict[int, str] = {}
        self.bytes_up = dict.fromkeys(cohort, 0)
        self.bytes_down = dict.fromkeys(cohort, 0)
        self.client_seconds = dict.fromkeys(cohort, 0.0)
        self.server_seconds = 0.0
        self._device: torch.device | None = None
        self._values: Tensor | None = None  # the decoded sum (float64), once released
        self.clients: dict[int, SecAggClient] = {}
        self._run_key_stages()

    def _drops(self, client_id: int, stage: str) -> bool:
        if client_id in self.dropped:
            return True
        if self.protocol.dropout.drops(self.protocol.seed, self.round_idx, client_id, stage):
            self.dropped[client_id] = stage
            return True
        return False

    def _client(self, client_id: int, fn: Any, *args: Any) -> Any:
        start = self.clock()
        out = fn(*args)
        self.client_seconds[client_id] += self.clock() - start
        return out

    def _server(self, fn: Any, *args: Any) -> Any:
        start = self.clock()
        out = fn(*args)
        self.server_seconds += self.clock() - start
        return out

    def _run_key_stages(self) -> None:
        p = self.protocol
        adverts = []
        for cid in self.cohort:
            start = self.clock()
            client = SecAggClient(cid, self.round_idx, KeyMaterial(p.key_source, p.seed, self.round_idx, cid), self.codec)
            self.client_seconds[cid] += self.clock() - start
            self.clients[cid] = client
            if not self._drops(cid, "advertise_keys"):
                msg = self._client(cid, client.advertise_keys)
                self.bytes_up[cid] += msg.nbytes
                adverts.append(msg)
        neighbour_keys = self._server(self.server.collect_keys, adverts)
        shares = []
        for cid, msg in neighbour_keys.items():
            self.bytes_down[cid] += msg.nbytes
            if self._drops(cid, "share_keys"):
                continue
            out = self._client(cid, self.clients[cid].share_keys, msg)
            if out is None:
                self.dropped[cid] = "share_keys"
                continue
            self.bytes_up[cid] += out.nbytes
            shares.append(out)
        inbox = self._server(self.server.collect_shares, shares)
        for cid, received in inbox.items():
            self.bytes_down[cid] += sum(s.nbytes for s in received)
            self._client(cid, self.clients[cid].receive_shares, received)
        self.can_send = set(inbox)

    # ------------------------------------------------------------------ Aggregator
    def add(self, update: ClientUpdate, weight: float) -> None:
        """Client ``update.client_id`` encodes, masks and sends its contribution (unless it dropped)."""
        cid = update.client_id
        if cid not in self.clients:
            raise ValueError(f"round {self.round_idx}: client {cid} is not in this round's cohort.")
        if self.server.failed or cid not in self.can_send or self._drops(cid, "masked_input"):
            return  # dropped earlier (recorded), drops now (recorded), or the round already failed closed
        if self.layout is None:
            self.layout = self.protocol.layout_for(update, len(self.cohort))
            self._device = update.delta.device
        start = self.clock()
        encoded, _ = self.protocol.encode(update, weight, self.round_idx, self.layout, self.noise)
        msg = self.clients[cid].masked_input(encoded)
        self.client_seconds[cid] += self.clock() - start
        self.bytes_up[cid] += msg.nbytes
        self._server(self.server.receive_masked_input, msg)

    def result(self) -> RoundAggregate | None:
        """Run the unmasking stage; decode the sums (``None``: the round failed closed, nothing released)."""
        for cid in sorted(self.can_send):  # a client of U2 whose input never arrived dropped before sending it
            if not self.server.failed and cid not in self.dropped and cid not in self.server.view.masked_digests:
                self.dropped[cid] = "masked_input"
        requests = self._server(self.server.unmask_requests)
        responses = []
        for cid, req in requests.items():
            self.bytes_down[cid] += req.nbytes
            if self._drops(cid, "unmasking"):
                continue
            resp = self._client(cid, self.clients[cid].unmask, req)
            if resp is not None:
                self.bytes_up[cid] += resp.nbytes
            responses.append(resp)
        total = self._server(self.server.finish, responses)
        view = self.server.view
        aggregate = None
        if total is None:
            if not view.failed:
                self.server.fail("no masked input arrived")
            log.warning("secure aggregation round %d failed closed (%s): nothing is revealed, the global model is unchanged.", self.round_idx, view.reason)
        else:
            aggregate = self._decode(total)
        self.protocol.record_round(self._metrics(aggregate), view)
        return aggregate

    def _decode(self, total: np.ndarray) -> RoundAggregate:
        assert self.layout is not None
        values = self._values = self.codec.decode(total, self.layout)
        w = self.protocol.max_weight

        def seg(name: str) -> Tensor:
            s = self.layout[name]
            return values[s.start : s.stop]

        extras = {
            name.split("/", 1)[1]: (seg(name) * w).to(self._device, torch.float32)
            for name in self.layout.names() if name.startswith("extra/")
        }
        counts = {name.split("/", 1)[1]: float(seg(name)[0]) for name in self.layout.names() if name.startswith("count/")}
        return RoundAggregate(
            delta_sum=(seg("delta") * w).to(self._device, torch.float32),
            weight_sum=float(seg("weight")[0]) * w,
            num_clients=len(self.server.view.u3),
            extras_sum=extras,
            counts_sum=counts,
        )

    def _metrics(self, aggregate: RoundAggregate | None) -> dict[str, float]:
        view = self.server.view
        full = view.u3 or self.cohort
        length = self.layout.length if self.layout is not None else self.protocol.numel + 3
        out = {
            "bytes_up_per_client": float(np.mean([self.bytes_up[c] for c in full])),
            "bytes_down_per_client": float(np.mean([self.bytes_down[c] for c in full])),
            "plain_bytes_per_client": float(4 * length),
            "client_seconds": float(np.mean([self.client_seconds[c] for c in full])),
            "server_seconds": self.server_seconds,
            "reconstruction_seconds": self.server.reconstruction_seconds,
            "dropouts": float(len(self.dropped)),
            "survivors": float(len(view.u3)),
            "failed": float(view.failed),
            "neighbours": float(self.server.k),
            "threshold": float(view.threshold),
        }
        out["upload_expansion"] = out["bytes_up_per_client"] / out["plain_bytes_per_client"]
        for stage in STAGES:
            out[f"dropouts_{stage}"] = float(sum(1 for s in self.dropped.values() if s == stage))
        if self.noise[0] > 0:
            out["noise_std_per_client"] = self.noise[0]
            out["noise_std_target"] = self.noise_target
            out["noise_std_sum"] = self.noise[0] * math.sqrt(len(view.u3)) if aggregate is not None else 0.0
        if aggregate is not None and self.layout is not None:
            values = self._values
            weight = float(values[self.layout["weight"].start])
            out["clipped_fraction"] = float(values[self.layout["clipped"].start]) / len(view.u3)
            out["quantization_error_bound"] = self.codec.error_bound(len(view.u3), self.protocol.clip) * self.protocol.max_weight
            for name in self.layout.names():
                if name.startswith("metric/") and weight > 0:
                    out[f"client_{name.split('/', 1)[1]}_mean"] = float(values[self.layout[name].start]) / weight
        return out


def flat_numpy(t: Tensor) -> np.ndarray:
    """A flat float32/float64 numpy view (or copy, off the CPU or from a half type) of ``t``."""
    t = t.detach().reshape(-1).cpu()
    return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()
