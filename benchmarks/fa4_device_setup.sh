#!/usr/bin/env bash
# Install FlashAttention-4 on the lent GPU machine (no network there): flash-attn-4 4.0.0b19,
# nvidia-cutlass-dsl 4.5.3 with nvidia-cutlass-dsl-libs-cu13 4.5.3, quack-kernels 0.5.0,
# apache-tvm-ffi 0.1.15.post2, torch-c-dlpack-ext 0.1.5 (cp312, manylinux_2_28_x86_64).
#
# The parts are built here (with network) by `bash benchmarks/fa4_pack.sh`: two folders .fa4p1/
# and .fa4p2/ (ignored by git), each under the device's carry limit next to the working tree, each
# holding one part of an xz tarball and the manifest `fa4parts.sha256` (sha256sum lines of every
# part and of the reassembled tarball). Run from the repository root on the device, once in each
# call that carries a part folder, the two calls back to back on the warm machine:
#
#   call 1 (carry [".fa4p1"]):  bash benchmarks/fa4_device_setup.sh          # stages; exit 3
#   call 2 (carry [".fa4p2"]):  bash benchmarks/fa4_device_setup.sh && <command using FA4>
#
# Each call copies the parts that arrived (.fa4p*/ in the cwd) into $FA4_STAGE (default
# /tmp/fa4stage; it survives between calls while the machine stays warm), checks them against the
# manifest and, once every part is there, reassembles and unpacks the tarball into $FA4_SITE
# (default /tmp/fa4site, its own folder: it is replaced on install). The tarball is the tree that
# `pip install --no-deps --target` made from those wheels (__pycache__ left out). pip --target
# does not process .pth files, so PYTHONPATH must also name nvidia_cutlass_dsl/python_packages:
# the line printed at the end.
# Exit status: 0 installed and importable; 3 waiting for parts; 1 failed. Idempotent: staged parts
# are kept, an installed site is reused (FA4_REINSTALL=1 unpacks again).
set -u
STAGE=${FA4_STAGE:-/tmp/fa4stage}
SITE=${FA4_SITE:-/tmp/fa4site}  # its own folder: the lead's other wheels (SageAttention, diffusers) stay in /tmp/site
MANIFEST=fa4parts.sha256

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

# complete: 0 when every part the manifest lists is staged with its sha256
complete() {
    local ok=0 sha name
    [ -f "$STAGE/$MANIFEST" ] || { echo "fa4 setup: no $MANIFEST staged (carry a part folder)"; return 1; }
    while read -r sha name; do
        case "$name" in *.part-*) ;; *) continue ;; esac
        if [ ! -f "$STAGE/$name" ]; then
            echo "fa4 setup: waiting for $name"; ok=1
        elif [ "$(sha256sum "$STAGE/$name" | cut -d' ' -f1)" != "$sha" ]; then
            echo "fa4 setup: $name has the wrong sha256, removed (carry it again)"; rm -f "$STAGE/$name"; ok=1
        fi
    done < "$STAGE/$MANIFEST"
    return $ok
}

# unpack DEST: reassemble the parts in manifest order, check the tarball's sha256, extract into DEST
unpack() {
    local tarball="$STAGE/reassembled.tar.xz" want
    want=$(awk '$2 == "fa4site.tar.xz" {print $1}' "$STAGE/$MANIFEST")
    awk '$2 ~ /\.part-/ {print $2}' "$STAGE/$MANIFEST" | sed "s|^|$STAGE/|" | xargs cat > "$tarball" || return 1
    [ "$(sha256sum "$tarball" | cut -d' ' -f1)" = "$want" ] || { echo "fa4 setup: reassembled tarball sha256 mismatch"; return 1; }
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="tar")' \
        "$tarball" "$1" || return 1
    rm -f "$tarball"
}

if [ -f "$SITE/.fa4_installed" ] && [ "${FA4_REINSTALL:-0}" != 1 ]; then
    echo "fa4 setup: site already installed in $SITE"
else
    complete || { echo "fa4 setup: staged so far: $(ls "$STAGE" | tr '\n' ' ')"; exit 3; }
    rm -rf "$SITE" && mkdir -p "$SITE" || exit 1
    unpack "$SITE" || exit 1
    touch "$SITE/.fa4_installed"
    echo "fa4 setup: unpacked into $SITE ($(du -sh "$SITE" | cut -f1))"
fi

PP="$SITE:$SITE/nvidia_cutlass_dsl/python_packages"
echo "export PYTHONPATH=$PP:\$PWD\${PYTHONPATH:+:\$PYTHONPATH}"
PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}" python3 - <<'EOF'
import importlib.metadata as md
import torch
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if cuda else None,
      "cc", torch.cuda.get_device_capability() if cuda else None)
for name in ("cuda-bindings", "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13",
             "quack-kernels", "apache-tvm-ffi", "torch-c-dlpack-ext"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "-")
import cutlass
import cutlass.cute  # noqa: F401
from cutlass.base_dsl.version_info import CUDA_VERSION
print("cutlass", cutlass.__version__, cutlass.__file__, "dsl cuda", CUDA_VERSION)
from flash_attn.cute import flash_attn_func  # noqa: F401
from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
print("fa4 import check: OK")
EOF
[ $? = 0 ] || { echo "fa4 setup: import check FAILED"; exit 1; }
[ "${FA4_SMOKE:-0}" = 1 ] || exit 0
# FA4_SMOKE=1: one small block-sparse forward (full blocks from a random BlockPlan, through
# vidattn.bench.fa4_layout) against dense SDPA with the same block mask, on the GPU.
PYTHONPATH="$PP:$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 - <<'EOF2'
import time
import torch
from flash_attn.cute import flash_attn_func
from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
from vidattn.bench.fa4_layout import fa4_block_classes, plan_to_fa4_block_sparse
from vidattn.plan import FULL, plan_from_block_mask
B, S, H, D, bs = 1, 1000, 2, 128, 128
nb = -(-S // bs)
g = torch.Generator(device="cuda").manual_seed(0)
cls = torch.where(torch.rand(1, H, nb, nb, device="cuda", generator=g) < 0.4, FULL, 0).to(torch.int8)
cls[..., 0] = FULL  # every query block sees key block 0
plan = plan_from_block_mask(cls, seq_len=S, block_q=bs, block_k=bs, rule=None, token_density=0.4)
t = plan_to_fa4_block_sparse(plan)
bst = BlockSparseTensorsTorch(mask_block_cnt=t.mask_block_cnt, mask_block_idx=t.mask_block_idx,
                              full_block_cnt=t.full_block_cnt, full_block_idx=t.full_block_idx, block_size=t.block_size)
q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
t0 = time.time()
out = flash_attn_func(q, k, v, block_sparse_tensors=bst)
out = out[0] if isinstance(out, tuple) else out
torch.cuda.synchronize()
print("fa4 smoke: first call (compile) %.1f s" % (time.time() - t0))
allow = (fa4_block_classes(t, nb) > 0).repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :S, :S]
ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).double() for x in (q, k, v)),
                                                       attn_mask=allow).transpose(1, 2)
err = float((out.double() - ref).norm() / ref.norm())
print("fa4 smoke: rel_l2 vs masked SDPA (float64) = %.2e %s" % (err, "OK" if err < 2e-2 else "FAIL"))
raise SystemExit(0 if err < 2e-2 else 1)
EOF2
