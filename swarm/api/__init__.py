"""swarm-api: an OpenAI-compatible HTTP endpoint whose model runs in the swarm."""
