"""Step timing for the benchmarks: wall and CPU time per step, summarised by median and IQR.

On a machine shared with other work the wall time of a step moves with the load; the CPU time
(all threads of this process) moves much less. Both are reported as a median with its
interquartile range, so a reader can see how much a number can be trusted.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class StepTimes:
    """Wall and CPU seconds of the timed steps of one benchmark row."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def time(self, step) -> None:
        """Run `step()` once and record its wall and CPU time."""
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)

    def summary(self) -> dict[str, float]:
        """{step_ms, step_ms_iqr, cpu_ms, cpu_ms_iqr, steps}: medians and interquartile ranges in ms."""
        wall_med, wall_iqr = median_iqr(self.wall)
        cpu_med, cpu_iqr = median_iqr(self.cpu)
        return {"step_ms": round(1e3 * wall_med, 2), "step_ms_iqr": round(1e3 * wall_iqr, 2),
                "cpu_ms": round(1e3 * cpu_med, 2), "cpu_ms_iqr": round(1e3 * cpu_iqr, 2), "steps": len(self.wall)}


def median_iqr(samples: list[float]) -> tuple[float, float]:
    """(median, q3 - q1) of the samples; the IQR is 0 for fewer than two samples."""
    if not samples:
        raise ValueError("median_iqr: no samples")
    if len(samples) < 2:
        return samples[0], 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return statistics.median(samples), q3 - q1
