"""The server's Prometheus metrics (text exposition format): request counters by endpoint and status, token
counters, time-to-first-token and inter-token histograms, and gauges read from the engine."""
from __future__ import annotations

import bisect
import itertools
from typing import Any


class Histogram:
    """Buckets (rendered cumulative: each counts the values at or below its bound), their sum and count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # per bucket, the values above the bound before it; last: +Inf
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Count `value` `times` times (tokens that arrived together share one gap)."""
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.total += times
        self.sum += value * times

    def render(self, name: str) -> list[str]:
        cumulative = itertools.accumulate(self.counts[:-1])
        lines = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, cumulative)]
        return lines + [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}",
                        f"{name}_count {self.total}"]


class Metrics:
    """Counters and histograms, updated on the event loop's thread only; gauges read from the engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def render(self) -> str:
        out = ["# HELP omni_requests_total HTTP requests by endpoint and status code.",
               "# TYPE omni_requests_total counter"]
        out += [f'omni_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())]
        for name, kind, value, text in (
                ("omni_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt positions (text, image, audio)."),
                ("omni_completion_tokens_total", "counter", self.completion_tokens, "Generated tokens."),
                ("omni_rows_cancelled_total", "counter", self.engine.cancelled,
                 "Rows freed before finishing (client gone, stop string, shutdown)."),
                ("omni_queue_length", "gauge", self.engine.queued, "Requests waiting for a batch row."),
                ("omni_running_rows", "gauge", self.engine.running, "Rows in the running decode batch."),
                ("omni_max_batch", "gauge", self.engine.max_batch, "Rows the decode batch can hold.")):
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        out += ["# HELP omni_time_to_first_token_seconds From request arrival to the first generated token.",
                "# TYPE omni_time_to_first_token_seconds histogram",
                *self.ttft.render("omni_time_to_first_token_seconds"),
                "# HELP omni_inter_token_latency_seconds Time between consecutive generated tokens of a request.",
                "# TYPE omni_inter_token_latency_seconds histogram",
                *self.itl.render("omni_inter_token_latency_seconds")]
        return "\n".join(out) + "\n"
