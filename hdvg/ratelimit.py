"""Download limits shared by every worker: at most `per_host_concurrency` downloads in
flight per host, at most `per_host_rate_per_s` starts per host and `rate_limit_per_s`
starts overall.

Under Ray the state lives in one small named actor (`get_if_exists`), so the limits hold
across all workers and nodes of the job; without Ray (serial executor, tests, scripts) an
in-process state with a lock does the same for threads. We chose an actor over file locks
under OUT/.work because a cluster's workers do not share a local disk, and flock on
network filesystems is unreliable.

Concurrency slots are leases with a time-to-live: a worker killed mid-download cannot hold
its host's slot forever. The pure core (`LimiterState`) is testable without Ray or time.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .config import DownloadConfig

MAX_WAIT_POLL_S = 0.5  # re-ask at least this often while waiting for a slot
ACTOR_PREFIX = "hdvg-download-limiter"


@dataclass
class Limits:
    per_host_concurrency: int = 4
    per_host_rate_per_s: float | None = None
    rate_limit_per_s: float | None = None
    lease_ttl_s: float = 3600.0

    @classmethod
    def of(cls, cfg: DownloadConfig) -> Limits:
        # a lease outlives the longest legitimate download (retries included), no more
        ttl = cfg.total_timeout_s + 60.0
        return cls(cfg.per_host_concurrency, cfg.per_host_rate_per_s, cfg.rate_limit_per_s, ttl)


@dataclass
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. Starts full."""

    rate: float
    burst: float = 1.0
    tokens: float = -1.0
    stamp: float = 0.0

    def wait_for(self, now: float) -> float:
        """Seconds until a token is free (0: one is taken now)."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class LimiterState:
    """Leases per host plus token buckets; every method takes `now` (pure, testable)."""

    leases: dict[str, dict[int, float]] = field(default_factory=dict)  # host → {id: expiry}
    buckets: dict[str, TokenBucket] = field(default_factory=dict)  # host or "*" → bucket
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def acquire(self, host: str, limits: Limits, now: float) -> tuple[int | None, float]:
        """(lease id, 0) when granted; (None, seconds to wait) otherwise."""
        held = self.leases.setdefault(host, {})
        for k in [k for k, exp in held.items() if exp <= now]:
            del held[k]  # expired: its worker died or hung past the TTL
        if len(held) >= max(1, limits.per_host_concurrency):
            return None, min(MAX_WAIT_POLL_S, min(held.values()) - now)
        # check both buckets before taking from either, so a refusal costs no token
        waits = []
        for key, rate in (("*", limits.rate_limit_per_s), (host, limits.per_host_rate_per_s)):
            if rate:
                b = self.buckets.setdefault(key, TokenBucket(rate))
                b.rate = rate
                waits.append(self._peek(b, now))
        if any(w > 0 for w in waits):
            return None, max(waits)
        for key, rate in (("*", limits.rate_limit_per_s), (host, limits.per_host_rate_per_s)):
            if rate:
                self.buckets[key].wait_for(now)
        lease = next(self.ids)
        held[lease] = now + limits.lease_ttl_s
        return lease, 0.0

    @staticmethod
    def _peek(b: TokenBucket, now: float) -> float:
        tokens = b.burst if b.tokens < 0 else min(b.burst, b.tokens + (now - b.stamp) * b.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / b.rate

    def release(self, host: str, lease: int) -> None:
        self.leases.get(host, {}).pop(lease, None)

    def in_flight(self, host: str) -> int:
        return len(self.leases.get(host, {}))


class LocalLimiter:
    """In-process limiter (threads of one process)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.state = LimiterState()
        self._lock = threading.Lock()

    def _acquire(self, host: str) -> tuple[int | None, float]:
        with self._lock:
            return self.state.acquire(host, self.limits, time.monotonic())

    def _release(self, host: str, lease: int) -> None:
        with self._lock:
            self.state.release(host, lease)

    @contextmanager
    def slot(self, host: str):
        lease = _wait(lambda: self._acquire(host), self.limits.lease_ttl_s)
        try:
            yield
        finally:
            self._release(host, lease)


class RayLimiter:
    """The same limits held by one named actor for the whole Ray job."""

    def __init__(self, limits: Limits, name: str):
        self.limits, self.name = limits, name
        self._actor = None

    def _handle(self):
        import ray  # see module docstring: the one Ray use outside hdvg/runner.py

        if self._actor is None:
            self._actor = _actor_class(ray).options(
                name=self.name, get_if_exists=True, num_cpus=0, max_concurrency=64,
                max_restarts=-1,
            ).remote()  # fmt: skip
        return ray, self._actor

    def _call(self, method: str, *args):
        ray, actor = self._handle()
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            self._actor = None  # its owner died: get (or make) a fresh one and go on
            ray, actor = self._handle()
            return ray.get(getattr(actor, method).remote(*args), timeout=60)

    @contextmanager
    def slot(self, host: str):
        lim = self.limits
        lease = _wait(lambda: tuple(self._call("acquire", host, lim)), lim.lease_ttl_s)
        try:
            yield
        finally:
            try:
                self._call("release", host, lease)
            except Exception:  # noqa: BLE001 - the lease expires by itself
                pass


def _wait(try_acquire, max_wait_s: float) -> int:
    deadline = time.monotonic() + max_wait_s
    while True:
        lease, wait = try_acquire()
        if lease is not None:
            return lease
        if time.monotonic() > deadline:
            from .download import DownloadError

            raise DownloadError("timeout", f"no download slot within {max_wait_s:.0f}s")
        time.sleep(max(0.01, min(wait, MAX_WAIT_POLL_S)))


_ACTOR_CLS = None


def _actor_class(ray):
    global _ACTOR_CLS
    if _ACTOR_CLS is None:

        class _LimiterActor:
            def __init__(self):
                self.state = LimiterState()

            def acquire(self, host: str, limits: Limits):
                return self.state.acquire(host, limits, time.monotonic())

            def release(self, host: str, lease: int) -> None:
                self.state.release(host, lease)

            def in_flight(self, host: str) -> int:
                return self.state.in_flight(host)

        _ACTOR_CLS = ray.remote(_LimiterActor)
    return _ACTOR_CLS


_LIMITERS: dict[tuple, LocalLimiter | RayLimiter] = {}
_LOCK = threading.Lock()


def _under_ray():
    ray = sys.modules.get("ray")  # never import Ray just to ask
    return ray if ray is not None and ray.is_initialized() else None


def limiter(cfg: DownloadConfig) -> LocalLimiter | RayLimiter:
    """The limiter for this process: the job's actor under Ray, else an in-process one."""
    limits = Limits.of(cfg)
    ray = _under_ray()
    if ray is not None:
        # one actor per Ray job (named actors live in the job's namespace)
        job = ray.get_runtime_context().get_job_id()
        name = f"{ACTOR_PREFIX}-{hashlib.sha256(str(job).encode()).hexdigest()[:8]}"
        key = ("ray", name, tuple(vars(limits).values()))
    else:
        key = ("local", tuple(vars(limits).values()))
    with _LOCK:
        lim = _LIMITERS.get(key)
        if lim is None:
            lim = _LIMITERS[key] = (
                RayLimiter(limits, name) if ray is not None else LocalLimiter(limits)
            )
    return lim
