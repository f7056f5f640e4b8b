"""The embedded demo: datasets that ship with the code (digit collages, photographs, synthetic
shards, an Open-Images-like raw tree) and the demo backbone's pretraining."""
