"""The HTTP server: request/response schema, the serving state (snapshots, strict mode), the deletion worker and
the FastAPI app that wires them together."""
