"""The two parties of SecAgg+ -- :class:`SecAggClient` and :class:`SecAggServer` -- exchanging explicit messages.

This is the semi-honest protocol of Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", Fig. 4, without the signature/consistency-check round needed only
against an active server) on the sparse neighbourhoods of Bell et al. (CCS 2020, SecAgg+). Per round:

0. **AdvertiseKeys** -- client ``u`` draws two X25519 key pairs, ``(c_sk, c_pk)`` to encrypt shares and
   ``(s_sk, s_pk)`` to agree masks, and sends the public keys. ``U1`` = senders. The server draws the
   random k-regular graph over ``U1`` and sends each client its neighbours' keys.
1. **ShareKeys** -- ``u`` draws a 256-bit self-mask seed ``b_u``, Shamir-shares ``s_sk_u`` and ``b_u``
   t-of-k among its neighbours, and encrypts each neighbour's pair with AES-GCM under
   ``HKDF(X25519(c_sk_u, c_pk_v))``. The server forwards ciphertexts it cannot read. ``U2`` = senders.
2. **MaskedInputCollection** -- ``u`` sends ``y_u = x_u + PRG(b_u) + sum_(v in N(u) & U2) d_uv PRG(s_uv)
   mod 2**b`` with ``s_uv = HKDF(X25519(s_sk_u, s_pk_v))`` and ``d_uv = +1`` if ``u < v`` else ``-1``, so
   the pairwise masks cancel in the sum. ``U3`` = senders.
3. **Unmasking** -- the server tells each survivor which neighbours are in ``U3`` and which dropped
   (``U2 \\ U3``); survivor ``v`` returns its share of ``b_u`` for each surviving neighbour and of
   ``s_sk_u`` for each dropped one -- never both for the same ``u``. ``U5`` = responders. With ``t``
   shares per secret the server removes ``PRG(b_u)`` for ``u in U3`` and recomputes the leftover masks
   ``d_vu PRG(s_vu)`` of survivors ``v`` with dropped ``u``; what remains is ``sum_(u in U3) x_u``.

The server fails closed -- reveals nothing and releases no sum -- when fewer clients than
``min_survivors`` remain at any stage, when the neighbourhood graph over ``U3`` is disconnected (each
component would reveal its own partial sum, Bell et al. section 3), or when a secret has fewer than
``t`` shares. Every check runs before any share is used.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Iterable
from fractions import Fraction

import numpy as np

from lightfed.secagg import shamir
from lightfed.secagg.crypto import (
    KeyMaterial,
    KeyPair,
    aead_decrypt,
    aead_encrypt,
    agree,
    hkdf,
    pair_info,
    prg_words,
)
from lightfed.secagg.graph import Graph, components, num_neighbours
from lightfed.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    NeighbourKeys,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from lightfed.secagg.quantize import FixedPoint
from lightfed.secagg.view import ServerView


def shamir_threshold(fraction: float, k: int) -> int:
    """``t = floor(fraction * k) + 1``, computed exactly from the decimal the fraction was configured as.

    In binary floating point ``0.58 * 50`` is ``28.999999999999996``, which would give ``t = 29``; the
    decimal ``0.58`` (the shortest repr of the float) times 50 is exactly 29, so ``t = 30`` as documented.
    """
    return math.floor(Fraction(repr(float(fraction))) * k) + 1


def self_mask_key(seed: bytes, round_idx: int, client_id: int) -> bytes:
    """The AES key of client ``client_id``'s self mask: ``HKDF(b_u, "self-mask" | round | u)``."""
    return hkdf(seed, f"self-mask|round={round_idx}|{client_id}".encode())


def pairwise_mask_key(shared_secret: bytes, round_idx: int, u: int, v: int) -> bytes:
    """The AES key of the pairwise mask of ``{u, v}``: ``HKDF(X25519 secret, "pairwise-mask" | round | u | v)``."""
    return hkdf(shared_secret, pair_info("pairwise-mask", round_idx, u, v))


def _share_ad(round_idx: int, sender: int, receiver: int) -> bytes:
    return f"share|round={round_idx}|{sender}->{receiver}".encode()


