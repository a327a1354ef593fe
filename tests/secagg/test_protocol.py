"""SecAgg+ rounds: exact unmasking, uniform masked vectors, dropout recovery and failing closed, the server view."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag

from lightfed.messages import ClientUpdate
from lightfed.secagg import ScheduledDropout, SecAggClient, SecAggServer, ServerView, StageDropout
from lightfed.secagg.crypto import KeyMaterial, prg_words
from lightfed.secagg.graph import components, harary_graph, num_neighbours
from lightfed.secagg.messages import EncryptedShare, UnmaskRequest
from lightfed.secagg.protocol import self_mask_key
from lightfed.secagg.quantize import FixedPoint
from lightfed.seeding import make_generator
from tests.secagg.helpers import (
    encodings,
    high_bits_pvalue,
    ks_pvalue,
    make_protocol,
    make_updates,
    modular_sum,
    run_round,
)


# ---------------------------------------------------------------------- the parties, by hand
def test_hand_driven_round_sums_hand_inputs_exactly():
    """Four clients, all pairs (k = 3, t = 2); inputs are small integers whose sum is known."""
    codec = FixedPoint(8, 32)
    cohort = [0, 1, 2, 3]
    clients = {c: SecAggClient(c, 7, KeyMaterial("os", 0, 7, c), codec) for c in cohort}
    server = SecAggServer(7, cohort, codec, num_neighbours=None, threshold=0.5, min_survivors=2,
                          graph=lambda members, k: harary_graph(members, k, make_generator(0, "g")))
    replies = server.collect_keys([c.advertise_keys() for c in clients.values()])
    assert server.k == 3 and server.view.threshold == 2
    inbox = server.collect_shares([clients[c].share_keys(replies[c]) for c in cohort])
    for c, shares in inbox.items():
        assert sorted(s.sender for s in shares) == [v for v in cohort if v != c]
        clients[c].receive_shares(shares)
    inputs = {0: [1, 2, 3], 1: [10, 20, 30], 2: [100, 200, 300], 3: [-1, -2, -3]}
    for c in (0, 1, 2):  # client 3 drops before sending its masked input
        enc = (np.array(inputs[c], dtype=np.int64).astype(np.uint32)) & codec.mask
        server.receive_masked_input(clients[c].masked_input(enc))
    requests = server.unmask_requests()
    assert requests[0] == UnmaskRequest(survivors=(1, 2), dropped=(3,))
    total = server.finish([clients[c].unmask(requests[c]) for c in (0, 1, 2)])
    assert codec.to_signed(total).tolist() == [111, 222, 333]
    assert set(server.view.mask_keys) == {3} and set(server.view.self_seeds) == {0, 1, 2}


def test_client_refuses_to_reveal_both_secrets_of_one_neighbour():
    agg, _ = run_round(make_protocol(numel=10), make_updates(list(range(5)), 10))
    client = agg.clients[0]
    with pytest.raises(ValueError, match="unexpected masked input"):
        agg.server.receive_masked_input(client.masked_input(np.zeros(agg.layout.length, dtype=np.uint32)))
    neighbour = agg.server.view.graph[0][0]
    assert client.unmask(UnmaskRequest(survivors=(neighbour,), dropped=(neighbour,))) is None
    assert client.unmask(UnmaskRequest(survivors=(999,), dropped=())) is None


def test_tampered_share_ciphertext_is_detected():
    codec = FixedPoint(8, 32)
    cohort = [0, 1, 2]
    clients = {c: SecAggClient(c, 0, KeyMaterial("seeded", 1, 0, c), codec) for c in cohort}
    server = SecAggServer(0, cohort, codec, num_neighbours=None, threshold=0.5, min_survivors=2,
                          graph=lambda members, k: harary_graph(members, k, make_generator(0, "g")))
    replies = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inbox = server.collect_shares([clients[c].share_keys(replies[c]) for c in cohort])
    s = inbox[0][0]
    flipped = bytes([s.ciphertext[0] ^ 1]) + s.ciphertext[1:]
    clients[0].receive_shares([EncryptedShare(s.sender, s.receiver, flipped), *inbox[0][1:]])
    with pytest.raises(InvalidTag):
        clients[0].unmask(UnmaskRequest(survivors=(s.sender,), dropped=()))


# ---------------------------------------------------------------------- correctness
def test_unmasked_sum_is_exactly_the_sum_of_encodings_and_within_the_quantization_bound():
    protocol = make_protocol(numel=3000, max_weight=8.0, clip=0.5)
    updates = make_updates(list(range(15)), 3000)
    agg, result = run_round(protocol, updates)
    enc = encodings(protocol, agg, updates)
    assert np.array_equal(agg.server.view.unmasked_sum, modular_sum(list(enc.values()), 32))
    plain = sum(float(u.num_examples) * u.delta.double() for u in updates)
    bound = protocol.codec.error_bound(15, 0.5) * 8.0  # n W clip / (2**(q-1) - 1)
    assert float((result.delta_sum.double() - plain).abs().max()) < bound
    assert abs(result.weight_sum - sum(u.num_examples for u in updates)) < protocol.codec.error_bound(15, 1.0) * 8.0
    assert result.num_clients == 15
    weights = [u.num_examples for u in updates]
    loss = sum(w * u.metrics["loss"] for w, u in zip(weights, updates)) / sum(weights)
    assert protocol.round_metrics()["client_loss_mean"] == pytest.approx(loss, abs=1e-3)
    assert protocol.round_metrics()["clipped_fraction"] == 0.0


def test_strategy_extras_are_summed_with_the_same_weights():
    updates = make_updates(list(range(6)), 300)
    for u in updates:
        u.extras = {"control": -2 * u.delta[:50].clone(), "h": u.delta[:3] * 0 + 0.25}
    protocol = make_protocol(numel=300, extras_clip=1.0)
    agg, result = run_round(protocol, updates)
    assert agg.layout.names() == ["delta", "extra/control", "extra/h", "weight", "metric/loss", "clipped"]
    weights = [float(u.num_examples) for u in updates]
    bound = protocol.codec.error_bound(6, 1.0) * 8.0
    for name in ("control", "h"):
        plain = sum(w * u.extras[name].double() for w, u in zip(weights, updates))
        assert float((result.extras_sum[name].double() - plain).abs().max()) < bound


def test_clipped_coordinates_are_counted_securely():
    protocol = make_protocol(numel=1000, max_weight=1.0, clip=0.1)
    updates = make_updates(list(range(6)), 1000, scale=0.3)
    run_round(protocol, updates, weights=[1.0] * 6)
    expected = np.mean([float((u.delta.abs() > 0.1).float().mean()) for u in updates])
    assert protocol.round_metrics()["clipped_fraction"] == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------- masks look uniform
def _server_residuals(agg) -> dict[int, np.ndarray]:
    """What the server can compute for each survivor: y_u - PRG(b_u) (b_u reconstructed from shares)."""
    view = agg.server.view
    out = {}
    for u, y in view.masked_inputs.items():
        mask = prg_words(self_mask_key(view.self_seeds[u], view.round_idx, u), y.size, y.dtype)
        out[u] = (y - mask) & y.dtype.type(2**32 - 1)
    return out


def test_masked_vectors_and_server_residuals_are_uniform():
    protocol = make_protocol(numel=20000, max_weight=8.0)
    agg, _ = run_round(protocol, make_updates(list(range(10)), 20000, scale=0.05))
    for y in agg.server.view.masked_inputs.values():
        assert high_bits_pvalue(y, 32) > 1e-4 and ks_pvalue(y, 32) > 1e-4
    for residual in _server_residuals(agg).values():  # the pairwise masks still hide x_u
        assert high_bits_pvalue(residual, 32) > 1e-4 and ks_pvalue(residual, 32) > 1e-4


def test_negative_control_without_pairwise_masks_the_test_detects_the_input(monkeypatch):
    monkeypatch.setattr(SecAggClient, "pairwise_mask", lambda self, n: np.zeros(n, dtype=self.codec.dtype))
    protocol = make_protocol(numel=20000, max_weight=8.0)
    updates = make_updates(list(range(10)), 20000, scale=0.05)
    agg, result = run_round(protocol, updates)
    assert result is not None  # the sum is still right: a broken mask is invisible to correctness tests...
    enc = encodings(protocol, agg, updates)
    for u, residual in _server_residuals(agg).items():
        assert np.array_equal(residual, enc[u])  # ...but the server now reads every input
        assert high_bits_pvalue(residual, 32) < 1e-12 and ks_pvalue(residual, 32) < 1e-12


# ---------------------------------------------------------------------- dropouts
def _graph(protocol, cohort, k, round_idx=0):
    return protocol.make_graph(round_idx)(sorted(cohort), k)


def test_up_to_k_minus_t_unmasking_dropouts_are_recovered_one_more_fails_closed():
    cohort, k = list(range(20)), 6  # t = floor(0.5 * 6) + 1 = 4, so k - t = 2
    updates = make_updates(cohort, 200)
    nbrs = _graph(make_protocol(numel=200), cohort, k)[0]
    ok = make_protocol(numel=200, num_neighbours=k, max_weight=8.0,
                       dropout=ScheduledDropout({0: {v: "unmasking" for v in nbrs[:2]}}))
    agg, result = run_round(ok, updates)
    assert agg.server.view.threshold == 4 and result is not None and result.num_clients == 20
    assert np.array_equal(agg.server.view.unmasked_sum, modular_sum(list(encodings(ok, agg, updates).values()), 32))
    assert ok.round_metrics()["dropouts_unmasking"] == 2.0

    bad = make_protocol(numel=200, num_neighbours=k, max_weight=8.0,
                        dropout=ScheduledDropout({0: {v: "unmasking" for v in nbrs[:3]}}))
    agg, result = run_round(bad, updates)
    view = agg.server.view
    assert result is None and view.failed and "fewer than t=4 shares" in view.reason
    assert view.unmasked_sum is None and view.self_seeds == {} and view.mask_keys == {}
    assert bad.round_metrics()["failed"] == 1.0 and bad.failed_rounds == 1


def test_masked_input_dropouts_have_their_pairwise_masks_removed():
    cohort = list(range(20))
    updates = make_updates(cohort, 300)
    nbrs = _graph(make_protocol(numel=300), cohort, 6)[0]
    dropped = set(nbrs[:2])
    protocol = make_protocol(numel=300, num_neighbours=6, max_weight=8.0,
                             dropout=ScheduledDropout({0: {v: "masked_input" for v in dropped}}))
    agg, result = run_round(protocol, updates)
    view = agg.server.view
    enc = encodings(protocol, agg, updates)
    assert result.num_clients == 18 and set(view.u3) == set(cohort) - dropped
    assert np.array_equal(view.unmasked_sum, modular_sum([enc[u] for u in view.u3], 32))
    assert set(view.mask_keys) == dropped and set(view.self_seeds) == set(view.u3)
    plain = sum(float(u.num_examples) * u.delta.double() for u in updates if u.client_id not in dropped)
    assert float((result.delta_sum.double() - plain).abs().max()) < protocol.codec.error_bound(18, 1.0) * 8.0


def test_key_stage_dropouts_leave_the_round():
    cohort = list(range(12))
    updates = make_updates(cohort, 100)
    protocol = make_protocol(numel=100, max_weight=8.0,
                             dropout=ScheduledDropout({0: {3: "advertise_keys", 7: "share_keys"}}))
    agg, result = run_round(protocol, updates)
    view = agg.server.view
    assert 3 not in view.u1 and 7 in view.u1 and 7 not in view.u2 and result.num_clients == 10
    enc = encodings(protocol, agg, updates)
    assert np.array_equal(view.unmasked_sum, modular_sum([enc[u] for u in cohort if u not in (3, 7)], 32))
    assert view.mask_keys == {}  # nobody masked with a client that never shared keys
    m = protocol.round_metrics()
    assert (m["dropouts"], m["dropouts_advertise_keys"], m["dropouts_share_keys"], m["survivors"]) == (2.0, 1.0, 1.0, 10.0)


def test_more_dropouts_than_max_dropout_fail_closed_before_unmasking():
    cohort = list(range(20))  # max_dropout 0.2 -> n_min = 16
    protocol = make_protocol(numel=50, max_weight=8.0, max_dropout=0.2,
                             dropout=ScheduledDropout({0: {c: "masked_input" for c in range(5)}}))
    agg, result = run_round(protocol, make_updates(cohort, 50))
    view = agg.server.view
    assert result is None and "fewer than min_survivors=16" in view.reason
    assert view.responses == {} and view.self_seeds == {} and view.unmasked_sum is None


def test_disconnected_survivor_graph_fails_closed():
    """On a ring (k = 2) two non-adjacent dropouts split the survivors: each part's sum would leak."""
    cohort = list(range(10))
    protocol = make_protocol(numel=50, num_neighbours=2, max_weight=8.0, max_dropout=0.5)
    ring = _graph(protocol, cohort, 2)
    a = 0
    b_prev, b = a, ring[a][0]
    for _ in range(2):  # walk three steps along the ring
        b_prev, b = b, next(v for v in ring[b] if v != b_prev)
    protocol.dropout = ScheduledDropout({0: {a: "masked_input", b: "masked_input"}})
    agg, result = run_round(protocol, make_updates(cohort, 50))
    assert len(components(ring, set(cohort) - {a, b})) == 2
    assert result is None and "split into 2 components" in agg.server.view.reason
    assert agg.server.view.self_seeds == {}


