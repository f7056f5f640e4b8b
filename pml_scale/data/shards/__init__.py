"""The shard format and the sharding tool: parsers of the public datasets' files (``sources``),
conversion to shards, the manifest and per-shard indexes, and the drift check of shard files."""
