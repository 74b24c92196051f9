"""Prefect flows over the worldgen engine: batch rendering from manifests and timing reports."""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.states import State

# Set before Prefect is imported: no usage analytics from a batch renderer, and room for the ~20 s cold start
# of the ephemeral API server that Prefect runs when no PREFECT_API_URL is configured.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def exit_status(flow_name: str, state: State) -> int:
    """A command line's exit status for a flow run's final state: 0 when it completed, else 1 with the
    state's message on stderr."""
    if state.is_completed():
        return 0
    print(f"{flow_name} failed: {state.message}", file=sys.stderr)
    return 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server this process starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
