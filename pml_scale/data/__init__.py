"""Data: the shard format, the sharding tool, the demo dataset and the input pipelines."""
