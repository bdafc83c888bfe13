"""The ETA: simulated futures of the remaining sub-DAG over lognormal durations (pure,
no I/O, clock passed in).

- The ETA comes from simulated futures of the remaining sub-DAG (lognormal durations,
  drawn with common random numbers so polls do not jitter) and is their median weighted
  by 1 / total time: the answer with the least expected error as a share of the run's
  total, slightly below the plain median when durations are very uncertain
  (bench/RESULTS.md shows why a median and not a mean, and the numbers).
- This run's speed versus its history has a spike-and-slab prior: even odds that it
  goes at its history's speed, so noise in its first nodes is not extrapolated.

Why one module of ~570 lines: the prior, the run model, the simulation and the weighted
median are steps of one estimator over shared private types; bench/eta_quality.py
measures them only together.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist

from server.progress.fold import (
    _US,
    COMPLETED,
    RUNNING,
    SKIPPED,
    FoldState,
    NodeState,
)
from server.progress.history import HistoryView, Stats, log_seconds

MIN_REMAINING = 0.1  # SPEC: an unfinished run always has some time left
DEFAULT_VAR = 0.36  # log-variance of one node's durations before any is measured
POOLED_VAR = 1.0  # log-variance across a run's different nodes before it is measured
K_VAR = 2.0  # pseudo-count pulling a measured log-variance toward its reference
MIN_BETWEEN = 0.05  # floor of the between-node log-variance within a node type
CAL_TAU = 0.35  # prior sd of this run's log speed factor versus history (1.4x at 1 sd)
CAL_SLAB_ODDS = 0.5  # prior probability that the run's speed departs from its history
K_TYPE = 1.0  # pseudo-count pulling this run's per-type mean toward the run's mean
EM_ROUNDS = 12


MC_SAMPLES = 32  # simulated futures per poll (at most 64)
MC_MIN_SAMPLES = 8
MC_BUDGET = 16_000  # node durations drawn per poll at most: big plans get fewer futures
TAIL_Z = 5.0  # a running node this many sd past its median: exponential tail


_NORMAL = NormalDist()
_SPEED_KEY = "\x00speed"  # the speed factor's draws (a node of this id only shares them)


# ------------------------------------------------------------------ lognormal math

_SQRT_HALF_PI = math.sqrt(math.pi / 2)


def _mills(x: float) -> float:
    """Mills ratio Q(x)/phi(x) of the standard normal, stable for large x."""
    if x > 25.0:
        inv2 = 1.0 / (x * x)
        return (1.0 - inv2 * (1.0 - 3.0 * inv2 * (1.0 - 5.0 * inv2))) / x
    return _SQRT_HALF_PI * math.erfc(x / math.sqrt(2.0)) * math.exp(x * x / 2.0)


def _hazard(x: float) -> float:
    """phi(x)/Q(x): how far above a lower bound x a standard normal is expected to be."""
    if x < -25.0:
        return 0.0
    return 1.0 / _mills(x)


def expected_remaining(mu: float, var: float, ran: float) -> float:
    """E[D - t | D > t] for D lognormal(mu, var) and t = `ran` seconds: never zero."""
    mean = math.exp(mu + var / 2.0)
    if ran <= 0.0:
        return mean
    s = math.sqrt(max(var, 1e-6))
    a = (math.log(ran) - mu) / s
    if a < -8.0:
        # Far before the median the condition D > t carries no information.
        return max(mean - ran, 0.0) or mean
    # E[D | D > t] = t * R(a - s) / R(a), R the Mills ratio.
    return ran * (_mills(a - s) / _mills(a) - 1.0)


# ------------------------------------------------------------------------ estimator


@dataclass(slots=True)
class _Prior:
    mu: float
    var: float
    calibrated: bool  # from history, so this run's speed factor applies


def _var(stats: Stats | None) -> float | None:
    return None if stats is None else stats.var_log


def _pooled_within(history: HistoryView) -> float:
    """Run-to-run log-variance of one node, pooled over the definition's nodes."""
    m2 = sum(st.m2_log for st in history.nodes.values() if st.count >= 2)
    dof = sum(st.count - 1 for st in history.nodes.values() if st.count >= 2)
    return (m2 + K_VAR * DEFAULT_VAR) / (dof + K_VAR)


