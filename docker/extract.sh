#!/bin/sh
# Entry point of the compose `extractor` service:
#
#   docker compose run --rm extractor --model /models/NAME --experts 0-7 --layers all
#
# runs `python -m extractor` with those arguments and, unless --out is given, adds
# --out $CADRE_STORES_DIR/NAME (NAME: the checkpoint directory's name), so the store
# lands on the volume the cadre service reads (CADRE_STORE=/stores/NAME).
set -eu

model=""
has_out=0
previous=""
for arg in "$@"; do
    case "$arg" in
        --out | --out=*) has_out=1 ;;
        --model=*) model="${arg#--model=}" ;;
    esac
    if [ "$previous" = "--model" ]; then
        model="$arg"
    fi
    previous="$arg"
done

if [ "$has_out" -eq 0 ] && [ -n "$model" ]; then
    name="$(basename "$model")"
    set -- "$@" --out "${CADRE_STORES_DIR:-/stores}/$name"
fi

exec "${PYTHON:-python}" -m extractor "$@"
