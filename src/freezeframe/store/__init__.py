"""Store: the run directory (manifest, reference weights, Parquet step chunks)."""
