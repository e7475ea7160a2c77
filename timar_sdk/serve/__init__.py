"""timar-serve: TIMAR conversations over WebSocket (docs/PROTOCOL.md), for the `serve` extra.

    protocol.py    the wire format: constants, encoders and decoders (numpy, json, struct)
    config.py      ServeConfig: the server's limits
    metrics.py     ServerMetrics: Prometheus metrics of one server
    connection.py  Connection: one client's conversation on the event loop
    conversations.py  Conversations: one Model, one Scheduler, the connections, admission, drain
    server.py      TimarServer (Conversations on the websockets library), ServerThread
    ray_app.py     the same on Ray Serve: N replicas behind its proxy (the `ray` extra)
    client.py      Client (blocking), AsyncClient (asyncio)
    loadtest.py    simulated real-time clients, latency percentiles, the largest N within a budget
    cli.py         timar-serve and timar-loadtest

Importing this package imports nothing heavy; the modules above need `websockets` and
`prometheus-client` (pip install -e ".[serve]").
"""
