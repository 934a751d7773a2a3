#!/bin/sh
# A command of `python -m service` runs as such, anything else as given; exec, so it gets the signals.
set -e
case "${1:-}" in
    serve | execute | rail-simulator | migrate | seed-demo | run | -h | --help)
        exec python -m service "$@"
        ;;
esac
exec "$@"
