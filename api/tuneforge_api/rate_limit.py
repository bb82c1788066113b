"""Per-project request rate limit (OWASP API4): a token bucket per project.

The buckets live in Redis, so every API replica draws from the same one, and a check costs
one round trip: a Lua script reads, refills and takes a token atomically, on Redis's own
clock (replicas' clocks need not agree). While Redis is unreachable each process falls back
to buckets of its own, and tries Redis again a few seconds later; a limiter that is down
never fails a request.

Requests without credentials (health probes) and the trainers' internal routes are not
counted; neither is a request whose key is not valid (it is answered 401).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request
from redis.commands.core import AsyncScript

from tuneforge_api.deps import get_principal, get_services
from tuneforge_api.errors import ApiError
from tuneforge_api.settings import Settings

log = logging.getLogger("tuneforge.api.rate_limit")

# KEYS[1]: the bucket. ARGV: rate (tokens/s), burst. Returns {allowed, ms until a token}.
TOKEN_BUCKET = """
if redis.replicate_commands then redis.replicate_commands() end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed, wait_ms = 0, 0
if tokens >= 1 then
  tokens, allowed = tokens - 1, 1
else
  wait_ms = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, wait_ms}
"""
REDIS_TIMEOUT_S = 0.25
REDIS_RETRY_S = 5.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0


class LocalBuckets:
    """The same token bucket in process memory, for when Redis is down (bounded LRU)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, rate: float, burst: int, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        tokens, ts = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + max(0.0, now - ts) * rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_entries:
            self._buckets.popitem(last=False)
        return Decision(allowed, 0.0 if allowed else (1 - tokens) / rate)


class RateLimiter:
    def __init__(self, redis_url: str, rate: float, burst: int, prefix: str) -> None:
        self.rate, self.burst, self.prefix, self.redis_url = rate, burst, prefix, redis_url
        self.local = LocalBuckets()
        self._redis: aioredis.Redis | None = None
        self._script: AsyncScript | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis_retry_at = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        # Replicas of one deployment share a queue name, so they share buckets too.
        prefix = f"{settings.resolved_queue_name}:ratelimit"
        return cls(settings.redis_url, settings.rate_limit_per_s, settings.rate_limit_burst, prefix)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def take(self, key: str) -> Decision:
        if not self.enabled:
            return Decision(True)
        if time.monotonic() >= self._redis_retry_at:
            try:
                script = self._script_of_loop()  # EVALSHA; EVAL once after a NOSCRIPT
                allowed, wait_ms = await script(keys=[f"{self.prefix}:{key}"], args=[self.rate, self.burst])
                return Decision(bool(allowed), int(wait_ms) / 1000)
            except Exception as exc:  # noqa: BLE001 - any Redis failure: fall back, never fail
                log.warning(
                    "rate limiter: Redis unreachable (%s); in-process buckets for a while", type(exc).__name__
                )
                self._redis_retry_at = time.monotonic() + REDIS_RETRY_S
        return self.local.take(key, self.rate, self.burst)

    def _script_of_loop(self) -> AsyncScript:
        """The script on a client of the running event loop (asyncio connections cannot cross loops)."""
        loop = asyncio.get_running_loop()
        if self._redis is None or self._script is None or self._loop is not loop:
            self._redis = aioredis.Redis.from_url(
                self.redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
            self._script, self._loop = self._redis.register_script(TOKEN_BUCKET), loop
        return self._script

    async def close(self) -> None:
        if self._redis is not None and self._loop is asyncio.get_running_loop():
            await self._redis.aclose()
        self._redis, self._script, self._loop = None, None, None


async def enforce_rate_limit(request: Request) -> None:
    """An app-wide dependency: one token from the caller's project bucket, or a 429."""
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None or not limiter.enabled or request.url.path.startswith("/internal/"):
        return  # trainers authenticate with a job token, not a project key
    try:
        principal = await get_principal(request, await get_services(request))
    except ApiError:
        return  # no valid key (a health probe, or a 401 the route answers itself)
    decision = await limiter.take(principal.project_id)
    if not decision.allowed:
        wait = max(1, math.ceil(decision.retry_after_s))
        raise ApiError(
            429,
            "rate_limit_exceeded",
            f"Too many requests for this project; retry after {wait} s.",
            headers={"Retry-After": str(wait)},
        )
