"""The build machinery of the daemon: realising derivations in a sandbox (spec/build-env.md).

`scheduler` runs goals (BuildPaths), `sandbox` builds the chroot, namespaces and build users,
`environment` the builder's variables, `builtins` the daemon-side builders, `logs` the build
logs and `outputs` the checks and registration of what a build produced.
"""