def test_stage_dropout_is_seeded_and_has_the_configured_rate():
    model = StageDropout({"masked_input": 0.3})
    draws = [model.drops(5, r, c, "masked_input") for r in range(20) for c in range(100)]
    assert abs(np.mean(draws) - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 2000)
    assert draws == [model.drops(5, r, c, "masked_input") for r in range(20) for c in range(100)]
    assert not any(model.drops(5, r, c, "unmasking") for r in range(5) for c in range(100))
    with pytest.raises(ValueError, match="unknown stages"):
        StageDropout({"masking": 0.1})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        StageDropout(1.0)


def test_random_dropouts_end_to_end_recover_the_survivors_sum():
    cohort = list(range(30))
    protocol = make_protocol(numel=100, max_weight=8.0, max_dropout=0.4, num_neighbours=14,
                             dropout={"share_keys": 0.03, "masked_input": 0.05, "unmasking": 0.05})
    updates = make_updates(cohort, 100)
    agg, result = run_round(protocol, updates)
    view = agg.server.view
    assert result is not None and 0 < len(agg.dropped) < 12
    enc = encodings(protocol, agg, updates)
    assert np.array_equal(view.unmasked_sum, modular_sum([enc[u] for u in view.u3], 32))


# ---------------------------------------------------------------------- the server view
def _reachable_types(obj, seen=None) -> set[type]:
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (bytes, str, int, float, bool, type(None), np.ndarray)):
        return set()
    seen.add(id(obj))
    found = {type(obj)}
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif dataclasses.is_dataclass(obj):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__") and not callable(obj):
        items = list(vars(obj).values())
    else:
        items = []
    for item in items:
        found |= _reachable_types(item, seen)
    return found


