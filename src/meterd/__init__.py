"""meterd: a real-time metering sidecar for AI products."""

__version__ = "0.1.0"
