"""Loading and running a span of transformer blocks from a Hugging Face checkpoint."""