class SecAggClient:
    """One client's side of a SecAgg+ round; holds its secrets and never hands them to the server.

    Args:
        client_id: The client's public id (its Shamir evaluation point is ``client_id + 1``).
        round_idx: The round (bound into every derived key, so keys are never reused across rounds).
        keys: Its source of secret randomness.
        codec: The round's public fixed-point parameters.
    """

    def __init__(self, client_id: int, round_idx: int, keys: KeyMaterial, codec: FixedPoint) -> None:
        self.id = client_id
        self.round_idx = round_idx
        self.codec = codec
        self._keys = keys
        self._c = KeyPair(keys.bytes("c_sk"))
        self._s = KeyPair(keys.bytes("s_sk"))
        self._neighbours: dict[int, AdvertiseKeys] = {}
        self._b: bytes | None = None
        self._received: dict[int, bytes] = {}

    # ------------------------------------------------------------------ stage 0
    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0: the two public keys."""
        return AdvertiseKeys(self.id, self._c.public, self._s.public)

    # ------------------------------------------------------------------ stage 1
    def share_keys(self, msg: NeighbourKeys) -> ShareKeys | None:
        """Round 1: Shamir-share ``s_sk`` and a fresh self-mask seed ``b`` among the neighbours, encrypted.

        Returns ``None`` (abort, Bonawitz et al. Fig. 4) when there are fewer neighbours than the
        threshold or two neighbours advertised the same key.
        """
        keys = {v: m for v, m in msg.keys.items() if v != self.id}
        publics = [m.c_pk for m in keys.values()] + [m.s_pk for m in keys.values()]
        if len(keys) < msg.threshold or len(set(publics)) != len(publics):
            return None
        self._neighbours = keys
        self._b = self._keys.bytes("self_mask_seed")
        order = sorted(keys)
        xs = [v + 1 for v in order]
        s_shares = shamir.split(self._s.private, xs, msg.threshold, lambda n, i: self._keys.bytes("shamir/s_sk", n, i))
        b_shares = shamir.split(self._b, xs, msg.threshold, lambda n, i: self._keys.bytes("shamir/b", n, i))
        out = []
        for v, s_y, b_y in zip(order, s_shares, b_shares):
            key = hkdf(self._c.agree(keys[v].c_pk), pair_info("share-encryption", self.round_idx, self.id, v))
            plain = struct.pack("<II", self.id, v) + shamir.encode_share(s_y) + shamir.encode_share(b_y)
            out.append(EncryptedShare(self.id, v, aead_encrypt(key, self.id, plain, _share_ad(self.round_idx, self.id, v))))
        return ShareKeys(self.id, tuple(out))

    def receive_shares(self, shares: Iterable[EncryptedShare]) -> None:
        """End of round 1: keep the ciphertexts addressed to this client by its neighbours (``N(u) & U2``)."""
        self._received = {s.sender: s.ciphertext for s in shares if s.receiver == self.id and s.sender in self._neighbours}

    # ------------------------------------------------------------------ stage 2
    def self_mask(self, length: int) -> np.ndarray:
        """``PRG(b_u)`` over Z_(2**b) words."""
        assert self._b is not None, "share_keys() must run before masking"
        return prg_words(self_mask_key(self._b, self.round_idx, self.id), length, self.codec.dtype)

    def pairwise_mask(self, length: int) -> np.ndarray:
        """``sum_(v in N(u) & U2) d_uv PRG(s_uv)`` over Z_(2**b) words (wrapping arithmetic)."""
        total = np.zeros(length, dtype=self.codec.dtype)
        for v in sorted(self._received):
            secret = self._s.agree(self._neighbours[v].s_pk)
            words = prg_words(pairwise_mask_key(secret, self.round_idx, self.id, v), length, self.codec.dtype)
            if self.id < v:
                np.add(total, words, out=total)
            else:
                np.subtract(total, words, out=total)
        return total

    def masked_input(self, encoded: np.ndarray) -> MaskedInput:
        """Round 2: ``y_u = x_u + PRG(b_u) + pairwise masks mod 2**b`` for the encoded input ``x_u``."""
        if encoded.dtype != self.codec.dtype:
            raise TypeError(f"encoded input must be {self.codec.dtype}, got {encoded.dtype}.")
        y = self.pairwise_mask(encoded.size)
        np.add(y, self.self_mask(encoded.size), out=y)
        np.add(y, encoded, out=y)
        y &= self.codec.mask
        return MaskedInput(self.id, y, self.codec.modulus_bits)

    # ------------------------------------------------------------------ stage 3
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse | None:
        """Round 3: shares of ``b_u`` for surviving neighbours, of ``s_sk_u`` for dropped ones.

        Returns ``None`` (refuses) if the request names a client in both lists -- the server would
        then hold both secrets of that client and could unmask its individual input -- or asks for
        a client whose shares this client never received.
        """
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped or not (survivors | dropped) <= set(self._received):
            return None
        response = UnmaskResponse(self.id)
        x = self.id + 1
        for u in sorted(survivors | dropped):
            key = hkdf(self._c.agree(self._neighbours[u].c_pk), pair_info("share-encryption", self.round_idx, u, self.id))
            plain = aead_decrypt(key, u, self._received[u], _share_ad(self.round_idx, u, self.id))
            sender, receiver = struct.unpack("<II", plain[:8])
            if (sender, receiver) != (u, self.id):
                return None
            s_y = shamir.decode_share(plain[8 : 8 + shamir.SHARE_BYTES])
            b_y = shamir.decode_share(plain[8 + shamir.SHARE_BYTES :])
            if u in survivors:
                response.self_seed_shares[u] = (x, b_y)
            else:
                response.mask_key_shares[u] = (x, s_y)
        return response


class SecAggServer:
    """The server's side of a SecAgg+ round. Its only state is its :class:`ServerView` plus the public graph.

    Args:
        round_idx: The round.
        cohort: The sampled clients.
        codec: Public fixed-point parameters (modulus).
        num_neighbours: Requested degree ``k`` (``None``: ``2 ceil(log2 n)``).
        threshold: Fraction of the ``k`` neighbours needed to reconstruct a secret: ``t = floor(threshold k) + 1``.
        min_survivors: Fewest clients whose sum may be released (fail closed below it).
        graph: Builds the neighbourhood graph from ``(members, k)`` (seeded by the caller).
        record_vectors: Keep every masked vector in the view (otherwise only its SHA-256).
        clock: Timer of :attr:`reconstruction_seconds`.
    """

    def __init__(
        self, round_idx: int, cohort: list[int], codec: FixedPoint, *, num_neighbours: int | None, threshold: float,
        min_survivors: int, graph: Callable[[list[int], int], Graph], record_vectors: bool = True, clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.codec = codec
        self.requested_k = num_neighbours
        self.threshold_fraction = threshold
        self.min_survivors = min_survivors
        self._make_graph = graph
        self.record_vectors = record_vectors
        self.clock = clock
        self.view = ServerView(round_idx=round_idx, cohort=list(cohort))
        self.k = 0
        self.reconstruction_seconds = 0.0

    @property
    def round_idx(self) -> int:
        return self.view.round_idx

    @property
    def failed(self) -> bool:
        return self.view.failed

    def fail(self, reason: str) -> None:
        """Fail closed: from now on nothing is requested, reconstructed or released."""
        if not self.view.failed:
            self.view.failed, self.view.reason = True, reason

    def _enough(self, who: Iterable[int], stage: str) -> bool:
        n = len(list(who))
        if n < self.min_survivors:
            self.fail(f"only {n} clients left at {stage}, fewer than min_survivors={self.min_survivors}")
        return not self.failed

    # ------------------------------------------------------------------ stage 0
    def collect_keys(self, messages: Iterable[AdvertiseKeys]) -> dict[int, NeighbourKeys]:
        """Record the advertised keys, draw the graph over ``U1``, send each client its neighbours' keys."""
        for m in messages:
            if m.sender in self.view.cohort and m.sender not in self.view.advertised:
                self.view.advertised[m.sender] = m
        u1 = self.view.u1
        if not self._enough(u1, "advertise_keys"):
            return {}
        self.k = num_neighbours(len(u1), self.requested_k)
        self.view.threshold = shamir_threshold(self.threshold_fraction, self.k)
        self.view.graph = self._make_graph(u1, self.k)
        return {
            u: NeighbourKeys({v: self.view.advertised[v] for v in self.view.graph[u]}, self.view.threshold) for u in u1
        }

    # ------------------------------------------------------------------ stage 1
    def collect_shares(self, messages: Iterable[ShareKeys]) -> dict[int, list[EncryptedShare]]:
        """Record the encrypted shares (``U2``) and route each to its receiver if that receiver is in ``U2``."""
        if self.failed:
            return {}
        for m in messages:
            nbrs = set(self.view.graph.get(m.sender, ()))
            if m.sender in self.view.advertised and all(s.receiver in nbrs and s.sender == m.sender for s in m.shares):
                self.view.shared[m.sender] = m
        u2 = set(self.view.u2)
        if not self._enough(u2, "share_keys"):
            return {}
        inbox: dict[int, list[EncryptedShare]] = {u: [] for u in sorted(u2)}
        for m in self.view.shared.values():
            for s in m.shares:
                if s.receiver in u2:
                    inbox[s.receiver].append(s)
        return inbox

    # ------------------------------------------------------------------ stage 2
    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Add ``y_u`` to the running masked sum (the server never sees ``x_u``)."""
        if self.failed:
            return
        if msg.sender not in self.view.shared or msg.sender in self.view.masked_digests:
            raise ValueError(f"round {self.round_idx}: unexpected masked input from client {msg.sender}.")
        if self.view.masked_sum is None:
            self.view.masked_sum = np.zeros(msg.vector.size, dtype=self.codec.dtype)
        elif msg.vector.size != self.view.masked_sum.size:
            raise ValueError(f"round {self.round_idx}: client {msg.sender} sent {msg.vector.size} words, expected {self.view.masked_sum.size}.")
        np.add(self.view.masked_sum, msg.vector, out=self.view.masked_sum)
        self.view.record_masked(msg.sender, msg.vector, self.record_vectors)

    # ------------------------------------------------------------------ stage 3
    def _dropped_to_recover(self) -> list[int]:
        """Clients of ``U2 \\ U3`` that a survivor masked with (their ``s_sk`` must be reconstructed)."""
        u3 = set(self.view.u3)
        return [u for u in self.view.u2 if u not in u3 and any(v in u3 for v in self.view.graph[u])]

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Check ``U3`` (size, connectivity) and ask every survivor for the shares the sum needs."""
        if self.failed:
            return {}
        u3 = self.view.u3
        if not self._enough(u3, "masked_input"):
            return {}
        comps = components(self.view.graph, u3)
        if len(comps) > 1:
            self.fail(
                f"the neighbourhood graph over the {len(u3)} surviving clients split into {len(comps)} components "
                f"(sizes {[len(c) for c in comps]}); unmasking would reveal each component's partial sum"
            )
            return {}
        u3_set, dropped = set(u3), set(self._dropped_to_recover())
        return {
            v: UnmaskRequest(
                tuple(u for u in self.view.graph[v] if u in u3_set), tuple(u for u in self.view.graph[v] if u in dropped)
            )
            for v in u3
        }

    def finish(self, responses: Iterable[UnmaskResponse | None]) -> np.ndarray | None:
        """Reconstruct the secrets and return ``sum_(u in U3) x_u mod 2**b`` (``None``: failed closed)."""
        if self.failed:
            return None
        start = self.clock()
        for r in responses:
            if r is not None and r.sender in self.view.masked_digests:
                self.view.responses[r.sender] = r
        t = self.view.threshold
        seed_shares: dict[int, list[tuple[int, int]]] = {u: [] for u in self.view.u3}
        key_shares: dict[int, list[tuple[int, int]]] = {u: [] for u in self._dropped_to_recover()}
        for r in self.view.responses.values():
            for u, share in r.self_seed_shares.items():
                seed_shares.setdefault(u, []).append(share)
            for u, share in r.mask_key_shares.items():
                key_shares.setdefault(u, []).append(share)
        both = set(seed_shares) & set(key_shares)
        short = {u: len(s) for u, s in {**seed_shares, **key_shares}.items() if len(s) < t}
        if both or short:
            self.fail(
                f"cannot unmask: clients {sorted(short)} have fewer than t={t} shares ({short})" if short
                else f"shares of both secrets were offered for clients {sorted(both)}"
            )
            return None
        total = self.view.masked_sum.copy()
        length = total.size
        for u, shares in seed_shares.items():
            b = shamir.reconstruct(sorted(shares), t)
            self.view.self_seeds[u] = b
            np.subtract(total, prg_words(self_mask_key(b, self.round_idx, u), length, self.codec.dtype), out=total)
        u3 = set(self.view.u3)
        for u, shares in key_shares.items():
            s_sk = shamir.reconstruct(sorted(shares), t)
            if KeyPair(s_sk).public != self.view.advertised[u].s_pk:
                self.view.self_seeds.clear()
                self.fail(f"the reconstructed mask key of client {u} does not match its advertised public key")
                return None
            self.view.mask_keys[u] = s_sk
            for v in self.view.graph[u]:
                if v not in u3:
                    continue
                words = prg_words(
                    pairwise_mask_key(agree(s_sk, self.view.advertised[v].s_pk), self.round_idx, v, u), length, self.codec.dtype
                )
                # y_v carries +PRG(s_vu) if v < u, else -PRG(s_vu): undo it
                if v < u:
                    np.subtract(total, words, out=total)
                else:
                    np.add(total, words, out=total)
        total &= self.codec.mask
        self.view.unmasked_sum = total
        self.reconstruction_seconds = self.clock() - start
        return total