def test_server_view_never_contains_an_input(tmp_path):
    cohort = list(range(16))
    updates = make_updates(cohort, 4000)
    nbrs = _graph(make_protocol(numel=4000), cohort, 8)[0]
    protocol = make_protocol(numel=4000, max_weight=8.0, num_neighbours=8,
                             dropout=ScheduledDropout({0: {nbrs[0]: "masked_input", nbrs[1]: "unmasking"}}))
    agg, result = run_round(protocol, updates)
    view = agg.server.view
    enc = encodings(protocol, agg, updates)
    # 1. no vector the server holds equals (or even largely overlaps) any client's input
    for array in view.arrays():
        for x in enc.values():
            assert np.mean(array == x) < 0.01
    # 2. the server never holds both secrets of one client: for a client whose y_u it holds it knows b_u
    #    but never s_sk_u, and for a client whose s_sk_u it rebuilt it never received y_u
    assert set(view.mask_keys) == {nbrs[0]} and not set(view.mask_keys) & set(view.masked_digests)
    for u, residual in _server_residuals(agg).items():
        assert np.mean(residual == enc[u]) < 0.01
    # 3. the server object reaches no client object, update or tensor: it only has messages
    types = _reachable_types(agg.server)
    assert not types & {SecAggClient, ClientUpdate, torch.Tensor, KeyMaterial}
    # 4. the released sum is the survivors' sum, and a saved view round-trips
    assert np.array_equal(view.unmasked_sum, modular_sum([enc[u] for u in view.u3], 32))
    path = view.save(tmp_path / "round.npz")
    loaded = ServerView.load(path)
    assert loaded.to_dict() == view.to_dict()
    assert all(np.array_equal(loaded.masked_inputs[u], view.masked_inputs[u]) for u in view.masked_inputs)
    assert np.array_equal(loaded.unmasked_sum, view.unmasked_sum)


