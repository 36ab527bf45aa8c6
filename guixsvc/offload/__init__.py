"""Offloading builds to other machines over OpenSSH, compatible with `guix offload`.

`machines` reads `/etc/guix/machines.scm`, `transport` reaches a machine's daemon through
`ssh -L`, `choose` picks a machine (slots, speed, load), `hook` is the daemon's build hook and
`cli` the `guixsvc offload test|status` command.
"""
