"""A short-lived cache of key hash -> principal, so that each request does not pay a DB
round trip to authenticate. Entries live a few seconds: a revoked key stops working
within that time."""

from __future__ import annotations

import time
from collections import OrderedDict

from tuneforge_api.store.projects import Principal


class AuthCache:
    def __init__(self, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        expires, principal = entry
        if expires < time.monotonic():
            del self._entries[key_hash]
            return None
        return principal

    def put(self, key_hash: str, principal: Principal) -> None:
        self._entries[key_hash] = (time.monotonic() + self.ttl_s, principal)
        self._entries.move_to_end(key_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