def test_digest_only_view_keeps_no_vectors():
    protocol = make_protocol(numel=100, max_weight=8.0, record_vectors=False)
    agg, result = run_round(protocol, make_updates(list(range(6)), 100))
    assert result is not None and agg.server.view.masked_inputs == {} and len(agg.server.view.masked_digests) == 6


# ---------------------------------------------------------------------- determinism
def test_seeded_runs_are_identical_and_key_source_does_not_change_the_sum():
    updates = make_updates(list(range(8)), 500)
    views = []
    for seed, source in ((3, "seeded"), (3, "seeded"), (4, "seeded"), (3, "os")):
        agg, _ = run_round(make_protocol(numel=500, seed=seed, max_weight=8.0, key_source=source), updates)
        views.append(agg.server.view)
    same, again, other_seed, os_keys = views
    assert same.masked_digests == again.masked_digests and same.to_dict() == again.to_dict()
    assert np.array_equal(same.unmasked_sum, again.unmasked_sum)
    assert set(same.masked_digests.values()).isdisjoint(other_seed.masked_digests.values())
    assert set(same.masked_digests.values()).isdisjoint(os_keys.masked_digests.values())
    assert np.array_equal(same.unmasked_sum, os_keys.unmasked_sum)  # masks cancel whatever the keys


def test_graph_is_k_regular_and_degree_grows_with_log_n():
    assert [num_neighbours(n) for n in (2, 5, 10, 100, 500, 4096)] == [1, 4, 8, 14, 18, 24]
    assert num_neighbours(100, 5) == 6 and num_neighbours(4, 10) == 3
    members = list(range(0, 60, 2))
    graph = harary_graph(members, 6, make_generator(0, "g"))
    assert all(len(v) == 6 and u not in v for u, v in graph.items())
    assert all(u in graph[v] for u, vs in graph.items() for v in vs)  # symmetric
    assert len(components(graph, members)) == 1
    assert graph != harary_graph(members, 6, make_generator(1, "g"))
