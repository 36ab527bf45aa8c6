"""The guix-daemon server: listening, per-connection sessions, the local store."""
