"""Data: the HDF5 shard format, converters, statistics, readers and the batch scheduler."""
