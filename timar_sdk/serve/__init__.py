"""timar-serve: TIMAR conversations over WebSocket (docs/PROTOCOL.md), for the `serve` extra.

    protocol.py    the wire format: constants, encoders and decoders (numpy, json, struct)
    config.py      ServeConfig: the server's limits
    metrics.py     ServerMetrics: Prometheus metrics of one server
    connection.py  Connection: one client's conversation on the event loop
    server.py      TimarServer (one Model, one Scheduler), ServerThread
    client.py      Client (blocking), AsyncClient (asyncio)
    loadtest.py    simulated real-time clients, latency percentiles, the largest N within a budget
    cli.py         timar-serve and timar-loadtest

Importing this package imports nothing heavy; the modules above need `websockets` and
`prometheus-client` (pip install -e ".[serve]").
"""
