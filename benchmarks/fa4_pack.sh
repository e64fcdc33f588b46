#!/usr/bin/env bash
# Build the FlashAttention-4 parts that benchmarks/fa4_device_setup.sh installs on the lent GPU
# machine (which has no network). Run here, from the repository root, with network:
#     bash benchmarks/fa4_pack.sh
# Downloads the cp312 manylinux wheels (flash-attn-4 4.0.0b19, nvidia-cutlass-dsl 4.5.3 + libs-cu13,
# quack-kernels 0.5.0, apache-tvm-ffi 0.1.15.post2, torch-c-dlpack-ext 0.1.5), installs them with
# `pip install --no-deps --target` into a build folder, drops __pycache__, packs the tree as one
# xz tarball and splits it into two parts: .fa4p1/ and .fa4p2/ (ignored by git), each with the
# manifest fa4parts.sha256. $FA4_BUILD (default /tmp/fa4build) keeps the wheels and the tarball between
# runs (FA4_REPACK=1 rebuilds the tarball).
set -euo pipefail
BUILD=${FA4_BUILD:-/tmp/fa4build}
ROOT=$PWD
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
   --platform manylinux2014_x86_64"
REQS="flash-attn-4==4.0.0b19 nvidia-cutlass-dsl==4.5.3 nvidia-cutlass-dsl-libs-cu13==4.5.3 quack-kernels==0.5.0
      apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5"
mkdir -p "$BUILD/wh"
python3 -m pip download -q $P -d "$BUILD/wh" $REQS
# the tarball is rebuilt whenever the requirement list changes (a stamp beside it records the list it was made from)
stamp="$(echo $REQS)"
if [ ! -f "$BUILD/fa4site.tar.xz" ] || [ "$(cat "$BUILD/fa4site.reqs" 2>/dev/null)" != "$stamp" ] || [ "${FA4_REPACK:-0}" = 1 ]; then
    rm -rf "$BUILD/site" "$BUILD/fa4site.tar.xz" "$BUILD/fa4site.reqs"
    python3 -m pip install -q --no-index --find-links "$BUILD/wh" --no-compile $P --target "$BUILD/site" $REQS
    find "$BUILD/site" -name __pycache__ -type d -prune -exec rm -rf {} +
    tar -C "$BUILD/site" -cf - . | xz -T2 -9 > "$BUILD/fa4site.tar.xz"
    echo "$stamp" > "$BUILD/fa4site.reqs"
fi
size=$(stat -c %s "$BUILD/fa4site.tar.xz")
rm -f "$BUILD"/fa4site.tar.xz.part-*
split -d -a 1 -b $(( (size + 1) / 2 )) "$BUILD/fa4site.tar.xz" "$BUILD/fa4site.tar.xz.part-"
(cd "$BUILD" && sha256sum fa4site.tar.xz.part-0 fa4site.tar.xz.part-1 fa4site.tar.xz > fa4parts.sha256)
for i in 0 1; do
    d="$ROOT/.fa4p$((i + 1))"
    rm -rf "$d" && mkdir -p "$d"
    cp "$BUILD/fa4site.tar.xz.part-$i" "$BUILD/fa4parts.sha256" "$d/"
done
mkdir -p "$ROOT/.git/info"
grep -qx '/.fa4p\*/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.fa4p*/' >> "$ROOT/.git/info/exclude"
du -sh "$ROOT"/.fa4p1 "$ROOT"/.fa4p2
