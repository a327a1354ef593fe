"""SecAgg+ communication graphs (Bell et al. 2020): random k-regular Harary graphs with k = O(log n).

Bonawitz et al. (2017) mask every pair of clients, so each client's work and messages grow with the
cohort ``n``. Bell et al. ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020)
mask and secret-share only along the edges of a random ``k``-regular graph with ``k = O(log n)``: the
sum is still the only thing revealed as long as the graph restricted to the surviving clients stays
connected (each connected component would otherwise reveal its own partial sum), which a random graph
of logarithmic degree does with high probability.

The graph used here is the Harary graph ``H(k, n)`` (clients on a cycle, each joined to its ``k / 2``
nearest positions on either side) over a random permutation of the clients, i.e. a uniformly relabelled
``k``-regular, ``k``-connected circulant graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

Graph = dict[int, tuple[int, ...]]


def num_neighbours(num_clients: int, requested: int | None = None) -> int:
    """The degree ``k`` for a cohort of ``num_clients``.

    ``None`` picks ``2 * ceil(log2 n)`` (k grows with log n: 8 for 10 clients, 14 for 100, 18 for 500);
    an odd ``k`` is rounded up to even (a Harary circulant needs ``k / 2`` neighbours per side); ``k >=
    n - 1`` gives the complete graph of Bonawitz et al.
    """
    if num_clients < 2:
        return 0
    if requested is None:
        k = 2 * math.ceil(math.log2(num_clients))
    else:
        if requested < 2:
            raise ValueError(f"secure_aggregation.num_neighbours must be >= 2 or null (automatic), got {requested}.")
        k = requested + (requested % 2)
    return min(k, num_clients - 1)


def harary_graph(members: list[int], k: int, generator: torch.Generator) -> Graph:
    """A random ``k``-regular Harary graph over ``members`` (complete graph when ``k >= n - 1``)."""
    n = len(members)
    if k >= n - 1:
        return {u: tuple(v for v in members if v != u) for u in members}
    if k % 2:
        raise ValueError(f"a Harary circulant needs an even degree below n - 1, got k={k} for n={n}.")
    order = [members[i] for i in torch.randperm(n, generator=generator).tolist()]
    graph: Graph = {}
    for pos, u in enumerate(order):
        nbrs = {order[(pos + d) % n] for d in range(1, k // 2 + 1)} | {order[(pos - d) % n] for d in range(1, k // 2 + 1)}
        graph[u] = tuple(sorted(nbrs))
    return graph


def components(graph: Mapping[int, Iterable[int]], nodes: Iterable[int]) -> list[list[int]]:
    """Connected components of ``graph`` restricted to ``nodes`` (sorted, largest first)."""
    alive = set(nodes)
    seen: set[int] = set()
    comps: list[list[int]] = []
    for start in sorted(alive):
        if start in seen:
            continue
        stack, comp = [start], []
        seen.add(start)
        while stack:
            u = stack.pop()
            comp.append(u)
            for v in graph.get(u, ()):
                if v in alive and v not in seen:
                    seen.add(v)
                    stack.append(v)
        comps.append(sorted(comp))
    return sorted(comps, key=len, reverse=True)