def _history_prior(
    definition_id: str | None,
    node_id: str,
    node: NodeState,
    history: HistoryView,
    reference: float,
) -> _Prior | None:
    """The node's own history shrunk toward its type's, else the type's, else None."""
    own = history.for_node(definition_id, node_id)
    kind = history.for_type(node.node_type)
    kind_var = _var(kind)
    if own is None:
        if kind is None:
            return None
        var = kind_var if kind_var is not None else DEFAULT_VAR
        return _Prior(kind.mean_log, var * (1.0 + 1.0 / kind.count), True)
    # Within-node variance, pulled toward the definition's pooled one while few runs
    # are known (a type's variance also holds the differences between its nodes).
    within = (own.m2_log + K_VAR * reference) / (own.count - 1 + K_VAR)
    if kind is None:
        return _Prior(own.mean_log, within * (1.0 + 1.0 / own.count), True)
    # Empirical Bayes: trust the node's mean over the type's by within/between variance.
    between = max((kind_var if kind_var is not None else reference) - within, MIN_BETWEEN)
    k = min(max(within / between, 0.1), 50.0)
    n = own.count
    mu = (n * own.mean_log + k * kind.mean_log) / (n + k)
    return _Prior(mu, within * (1.0 + 1.0 / (n + k)), True)


def _censored_mean(
    obs: list[tuple[float, float]],
    cens: list[tuple[float, float]],
    prior_mean: float,
    prior_weight: float,
) -> float:
    """MAP of a common shift from exact (value, var) and lower-bounded (bound, var) data (EM)."""
    num0 = prior_weight * prior_mean + sum(x / v for x, v in obs)
    den_exact = prior_weight + sum(1.0 / v for _, v in obs)
    den = den_exact + sum(1.0 / v for _, v in cens)
    if den <= 0.0:
        return prior_mean
    # Start from the exact data alone; each round adds what the lower bounds imply.
    c = num0 / den_exact if den_exact > 0.0 else prior_mean
    for _ in range(EM_ROUNDS):
        num = num0
        for bound, v in cens:
            s = math.sqrt(v)
            num += (c + s * _hazard((bound - c) / s)) / v
        c = num / den
    return c


def _informative(bound: float, var: float) -> bool:
    """A running node tells something only once it has run near its expected life."""
    return bound / math.sqrt(var) > -3.0


@dataclass(slots=True)
class _RunModel:
    """This run's own durations, for nodes without history."""

    mean: float
    var_all: float
    var_within: float
    count: int
    by_type: dict[str | None, float]

    def prior(self, node_type: str | None) -> _Prior:
        """A node of this run, of this type when the run has seen that type."""
        mu = self.by_type.get(node_type)
        if mu is None:
            return _Prior(self.mean, self.var_all * (1.0 + 1.0 / self.count), False)
        return _Prior(mu, self.var_within * (1.0 + 1.0 / self.count), False)


def _run_model(
    done: list[tuple[str | None, float]], running: list[tuple[str | None, float]]
) -> _RunModel | None:
    """Mean log-duration of this run's nodes (overall and per type), counting running ones."""
    if not done:
        return None
    n = len(done)
    xs = [x for _, x in done]
    plain = sum(xs) / n
    ss_all = sum((x - plain) ** 2 for x in xs)
    var_all = (ss_all + K_VAR * POOLED_VAR) / (n - 1 + K_VAR)
    groups: dict[str | None, list[float]] = {}
    for t, x in done:
        groups.setdefault(t, []).append(x)
    ss_within = 0.0
    for values in groups.values():
        m = sum(values) / len(values)
        ss_within += sum((x - m) ** 2 for x in values)
    var_within = (ss_within + K_VAR * DEFAULT_VAR) / (n - len(groups) + K_VAR)
    # Short nodes finish first: the running ones are lower bounds, or the mean is biased low.
    cens_all = [(b, var_all) for _, b in running if _informative(b - plain, var_all)]
    mean = _censored_mean([(x, var_all) for x in xs], cens_all, plain, 0.0)
    # Per type, pulled toward the run's mean; a type with only running nodes counts too
    # once they run long, so a long type is noticed before its first node finishes.
    by_type: dict[str | None, float] = {}
    running_by_type: dict[str | None, list[tuple[float, float]]] = {}
    for t, b in running:
        if _informative(b - mean, var_within):
            running_by_type.setdefault(t, []).append((b, var_within))
    for t in groups.keys() | running_by_type.keys():
        obs = [(x, var_within) for x in groups.get(t, ())]
        cens = running_by_type.get(t, [])
        by_type[t] = _censored_mean(obs, cens, mean, K_TYPE / var_within)
    return _RunModel(mean, var_all, var_within, n, by_type)


