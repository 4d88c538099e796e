"""Offline preparation: turn image-report datasets into WebDataset tar shards (see ``unimlip-shard --help``)."""
