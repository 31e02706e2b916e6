"""The data line: read sources, train a tokenizer, write token shards, record a DatasetVersion."""
