"""Prefect flows over the worldgen engine: batch rendering from manifests and timing reports."""

import os

# Set before Prefect is imported: no usage analytics from a batch renderer, and room for the ~20 s cold start
# of the ephemeral API server that Prefect runs when no PREFECT_API_URL is configured.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
