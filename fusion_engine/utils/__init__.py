"""Small helpers with no engine imports: crash-safe file writes (``io.py``), dtype names, images and heatmaps."""
