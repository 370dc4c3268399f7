#!/bin/bash
# Sets up and runs vubd on a demo image, and prints how to attach a VM.
# Usage: ci/demo.sh [IMAGE] [SOCKET]   (defaults: /tmp/vubd-demo.img, /tmp/vubd-demo.sock)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-/tmp/vubd-demo.img}
SOCKET=${2:-/tmp/vubd-demo.sock}
QMP=${SOCKET%.sock}.qmp

ci/install-deps.sh
cargo build --release -p vhost-glue
[ -e "$IMAGE" ] || qemu-img create -f raw "$IMAGE" 1G >/dev/null

cat <<MSG
vubd is serving $IMAGE on $SOCKET (management: $QMP). Attach a QEMU guest with:

  qemu-system-x86_64 -accel tcg -m 512M \\
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
    -chardev socket,id=c0,path=$SOCKET,reconnect=1 \\
    -device vhost-user-blk-pci,chardev=c0,num-queues=2 ...

or with libblkio (driver virtio-blk-vhost-user, path=$SOCKET; libblkio cannot
seal its memory, so this demo passes --allow-unsealed-memory). Ctrl-C stops vubd.
MSG
exec target/release/vubd --socket "$SOCKET" --image "$IMAGE" --queues 2 --qmp "$QMP" --allow-unsealed-memory
