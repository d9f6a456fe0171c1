"""The peer node: serves a span of transformer blocks to clients over hivemind P2P."""
