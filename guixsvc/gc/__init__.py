"""The `guix gc` command."""
