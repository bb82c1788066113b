"""What the fuzzers ran: cases and statuses per operation, printed at the end of the session
(and written to ``$TUNEFORGE_FUZZ_REPORT`` as JSON when set), for bench/RESULTS.md."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class FuzzStats:
    cases: Counter[str] = field(default_factory=Counter)
    statuses: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: Counter[str] = field(default_factory=Counter)

    def record(self, operation: str, status: int | None, seconds: float) -> None:
        self.cases[operation] += 1
        self.statuses[operation]["failed" if status is None else f"{status // 100}xx"] += 1
        self.seconds[operation] += seconds

    def table(self) -> str:
        lines = [
            "| operation | cases | 2xx | 4xx | 5xx | failed checks | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for op in sorted(self.cases):
            s = self.statuses[op]
            lines.append(
                f"| `{op}` | {self.cases[op]} | {s['2xx']} | {s['4xx']} | {s['5xx']} | {s['failed']} "
                f"| {self.seconds[op]:.1f} |"
            )
        total = sum(self.cases.values())
        lines.append(
            f"| total ({len(self.cases)} operations) | {total} | | | | | {sum(self.seconds.values()):.0f} |"
        )
        return "\n".join(lines)

    def dump(self) -> None:
        if not self.cases:
            return
        print("\n" + self.table())
        if path := os.environ.get("TUNEFORGE_FUZZ_REPORT"):
            with open(path, "w") as fh:
                json.dump(
                    {"cases": self.cases, "statuses": self.statuses, "seconds": self.seconds}, fh, indent=1
                )


STATS = FuzzStats()
