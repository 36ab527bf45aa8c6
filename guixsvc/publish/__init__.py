"""The `guix publish` HTTP substitute server."""