def _speed(obs: list[tuple[float, float]], cens: list[tuple[float, float]]) -> tuple[float, float]:
    """Posterior mean and variance of this run's log speed factor versus its history.

    `obs` are finished nodes' (log duration - expected, variance), `cens` running nodes'
    (log time run so far - expected, variance), lower bounds. The prior is a spike and
    slab: even odds that the run goes at its history's speed (the history's spread
    already holds ordinary run-to-run variation) or that it departs from it by a factor
    of prior sd CAL_TAU. A run within noise of its history is not recalibrated on that
    noise; a clearly slow one is followed almost as fast as with the slab alone.
    """
    exact = sum(1.0 / v for _, v in obs)
    slab = _censored_mean(obs, cens, 0.0, 1.0 / CAL_TAU**2)
    slab_var = 1.0 / (1.0 / CAL_TAU**2 + exact)
    if exact <= 0.0:
        # Only lower bounds: no evidence for the odds, which stay even.
        p_slab = CAL_SLAB_ODDS
    else:
        # Evidence: the data's own estimate of the factor, and its noise, under each.
        r = _censored_mean(obs, cens, 0.0, 0.0)
        noise = 1.0 / exact
        wide = noise + CAL_TAU**2
        log_ratio = 0.5 * (math.log(noise / wide) + r * r / noise - r * r / wide)
        log_ratio = min(max(log_ratio, -700.0), 700.0)
        odds = CAL_SLAB_ODDS / (1.0 - CAL_SLAB_ODDS) * math.exp(log_ratio)
        p_slab = odds / (1.0 + odds)
    mean = p_slab * slab
    second = p_slab * (slab_var + slab * slab)
    return mean, max(second - mean * mean, 0.0)


def _slots(state: FoldState) -> int | None:
    """How many nodes may run at once: the plan's limit, else none with a DAG, else observed."""
    if state.max_concurrency is not None:
        return state.max_concurrency
    if state.has_deps:
        return None
    if state.active_us > 0:
        return max(1, round(state.busy_us / state.active_us))
    return None


@lru_cache(maxsize=8)
def _strata(k: int) -> tuple[float, ...]:
    """The standard normal quantiles at (i + 0.5) / k, i < k: one draw per stratum."""
    z = NormalDist()
    return tuple(z.inv_cdf((i + 0.5) / k) for i in range(k))


