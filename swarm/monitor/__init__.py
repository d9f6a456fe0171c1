"""``swarm-monitor``: a public health monitor of a swarm (coverage map, peer table, history, JSON API, metrics)."""
