"""Prefect flows over the worldgen engine: batch rendering from manifests and timing reports."""
