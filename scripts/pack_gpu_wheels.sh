#!/usr/bin/env bash
# What the lent GPU machine lacks, into .whl/ (gitignored), as small as it packs: the tracked tree
# plus what a device call carries must fit in 64 MiB, and transformers' wheel alone is 13.5 MB
# (zip) where its files are 3.8 MB as one .tar.xz.
#
#   bash scripts/pack_gpu_wheels.sh      # here, where pip reaches PyPI; then carry [".whl/base"]
#
# Writes .whl/base/transformers-5.24.0.tar.xz (the wheel's files, dist-info included: a pure-Python
# wheel installs by unpacking) and the server's packages the image lacks as wheels (fastapi,
# uvicorn, pydantic, outlines-core): 9.4 MB, so an A/B tree in .ab/ fits beside it. scripts/gpu_h200.sh
# unpacks and installs both into /tmp/site. For Ray (docs/ray.md) scripts/fetch_ray_wheels.sh adds
# .whl/ray/; a Ray call carries [".whl"] (62.7 MB with the tracked tree, of the 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
TRANSFORMERS=5.24.0
SERVER=(fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 opentelemetry-api==1.45.2
        outlines-core==0.2.14)
BASE=.whl/base
mkdir -p "$BASE"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$@"
}
if [ ! -f "$BASE/transformers-$TRANSFORMERS.tar.xz" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    download "$work" "transformers==$TRANSFORMERS"
    mkdir "$work/tree" && unzip -q "$work"/transformers-*.whl -d "$work/tree"
    tar -C "$work/tree" -cf - . | xz -9 -T0 > "$BASE/transformers-$TRANSFORMERS.tar.xz.partial"
    mv "$BASE/transformers-$TRANSFORMERS.tar.xz.partial" "$BASE/transformers-$TRANSFORMERS.tar.xz"
fi
rm -f .whl/transformers-*.whl "$BASE"/transformers-*.whl  # the packed files replace the wheel
download "$BASE" "${SERVER[@]}"
du -cb "$BASE"/* | tail -1
echo "carried with the repository: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes tracked + the above (limit 64 MiB)"
