"""The build machinery of the daemon: realising derivations in a sandbox (spec/build-env.md).

Laid out like upstream's libstore/build: `worker` runs the goals of a BuildPaths request (the
select loop, build slots), `goal` holds the goal graph (goals, phases, results),
`derivation_goal` takes a goal from its outputs' validity through its inputs and build to the
registration of its outputs (rounds, check), `local_build` starts a builder here (platform
check first, then build user, build tree, chroot, child spec, spawn) and cleans up after it,
`slirp` runs the network of fixed-output builds, `personality` says which systems this
machine builds for, `substitution_goal` and `repair` fetch and replace store items; `sandbox`
builds the chroot, namespaces and build users, `seccomp` the builder's system call filter,
`environment` the builder's variables, `builtins` the daemon-side builders, `logs` the build
logs and `outputs` the checks of what a build produced.
"""
