#!/bin/sh
# Run a Guile script with an upstream Guix tree on the load path: GUIX_GUILE_RUN names a wrapper
# doing that (on the development machine, /work/oracles/bin/guile-run), else `guile` is used as
# it is (GUILE_LOAD_PATH / GUILE_LOAD_COMPILED_PATH must then point at the tree).
exec "${GUIX_GUILE_RUN:-guile}" "$@"