def _draw_order(key: str, k: int) -> list[int]:
    """A fixed pseudo-random permutation of range(k) for `key` (k <= 64).

    Sample i of a node uses stratum order[i]: each node sees every stratum once (a Latin
    hypercube), nodes are mixed independently, and a node's draws are the same at every
    poll (common random numbers), so the estimate moves only when the run does.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=k).digest()
    return sorted(range(k), key=digest.__getitem__)


def _samples(state: FoldState) -> int:
    """Simulated futures per poll: MC_SAMPLES, fewer for big plans (fixed for a plan)."""
    return min(MC_SAMPLES, max(MC_MIN_SAMPLES, MC_BUDGET // max(len(state.nodes), 1)))


def _left_of_running(mu: float, var: float, ran: float, u: float) -> float:
    """The u-quantile of D - t given D > t, for D lognormal(mu, var) and t = `ran`."""
    s = math.sqrt(max(var, 1e-6))
    if ran <= 0.0:
        return math.exp(mu + s * _NORMAL.inv_cdf(u))
    a = (math.log(ran) - mu) / s
    if a > TAIL_Z:
        # Far in the tail the excess over t is close to exponential with the right mean.
        return expected_remaining(mu, var, ran) * -math.log1p(-u)
    survival = 0.5 * math.erfc(a / math.sqrt(2.0)) * (1.0 - u)
    return max(math.exp(mu - s * _NORMAL.inv_cdf(survival)) - ran, 0.0)


@dataclass(slots=True)
class _Remaining:
    """The unfinished nodes of a run, as the simulation needs them."""

    ids: list[str] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # plan position, ties broken by it
    mu: list[float] = field(default_factory=list)  # log-duration, without the speed shift
    sd: list[float] = field(default_factory=list)
    shifted: list[bool] = field(default_factory=list)  # the run's speed factor applies
    left: dict[int, list[float]] = field(default_factory=dict)  # running: time left per sample


def _weighted_median(values: list[float], weights: list[float]) -> float:
    """The value at half the total weight, interpolated between samples (no jumps)."""
    pairs = sorted(zip(values, weights, strict=True))
    total = sum(w for _, w in pairs)
    below = 0.0
    prev_at, prev_value = 0.0, pairs[0][0]
    for value, w in pairs:
        at = (below + w / 2.0) / total  # where this sample's mass is centred
        if at >= 0.5:
            if below == 0.0:
                return value
            return prev_value + (value - prev_value) * (0.5 - prev_at) / (at - prev_at)
        below += w
        prev_at, prev_value = at, value
    return pairs[-1][0]


def _simulate(
    state: FoldState,
    rem: _Remaining,
    speed: list[float],
    slots: int | None,
    trace: list[tuple[list[float], list[float]]] | None = None,
) -> list[float]:
    """The remaining sub-DAG's makespan in each sampled future, list-scheduled on `slots`.

    Pending nodes draw lognormal durations (shifted by that future's speed factor when
    calibrated against history), running ones their time left given the time already
    run. Ready nodes start first-ready first, then in plan order, as engines commonly do.
    With `trace`, each future's (start, end) of every node of `rem` is appended to it,
    in seconds from now (a running node starts at 0): the schedule comes from the same
    futures as the ETA.
    """
    k_samples = len(speed)
    strata = _strata(k_samples)
    n = len(rem.ids)
    index = {node_id: i for i, node_id in enumerate(rem.ids)}
    children: list[list[int]] = [[] for _ in range(n)]
    indegree = [0] * n
    for i, node_id in enumerate(rem.ids):
        if i in rem.left:
            continue
        for dep in state.nodes[node_id].depends_on:
            j = index.get(dep)
            if j is not None and j != i:
                indegree[i] += 1
                children[j].append(i)
    pending = [i for i in range(n) if i not in rem.left]
    draws = {i: _draw_order(rem.ids[i], k_samples) for i in pending}
    roots = [(0.0, rem.order[i], i) for i in pending if indegree[i] == 0]
    heapq.heapify(roots)
    unlimited = slots is None or slots >= n
    topo: list[int] = []
    if unlimited:
        # Critical path: nodes in an order where parents come first.
        need = indegree.copy()
        stack = [i for i in range(n) if need[i] == 0]
        while stack:
            i = stack.pop()
            topo.append(i)
            for c in children[i]:
                need[c] -= 1
                if need[c] == 0:
                    stack.append(c)
    ends: list[float] = []
    for k in range(k_samples):
        dur = [0.0] * n
        for i, order in draws.items():
            shift = speed[k] if rem.shifted[i] else 0.0
            dur[i] = math.exp(rem.mu[i] + shift + rem.sd[i] * strata[order[k]])
        for i, left in rem.left.items():
            dur[i] = left[k]
        if unlimited:
            finish = [0.0] * n
            ready = [0.0] * n
            for i in topo:
                finish[i] = ready[i] + dur[i]
                for c in children[i]:
                    if finish[i] > ready[c]:
                        ready[c] = finish[i]
            ends.append(max(finish, default=0.0))
            if trace is not None:
                trace.append((ready, finish))
            continue
        need = indegree.copy()
        busy = [(dur[i], rem.order[i], i) for i in rem.left]
        heapq.heapify(busy)
        ready_heap = roots.copy()
        begin = [0.0] * n
        end = 0.0
        while True:
            while ready_heap and (slots is None or len(busy) < slots):
                _, order_i, i = heapq.heappop(ready_heap)
                begin[i] = end
                heapq.heappush(busy, (end + dur[i], order_i, i))
            if not busy:
                break
            end, _, i = heapq.heappop(busy)
            for c in children[i]:
                need[c] -= 1
                if need[c] == 0:
                    heapq.heappush(ready_heap, (end, rem.order[c], c))
        ends.append(end)
        if trace is not None:
            trace.append((begin, [begin[i] + dur[i] for i in range(n)]))
    return ends


@dataclass(slots=True)
class Forecast:
    """The ETA and the simulated futures it comes from, as of the `now` it was made at.

    `futures` holds, per simulated future, every unfinished node's (start, end) in
    seconds from that `now` (kept as the simulation made them, so an ETA costs no more
    for it); schedule() reads the predicted schedule from them on demand.
    """

    remaining: float | None
    ids: list[str] = field(default_factory=list)  # the nodes of `futures`, by index
    running: frozenset[int] = frozenset()  # indexes of nodes already running
    futures: list[tuple[list[float], list[float]]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # each future's, as for the ETA
    _schedule: dict[str, tuple[float | None, float]] | None = None

    def schedule(self) -> dict[str, tuple[float | None, float]]:
        """Each unfinished node's predicted (start, end), seconds from the forecast's now.

        The weighted medians over the same futures, with the same weights, as the ETA; a
        running node's start is None (it has started). In each future a node starts after
        its dependencies end and ends by the makespan, so the medians keep that order and
        the latest end is at most `remaining` (up to the interpolation between futures).
        Computed once per forecast.
        """
        if self._schedule is None:
            out: dict[str, tuple[float | None, float]] = {}
            for i, node_id in enumerate(self.ids):
                end = _weighted_median([f[i] for _, f in self.futures], self.weights)
                if i in self.running:
                    out[node_id] = (None, end)
                else:
                    begin = _weighted_median([b[i] for b, _ in self.futures], self.weights)
                    out[node_id] = (begin, end)
            self._schedule = out
        return self._schedule


def eta(state: FoldState, history: HistoryView, now: float) -> float | None:
    """Seconds left: None without a basis, 0 when terminal, else at least 0.1.

    The median of simulated futures weighted by 1 / their total time (the least expected
    error as a share of the total); an overdue node still has time left. Deterministic:
    the same state, history and `now` give the same answer.
    """
    return forecast(state, history, now, keep=False).remaining


def forecast(state: FoldState, history: HistoryView, now: float, *, keep: bool = True) -> Forecast:
    """eta(), and with `keep` the simulated futures that give the predicted schedule."""
    if state.terminal:
        return Forecast(0.0)
    now_us = round(now * _US)
    reference = _pooled_within(history)
    priors: dict[str, _Prior | None] = {}
    done: list[tuple[str | None, float]] = []
    ran: dict[str, float] = {}
    for node_id, node in state.nodes.items():
        if node.status in (COMPLETED, SKIPPED):
            if node.status == COMPLETED and node.duration_us is not None:
                done.append((node.node_type, log_seconds(node.duration_us / _US)))
                priors[node_id] = _history_prior(
                    state.definition_id, node_id, node, history, reference
                )
            continue
        if not node.planned and node.status != RUNNING:
            continue  # out of plan and not running: nothing is known to be left of it
        priors[node_id] = _history_prior(state.definition_id, node_id, node, history, reference)
        if node.status == RUNNING and node.started_us is not None:
            ran[node_id] = max(now_us - node.started_us, 0) / _US
    with_history = [p for p in priors.values() if p is not None]
    if not done and not with_history:
        return Forecast(None)

    # This run's log speed factor versus its history, from its finished nodes and, as
    # lower bounds, its running ones (short nodes finish first: finished nodes alone make
    # a run look fast early on), shrunk toward 1x while the evidence is thin.
    obs: list[tuple[float, float]] = []
    for node_id, node in state.nodes.items():
        prior = priors.get(node_id)
        if prior is not None and node.status == COMPLETED and node.duration_us is not None:
            obs.append((log_seconds(node.duration_us / _US) - prior.mu, prior.var))
    cens: list[tuple[float, float]] = []
    for node_id, t in ran.items():
        prior = priors.get(node_id)
        if prior is not None and t > 0.0:
            cens.append((math.log(t) - prior.mu, prior.var))
    factor, factor_var = _speed(obs, cens)

    run = _run_model(
        done,
        [
            (state.nodes[n].node_type, math.log(t))
            for n, t in ran.items()
            if t > 0.0 and priors.get(n) is None
        ],
    )
    fallback = _Prior(0.0, DEFAULT_VAR, False)
    if run is None:
        # Nothing finished yet: a node without history is taken as an average known node.
        mus = [p.mu for p in with_history]
        mean_mu = sum(mus) / len(mus)
        spread = sum((m - mean_mu) ** 2 for m in mus) / len(mus)
        mean_var = sum(p.var for p in with_history) / len(with_history)
        fallback = _Prior(mean_mu, mean_var + spread, True)

    # Each sampled future has its own speed factor, drawn from what this run's finished
    # nodes say of it: futures where the run is slow are slow in every node at once.
    k_samples = _samples(state)
    strata = _strata(k_samples)
    speed_sd = math.sqrt(factor_var)
    speed = [factor + speed_sd * strata[j] for j in _draw_order(_SPEED_KEY, k_samples)]
    rem = _Remaining()
    for node_id, node in state.nodes.items():
        if node.status in (COMPLETED, SKIPPED) or node_id not in priors:
            continue
        prior = priors[node_id]
        if prior is None:
            prior = run.prior(node.node_type) if run is not None else fallback
        i = len(rem.ids)
        rem.ids.append(node_id)
        rem.order.append(node.index if node.index >= 0 else len(state.plan))
        rem.mu.append(prior.mu)
        rem.sd.append(math.sqrt(prior.var))
        rem.shifted.append(prior.calibrated)
        if node.status == RUNNING:
            t = ran.get(node_id, 0.0)
            if prior.calibrated:
                rem.left[i] = [
                    _left_of_running(prior.mu + shift, prior.var, t, (j + 0.5) / k_samples)
                    for shift, j in zip(speed, _draw_order(node_id, k_samples), strict=True)
                ]
            else:
                # An overdue node hints that this run is slow: its tail includes the doubt
                # about the run's own mean, or a long-overdue node would "finish any second".
                var = prior.var + (run.var_all / run.count if run is not None else 0.0)
                rem.left[i] = [
                    _left_of_running(prior.mu, var, t, (j + 0.5) / k_samples)
                    for j in _draw_order(node_id, k_samples)
                ]
        # Failed nodes are pending: they are expected to be retried while the run goes on.
    if not rem.ids:
        return Forecast(MIN_REMAINING)
    # The error that matters is a share of the run's total time (a minute is a lot on a
    # five-minute run, nothing on a two-hour one), so the answer is the weighted median
    # of the simulated remaining times, each future weighted by 1 / its total time: the
    # estimate with the least expected error relative to the total. The futures also
    # show that the latest of several parallel branches ends later than their expected
    # ends say (a max of random times), which a schedule of expected times misses.
    futures: list[tuple[list[float], list[float]]] | None = [] if keep else None
    ends = _simulate(state, rem, speed, _slots(state), futures)
    spent = max(now_us - state.started_us, 0) / _US if state.started_us is not None else 0.0
    weights = [1.0 / (spent + e + MIN_REMAINING) for e in ends]
    makespan = _weighted_median(ends, weights)
    if futures is None:
        return Forecast(max(makespan, MIN_REMAINING))
    return Forecast(max(makespan, MIN_REMAINING), rem.ids, frozenset(rem.left), futures, weights)
