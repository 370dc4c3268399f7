#!/bin/bash
# Installs every system package vubd's build, tests and benchmarks need on Debian 12.
# iproute2 (ip netns, tc) and procps (sysctl) serve the migration tests, which need
# root and the veth module; netem (sch_netem) is used where the kernel has it, nftables
# drops packets.
# qemu-system-x86 and qemu-utils must come in one command, from bookworm: a newer
# qemu-utils (backports) conflicts with bookworm's qemu-system-common.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
$SUDO apt-get install -y -q --allow-downgrades \
    qemu-system-x86 qemu-utils/bookworm \
    linux-image-amd64 busybox-static fio e2fsprogs util-linux \
    libnbd-bin nbdkit cpio zstd python3-pip strace iproute2 procps nftables >/dev/null
