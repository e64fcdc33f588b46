#!/usr/bin/env bash
# Install FlashAttention-4 (flash-attn-4 4.0.0b19 + nvidia-cutlass-dsl 4.5.3 [libs-cu13] +
# quack-kernels 0.5.0 + apache-tvm-ffi 0.1.15.post2 + torch-c-dlpack-ext 0.1.5) on the lent GPU
# machine, which has no network. Run from the repository root on the device, once per call that
# carries a part folder (.fa4p1, .fa4p2):
#
#   call 1 (carry [".fa4p1"]):  bash benchmarks/fa4_device_setup.sh
#   call 2 (carry [".fa4p2"]):  bash benchmarks/fa4_device_setup.sh && <command using FA4>
#
# Each call copies the parts that arrived into $FA4_STAGE (default /tmp/fa4stage; it survives
# between calls while the machine stays warm), checks them against the sha256 list below, and,
# once all are there, reassembles fa4site.tar.xz and unpacks it into $FA4_SITE (default
# /tmp/site). The tarball is the tree `pip install --no-index --no-deps --target` made from those
# wheels (cp312, manylinux_2_28_x86_64; __pycache__ left out). pip --target does not process
# .pth files, so PYTHONPATH must also name nvidia_cutlass_dsl/python_packages (the line printed at
# the end). Exit status: 0 installed and importable; 3 still waiting for parts; 1 failed.
# Idempotent: parts already staged are kept, an installed site is reused (FA4_REINSTALL=1 redoes).
set -u
STAGE=${FA4_STAGE:-/tmp/fa4stage}
SITE=${FA4_SITE:-/tmp/site}
TARBALL_SHA=64a04f4bbb5f59b7c495872899cb84ee92aa64d145876f52350afbc33a2da07e
PARTS="74df850d8770e4fa885aaa9c04d2032c17c8ac1adbe80026d78f27a0348cd830 fa4site.tar.xz.part-0
8f867262bd34e694727bc424984827f5b88df3034bac501d1ec6a22de281805a fa4site.tar.xz.part-1"

mkdir -p "$STAGE" || exit 1
for d in .fa4p*; do
    [ -d "$d" ] || continue
    for f in "$d"/*; do
        [ -f "$f" ] || continue
        b=$(basename "$f")
        if [ ! -f "$STAGE/$b" ] || ! cmp -s "$f" "$STAGE/$b"; then
            cp "$f" "$STAGE/$b.tmp" && mv "$STAGE/$b.tmp" "$STAGE/$b" && echo "fa4 setup: staged $b from $d"
        fi
    done
done

missing=0
[ -f "$SITE/.fa4_installed" ] && [ "${FA4_REINSTALL:-0}" != 1 ] || while read -r sha name; do
    if [ ! -f "$STAGE/$name" ]; then
        echo "fa4 setup: waiting for $name"; missing=1
    elif [ "$(sha256sum "$STAGE/$name" | cut -d' ' -f1)" != "$sha" ]; then
        echo "fa4 setup: $name has the wrong sha256, removed (carry it again)"; rm -f "$STAGE/$name"; missing=1
    fi
done <<< "$PARTS"

PP="$SITE:$SITE/nvidia_cutlass_dsl/python_packages"
if [ -f "$SITE/.fa4_installed" ] && [ "${FA4_REINSTALL:-0}" != 1 ]; then
    echo "fa4 setup: already installed in $SITE"
elif [ "$missing" = 1 ]; then
    echo "fa4 setup: parts staged so far: $(cd "$STAGE" && ls | tr '\n' ' ')"
    exit 3
else
    tarball="$STAGE/fa4site.tar.xz"
    # part names sort in order (part-0, part-1)
    cut -d' ' -f2 <<< "$PARTS" | sed "s|^|$STAGE/|" | xargs cat > "$tarball" || exit 1
    [ "$(sha256sum "$tarball" | cut -d' ' -f1)" = "$TARBALL_SHA" ] || { echo "fa4 setup: reassembled tarball sha256 mismatch"; exit 1; }
    rm -rf "$SITE" && mkdir -p "$SITE" || exit 1
    python3 - "$tarball" "$SITE" <<'EOF' || exit 1
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as t:
    t.extractall(sys.argv[2], filter="tar")
EOF
    rm -f "$tarball"
    touch "$SITE/.fa4_installed"
    echo "fa4 setup: unpacked into $SITE ($(du -sh "$SITE" | cut -f1))"
fi

echo "export PYTHONPATH=$PP:\$PWD\${PYTHONPATH:+:\$PYTHONPATH}"
PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}" python3 - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "cc", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
for name in ("cuda-bindings", "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13",
             "quack-kernels", "apache-tvm-ffi", "torch-c-dlpack-ext"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not found")
import cutlass
import cutlass.cute  # noqa: F401
from cutlass.base_dsl.version_info import CUDA_VERSION
print("cutlass", cutlass.__version__, cutlass.__file__, "dsl cuda", CUDA_VERSION)
from flash_attn.cute import flash_attn_func  # noqa: F401
from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
print("fa4 import check: OK")
EOF
