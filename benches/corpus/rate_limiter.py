# Copyright 2026 the stral authors. Licensed under the Apache License, Version 2.0.
"""Token-bucket rate limiting for an HTTP API, one bucket per client key."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Bucket:
    """Holds up to `capacity` tokens and refills at `rate` tokens per second."""

    capacity: float
    rate: float
    tokens: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.rate <= 0:
            raise ValueError("capacity and rate must be positive")
        self.tokens = self.capacity

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = now

    def try_take(self, cost: float = 1.0, now: float | None = None) -> bool:
        self.refill(time.monotonic() if now is None else now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def retry_after(self, cost: float = 1.0) -> float:
        """Seconds until `cost` tokens are available."""
        missing = max(0.0, cost - self.tokens)
        return missing / self.rate


class RateLimiter:
    """Thread-safe limiter keyed by API key; idle buckets are dropped after `ttl`."""

    def __init__(self, capacity: float, rate: float, ttl: float = 600.0) -> None:
        self.capacity = capacity
        self.rate = rate
        self.ttl = ttl
        self._buckets: dict[str, Bucket] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, cost: float = 1.0) -> tuple[bool, float]:
        """Returns (allowed, retry_after_seconds)."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = Bucket(self.capacity, self.rate)
                self._buckets[key] = bucket
            if bucket.try_take(cost, now):
                return True, 0.0
            return False, bucket.retry_after(cost)

    def sweep(self) -> int:
        """Drops buckets untouched for longer than the ttl; returns how many."""
        cutoff = time.monotonic() - self.ttl
        with self._lock:
            stale = [k for k, b in self._buckets.items() if b.updated < cutoff]
            for k in stale:
                del self._buckets[k]
        return len(stale)


def middleware(limiter: RateLimiter, handler):
    """Wraps a handler(request) -> response with a 429 answer when over the limit."""

    def wrapped(request):
        key = request.headers.get("Authorization", "anonymous")
        allowed, retry = limiter.allow(key)
        if not allowed:
            return {
                "status": 429,
                "headers": {"Retry-After": str(int(retry) + 1)},
                "body": {"message": "rate limit exceeded", "type": "rate_limit"},
            }
        return handler(request)

    return wrapped


if __name__ == "__main__":
    limiter = RateLimiter(capacity=5, rate=1.0)
    results = [limiter.allow("alice")[0] for _ in range(7)]
    print(results)
