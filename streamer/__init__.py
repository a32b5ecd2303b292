"""flowsort streamer: the real-time sorting service (`flowsort serve`, `flowsort keys`).

Wire protocol v1 (``docs/protocol.md``): :mod:`streamer.protocol` (definitions)
and :mod:`streamer.codec` (encoding, decoding, validation). The service:
:mod:`streamer.config`, :mod:`streamer.batcher` (deadline-aware micro-batching),
:mod:`streamer.policy` (sort gates), :mod:`streamer.model` (engine, warmup,
timing), :mod:`streamer.ingest`, :mod:`streamer.dispatcher`,
:mod:`streamer.emitter` (one thread each), :mod:`streamer.metrics`,
:mod:`streamer.health`, :mod:`streamer.security` (CurveZMQ),
:mod:`streamer.recording` (acquisition files), :mod:`streamer.service`
(lifecycle). Peers for tests, the bench and integrators: :mod:`streamer.client`,
:mod:`streamer.testing`.

Nothing here imports torch: the service runs on the runtime dependencies alone.
"""
