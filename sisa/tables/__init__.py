"""Tables as users bring them: reading CSV/Parquet/NPZ, validating them against the config, bundled datasets."""
