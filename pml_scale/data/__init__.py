"""Data: the shard format and the sharding tool (``shards``), and the input pipelines that read
shards into batches (``input``)."""
