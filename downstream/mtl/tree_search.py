"""Task trees of branched multi-task networks: enumeration, clustering / complexity costs and the searches.

A *tree* over tasks T is a tuple of D partitions of T, one per branch point, each refining the one before
(tasks can only split, never merge, going deeper). A partition is a tuple of clusters, a cluster a tuple of
task names; both are kept in canonical order (the order of T) so equal trees compare equal.

Two published variants (SPEC §2):
* RSA + budget (thesis): ``cost = Σ_d mean_clusters max_{a,b in cluster} (1 − A[d,a,b])``; the minimum over every
  tree whose parameter count (or FLOPs) fits the budget (:func:`budget_search`).
* transfer affinity + complexity (branched-networks paper): ``cost = Σ_d [C_cluster^d + α·(b_d − 1)·2^{p_d}]``
  with b_d the number of branches at depth d and p_d the pooling layers above it; a top-down search keeps the
  n best groupings per depth (:func:`beam_search`).

Ties. Costs closer than :data:`COST_TOLERANCE` are equal (a Spearman correlation of two identical rankings can
come out as 1 − 1e-16 instead of 1, and the all-separate tree always costs exactly 0, so rounding noise alone
would otherwise pick between genuinely tied trees). Among equal-cost trees the choice is, in this order: fewer
parameters, fewer FLOPs, then the enumeration order of :func:`enumerate_trees`. With
tied affinities the search thus shares as much as it can: an unlimited budget on two tasks whose affinity is 1
at every branch point gives the all-shared tree, not the all-separate one.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Cluster = Tuple[str, ...]
Partition = Tuple[Cluster, ...]
Tree = Tuple[Partition, ...]

COST_TOLERANCE = 1e-9  # costs closer than this are ties (see the module docstring)


def set_partitions(items: Sequence[str]) -> Iterator[Partition]:
    """Every partition of ``items`` (Bell(n) of them), clusters and their members in the order of ``items``."""
    items = tuple(items)
    if not items:
        yield ()
        return
    first, rest = items[0], items[1:]
    for sub in set_partitions(rest):
        # ``first`` opens a new cluster or joins one of ``sub``'s clusters
        yield canonical(((first,), *sub), items)
        for i in range(len(sub)):
            yield canonical((*sub[:i], (first, *sub[i]), *sub[i + 1:]), items)


def canonical(partition: Sequence[Sequence[str]], order: Sequence[str]) -> Partition:
    """Members sorted by ``order``, clusters by their first member."""
    rank = {t: i for i, t in enumerate(order)}
    clusters = [tuple(sorted(c, key=rank.__getitem__)) for c in partition]
    return tuple(sorted(clusters, key=lambda c: rank[c[0]]))


def refines(fine: Partition, coarse: Partition) -> bool:
    """True when every cluster of ``fine`` lies inside one cluster of ``coarse``."""
    return all(any(set(c) <= set(big) for big in coarse) for c in fine)


def refinements(partition: Partition, order: Sequence[str]) -> Iterator[Partition]:
    """Every partition that refines ``partition`` (including itself)."""
    for parts in itertools.product(*(list(set_partitions(c)) for c in partition)):
        yield canonical([c for p in parts for c in p], order)


def enumerate_trees(tasks: Sequence[str], depth: int) -> List[Tree]:
    """All trees of ``depth`` nested partitions of ``tasks`` (the first partition refines {all tasks})."""
    trees: List[Tree] = [()]
    root: Partition = (tuple(tasks),)
    for _ in range(depth):
        trees = [(*t, p) for t in trees for p in refinements(t[-1] if t else root, tasks)]
    return trees


def validate_tree(tree: Sequence[Sequence[Sequence[str]]], tasks: Sequence[str], depth: int, *,
                  key: str = "model.branching") -> Tree:
    """``tree`` in canonical form; a ValueError naming ``key`` when it is not ``depth`` nested partitions of ``tasks``."""
    if len(tree) != depth:
        raise ValueError(f"{key}: expected one partition per branch point ({depth}), got {len(tree)}")
    out = []
    for d, partition in enumerate(tree):
        members = [t for c in partition for t in c]
        if sorted(members) != sorted(tasks) or any(len(c) == 0 for c in partition):
            raise ValueError(f"{key}[{d}]: {[list(c) for c in partition]} is not a partition of the tasks {list(tasks)} "
                             "(every task exactly once, no empty cluster)")
        p = canonical(partition, tasks)
        if out and not refines(p, out[-1]):
            raise ValueError(f"{key}[{d}]: {[list(c) for c in p]} does not refine the partition above it "
                             f"{[list(c) for c in out[-1]]} (branches can split, never merge)")
        out.append(p)
    return tuple(out)


def tree_to_lists(tree: Tree) -> List[List[List[str]]]:
    return [[list(c) for c in p] for p in tree]


def format_tree(tree: Tree) -> str:
    return " | ".join(" ".join("{" + ",".join(c) + "}" for c in p) for p in tree)


# ---------------------------------------------------------------- costs

def cluster_cost(partition: Partition, dissimilarity: np.ndarray, index: Mapping[str, int]) -> float:
    """Mean over clusters of the maximum pairwise dissimilarity inside the cluster (a singleton costs 0)."""
    costs = []
    for c in partition:
        ids = [index[t] for t in c]
        costs.append(max((float(dissimilarity[a, b]) for a in ids for b in ids if a != b), default=0.0))
    return float(np.mean(costs))


def clustering_cost(tree: Tree, dissimilarity: np.ndarray, tasks: Sequence[str]) -> float:
    """Σ_depth of :func:`cluster_cost`; ``dissimilarity`` is [D, N, N] (1 − affinity)."""
    index = {t: i for i, t in enumerate(tasks)}
    return float(sum(cluster_cost(p, dissimilarity[d], index) for d, p in enumerate(tree)))


def complexity_cost(tree: Tree, pooling_above: Sequence[int], alpha: float) -> float:
    """``Σ_d α·(b_d − 1)·2^{p_d}``: b_d branches at depth d, p_d pooling layers above branch point d."""
    return float(sum(alpha * (len(p) - 1) * 2 ** pooling_above[d] for d, p in enumerate(tree)))


@dataclass(frozen=True)
class Candidate:
    tree: Tree
    cost: float  # clustering cost (+ complexity cost in the α variant)
    params: int = 0
    flops: int = 0


def budget_search(trees: Sequence[Tree], dissimilarity: np.ndarray, tasks: Sequence[str],
                  size: Mapping[Tree, Mapping[str, int]], *, budget: float, measure: str = "params"
                  ) -> Tuple[Optional[Candidate], List[Candidate]]:
    """The minimum-clustering-cost tree with ``size[tree][measure] <= budget`` (None if none fits), and all candidates."""
    candidates = [Candidate(t, clustering_cost(t, dissimilarity, tasks), int(size[t]["params"]), int(size[t]["flops"]))
                  for t in trees]
    fitting = [c for c in candidates if getattr(c, measure) <= budget]
    return cheapest(fitting, order=trees), candidates


def cheapest(candidates: Sequence[Candidate], *, order: Sequence[Tree] = ()) -> Optional[Candidate]:
    """The minimum-cost candidate; ties (within :data:`COST_TOLERANCE`) go to fewer params, fewer FLOPs, then the
    position in ``order`` (the enumeration order; trees missing from it come last, by their canonical form)."""
    if not candidates:
        return None
    low = min(c.cost for c in candidates)
    position = {t: i for i, t in enumerate(order)}
    tied = [c for c in candidates if c.cost <= low + COST_TOLERANCE]
    return min(tied, key=lambda c: (c.params, c.flops, position.get(c.tree, len(position)), c.tree))


def beam_search(tasks: Sequence[str], dissimilarity: np.ndarray, *, pooling_above: Sequence[int], alpha: float,
                beam: int) -> List[Tuple[Tree, float]]:
    """Top-down search: at each depth expand every kept tree into all refinements, keep the ``beam`` cheapest.

    The cost of a tree is additive over depths, so a partial tree's cost is final for the depths it has.
    Returns the kept trees with their cost, cheapest first. Partial trees have no size yet, so ties (costs equal
    up to :data:`COST_TOLERANCE`) go to fewer branches, then the enumeration order; pick among the returned trees
    with :func:`cheapest` to prefer the fewer parameters among the tied ones.
    """
    if beam < 1:
        raise ValueError(f"--beam must be >= 1, got {beam}")
    index = {t: i for i, t in enumerate(tasks)}
    kept: List[Tuple[Tree, float]] = [((), 0.0)]
    for d in range(dissimilarity.shape[0]):
        grown = []
        for tree, cost in kept:
            parent = tree[-1] if tree else (tuple(tasks),)
            for p in refinements(parent, tasks):
                step = cluster_cost(p, dissimilarity[d], index) + alpha * (len(p) - 1) * 2 ** pooling_above[d]
                grown.append(((*tree, p), cost + step))
        grown.sort(key=lambda item: (round(item[1] / COST_TOLERANCE), sum(len(p) for p in item[0])))  # stable
        kept = grown[:beam]
    return kept


def pareto_front(candidates: Sequence[Candidate], measure: str = "params") -> List[Candidate]:
    """Candidates not dominated in (cost, ``measure``): no other is at most as costly and at most as large, one strictly."""
    front: List[Candidate] = []
    best_cost = float("inf")
    for c in sorted(candidates, key=lambda c: (getattr(c, measure), c.cost)):
        if c.cost < best_cost - COST_TOLERANCE:
            front.append(c)
            best_cost = c.cost
    return front


def tree_sizes(trees: Sequence[Tree], components: "ComponentSizes") -> Dict[Tree, Dict[str, int]]:
    return {t: components.tree_size(t) for t in trees}


@dataclass(frozen=True)
class ComponentSizes:
    """Params / FLOPs of the parts of a branched network; a tree's size is their count-weighted sum.

    ``segments[d]`` is the backbone segment ending at branch point d (one copy per cluster of partition d),
    ``neck`` one copy per leaf cluster (the clusters of the last partition), ``heads`` one per task.
    """

    segments: Tuple[Dict[str, int], ...]
    neck: Dict[str, int]
    heads: Dict[str, Dict[str, int]]

    def tree_size(self, tree: Tree) -> Dict[str, int]:
        out = {}
        for key in ("params", "flops"):
            total = sum(len(p) * seg[key] for p, seg in zip(tree, self.segments))
            total += len(tree[-1]) * self.neck[key] + sum(h[key] for h in self.heads.values())
            out[key] = int(total)
        return out
