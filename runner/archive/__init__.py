"""Step 4, the archive: versions published read-only in one documented layout, and pruning."""
