"""The guix-daemon worker protocol as sans-I/O code, plus a blocking client."""
