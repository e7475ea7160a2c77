"""Prometheus metrics of one timar-serve server, in a registry of its own (served at /metrics).

Turn metrics are observed on the Scheduler's worker thread (prometheus-client is thread-safe);
connection metrics on the event loop. The batch size and queue wait come from a probe on the
model's audio encoder, which the batched call runs once per batch with 2 waveforms per turn.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the server

from timar_sdk.runtime.model import Model
from timar_sdk.runtime.scheduler import MotionChunk

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)   # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The server's metrics. `registry` also holds the process's CPU and memory
    (process_cpu_seconds_total, process_resident_memory_bytes; Linux)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.sessions = Gauge("timar_sessions", "Conversations open now", registry=r)
        self.sessions_opened = Counter("timar_sessions_opened", "Conversations opened", registry=r)
        self.refused = Counter("timar_refused_connections", "Connections refused, by reason", ["reason"], registry=r)
        self.errors = Counter("timar_errors", "Error messages sent to clients, by code", ["code"], registry=r)
        self.turns = Counter("timar_turns", "Turns of motion computed", registry=r)
        self.turn_latency = Histogram("timar_turn_latency_seconds", "Turn input complete -> motion ready (server)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("timar_queue_wait_seconds", "Turn input complete -> its batch started",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("timar_batch_size", "Turns per batched model call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self._batch_started = 0.0            # perf_counter of the latest batch's start (worker thread)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

    def probe_batches(self, model: Model) -> None:
        """Observe each batch of `model` (its backend's encode_audio: 2 waveforms per turn).
        Give the server a Model of its own: other users of the model would be counted too."""
        backend = model.backend
        encode = backend.encode_audio

        def probed(waves, *args, **kwargs):
            self._batch_started = time.perf_counter()
            self.batch_size.observe(max(1, len(waves) // 2))
            return encode(waves, *args, **kwargs)
        backend.encode_audio = probed

    def observe_turn(self, chunk: MotionChunk) -> None:
        """A turn delivered by the Scheduler; called on the worker thread right after its batch."""
        completed_at = time.perf_counter() - chunk.latency_s
        self.turns.inc()
        self.turn_latency.observe(chunk.latency_s)
        self.queue_wait.observe(max(0.0, self._batch_started - completed_at))
