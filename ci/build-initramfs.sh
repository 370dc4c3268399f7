#!/bin/bash
# Builds the guest kernel and initramfs for vubd's QEMU guest tests from the
# Debian packages installed on this machine (see ci/install-deps.sh):
#
#   OUTDIR/vmlinux          uncompressed ELF kernel, booted by QEMU through its
#                           PVH entry point (`-kernel vmlinux`): under TCG it
#                           reaches userspace in about half the time of the
#                           bzImage, whose decompressor is slow when emulated.
#   OUTDIR/initramfs.cpio   busybox + virtio/ext4 modules + fio + e2fsprogs +
#                           util-linux blkdiscard, with an /init that runs
#                           /test.sh, prints "VUBD-EXIT code=N" and powers off.
#
# The test script is not part of the image: the runner appends a second small
# cpio archive holding /test.sh (the kernel unpacks concatenated archives in
# order), so tests change without a rebuild.
#
# Usage: ci/build-initramfs.sh [OUTDIR]      (default: ci/out next to this script)
# Env:   KERNEL_VERSION=6.1.0-56-amd64 to pick a kernel (default: newest in /boot)
#        FORCE=1 to rebuild even when the outputs are up to date.
#
# The initramfs is left uncompressed on purpose: measured under TCG, unpacking a
# ~40 MiB plain cpio is faster than decompressing gzip or zstd in the guest,
# and QEMU loads the file from the host page cache in milliseconds.
set -euo pipefail
export LC_ALL=C

SCRIPT=$(readlink -f "$0")
HERE=$(dirname "$SCRIPT")
OUT=${1:-$HERE/out}
mkdir -p "$OUT"
OUT=$(readlink -f "$OUT")

die() { echo "build-initramfs: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "missing tool '$1' (run ci/install-deps.sh)"; }
for t in cpio ldd modinfo xz gzip zstd flock; do need "$t"; done

# ---- choose the kernel ------------------------------------------------------
if [ -n "${KERNEL_VERSION:-}" ]; then
    KVER=$KERNEL_VERSION
else
    KVER=$( (ls /boot/vmlinuz-* 2>/dev/null || true) | sed 's|^/boot/vmlinuz-||' | sort -V | tail -n1)
fi
[ -n "$KVER" ] || die "no /boot/vmlinuz-* (install linux-image-amd64)"
VMLINUZ=/boot/vmlinuz-$KVER
[ -r "$VMLINUZ" ] || die "cannot read $VMLINUZ"
[ -d "/lib/modules/$KVER" ] || die "no /lib/modules/$KVER"

# ---- the pieces that go in ---------------------------------------------------
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] && [ -x "$BUSYBOX" ] || die "busybox not found (install busybox-static)"
ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is dynamically linked; install busybox-static"

# Real tools, kept at their own paths; guest scripts call them by full path
# because busybox sh prefers its own applets of the same name.
TOOLS=(/usr/bin/fio /usr/sbin/mkfs.ext4 /usr/sbin/mke2fs /usr/sbin/e2fsck
       /usr/sbin/blkdiscard /usr/sbin/dumpe2fs)
for t in "${TOOLS[@]}"; do [ -x "$t" ] || die "missing $t (install fio e2fsprogs util-linux)"; done

# Modules, in load order: virtio transport and block device, then what ext4
# needs (its `modinfo -F depends` plus crc32c, which ext4 and jbd2 request
# from the crypto API for metadata checksums at mount time).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
         crc16 mbcache jbd2 crc32c_generic ext4)

# Closure check: every module's dependencies must come earlier in the list,
# so a different kernel version fails here rather than in the guest.
declare -A MODFILE
for i in "${!MODULES[@]}"; do
    m=${MODULES[$i]}
    f=$(modinfo -k "$KVER" -n "$m" 2>/dev/null) || die "module $m not found for $KVER"
    if [ "$f" = "(builtin)" ] || [ -z "$f" ]; then MODFILE[$m]=builtin; continue; fi
    MODFILE[$m]=$f
    deps=$(modinfo -k "$KVER" -F depends "$m" 2>/dev/null | tr ',' ' ')
    for d in $deps; do
        found=0
        for j in $(seq 0 $((i - 1))); do [ "${MODULES[$j]//-/_}" = "${d//-/_}" ] && found=1; done
        [ $found = 1 ] || die "module $m depends on $d, which is not loaded before it"
    done
done

# Shared libraries of the dynamic tools, as ldd lists them (absolute paths).
mapfile -t LIBS < <(for t in "${TOOLS[@]}"; do ldd "$t"; done |
    awk '/=> \//{print $3} /^[[:space:]]*\/[^ ]+ \(/{print $1}' | sort -u)
[ ${#LIBS[@]} -gt 0 ] || die "ldd listed no libraries"

INPUTS=("$SCRIPT" "$VMLINUZ" "$BUSYBOX" "${TOOLS[@]}" "${LIBS[@]}" /etc/mke2fs.conf)
for m in "${MODULES[@]}"; do [ "${MODFILE[$m]}" = builtin ] || INPUTS+=("${MODFILE[$m]}"); done

KERNEL_OUT=$OUT/vmlinux
INITRD_OUT=$OUT/initramfs.cpio

exec 9>"$OUT/.lock"
flock 9

# ---- up to date? --------------------------------------------------------------
up_to_date() {
    local kernel=$KERNEL_OUT
    [ -e "$kernel" ] || kernel=$OUT/bzImage
    [ -e "$kernel" ] && [ -e "$INITRD_OUT" ] || return 1
    [ "$(cat "$OUT/kernel-version" 2>/dev/null)" = "$KVER" ] || return 1
    local f
    for f in "${INPUTS[@]}"; do
        [ -e "$f" ] || continue
        if [ "$f" -nt "$kernel" ] || [ "$f" -nt "$INITRD_OUT" ]; then return 1; fi
    done
    return 0
}

report() {
    local kernel=$KERNEL_OUT boot=pvh
    [ -e "$kernel" ] || { kernel=$OUT/bzImage; boot=bzimage; }
    echo "build-initramfs: kernel $KVER ($boot): $kernel ($(du -h --apparent-size "$kernel" | cut -f1))"
    echo "build-initramfs: initramfs: $INITRD_OUT ($(du -h --apparent-size "$INITRD_OUT" | cut -f1))"
}

if [ "${FORCE:-0}" != 1 ] && up_to_date; then
    echo "build-initramfs: up to date"
    report
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vubd-initramfs.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---- kernel: extract the ELF vmlinux from the bzImage ---------------------------
# A bzImage is a boot stub plus a compressed vmlinux. Look for each
# compression format's magic; at each candidate offset try to decompress and
# keep the first result that is an ELF file (the same approach as the kernel's
# scripts/extract-vmlinux, which Debian does not install).
is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; }

try_decompress() { # magic(grep -P bytes) tool...
    local magic=$1; shift
    local off
    for off in $(grep -obUaP "$magic" "$VMLINUZ" 2>/dev/null | cut -d: -f1 | head -n 8); do
        # Trailing bytes after the stream make the tools complain; what they
        # wrote before that is the kernel, so their exit status is ignored.
        tail -c +$((off + 1)) "$VMLINUZ" | "$@" >"$WORK/vmlinux" 2>/dev/null || true
        if is_elf "$WORK/vmlinux"; then return 0; fi
    done
    return 1
}

KERNEL_KIND=
if try_decompress '\xfd\x37\x7a\x58\x5a\x00' xz -dc --single-stream ||
   try_decompress '\x28\xb5\x2f\xfd' zstd -dc ||
   try_decompress '\x1f\x8b\x08' gzip -dc ||
   try_decompress '\x5d\x00\x00\x00' xz -dc --format=lzma ||
   try_decompress '\x02\x21\x4c\x18' lz4 -dc ||
   try_decompress 'BZh' bzip2 -dc; then
    # PVH boot needs the Xen PVH entry note (CONFIG_PVH); without it QEMU
    # cannot start an ELF kernel and we fall back to the bzImage.
    if grep -q '^CONFIG_PVH=y' "/boot/config-$KVER" 2>/dev/null; then
        KERNEL_KIND=pvh
    else
        echo "build-initramfs: $KVER lacks CONFIG_PVH; falling back to the bzImage" >&2
    fi
else
    echo "build-initramfs: could not extract vmlinux from $VMLINUZ; falling back to the bzImage" >&2
fi

# ---- initramfs ------------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,modules,root}
cp "$BUSYBOX" "$R/bin/busybox"
# Busybox applets as links in /bin, except names the real tools own.
for a in $("$BUSYBOX" --list); do
    case "$a" in
        busybox|fio|mkfs.ext4|mke2fs|e2fsck|fsck.ext4|blkdiscard|dumpe2fs) continue ;;
    esac
    ln -sf busybox "$R/bin/$a"
done
for t in "${TOOLS[@]}"; do cp -L "$t" "$R$t"; done
ln -sf e2fsck "$R/usr/sbin/fsck.ext4"
for l in "${LIBS[@]}"; do
    mkdir -p "$R$(dirname "$l")"
    cp -L "$l" "$R$l"
done
cp /etc/mke2fs.conf "$R/etc/mke2fs.conf"
ln -sf /proc/mounts "$R/etc/mtab"

MODLIST=
for m in "${MODULES[@]}"; do
    f=${MODFILE[$m]}
    [ "$f" = builtin ] && continue
    case "$f" in
        *.ko) cp "$f" "$R/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$f" >"$R/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$R/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$R/modules/$m.ko" ;;
        *) die "unknown module file type: $f" ;;
    esac
    MODLIST="$MODLIST $m"
done

cat >"$R/init" <<EOF
#!/bin/busybox sh
# vubd guest init: mount the pseudo file systems, load the drivers, run
# /test.sh (appended by the test runner as a second cpio archive), report its
# exit code on the console and power off, so QEMU exits by itself.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in$MODLIST; do
    insmod /modules/\$m.ko || echo "VUBD-INIT insmod \$m failed"
done
# virtio-blk probes asynchronously; give the disk a moment to appear.
i=0
while [ ! -e /dev/vda ] && [ \$i -lt 100 ]; do sleep 0.05; i=\$((i + 1)); done
if [ -e /test.sh ]; then
    sh /test.sh
    rc=\$?
else
    echo "VUBD-INIT no /test.sh"
    rc=127
fi
sync
# A newline first: the script's last output may lack one.
echo
echo "VUBD-EXIT code=\$rc"
poweroff -f
EOF
chmod 755 "$R/init"

(cd "$R" && find . | sort | cpio -o -H newc --quiet -R 0:0) >"$WORK/initramfs.cpio"

# ---- install atomically -----------------------------------------------------------
rm -f "$OUT/vmlinux" "$OUT/bzImage"
if [ "$KERNEL_KIND" = pvh ]; then
    mv "$WORK/vmlinux" "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$KERNEL_OUT"
else
    cp "$VMLINUZ" "$OUT/bzImage.tmp" && mv "$OUT/bzImage.tmp" "$OUT/bzImage"
fi
mv "$WORK/initramfs.cpio" "$OUT/initramfs.cpio.tmp" && mv "$OUT/initramfs.cpio.tmp" "$INITRD_OUT"
echo "$KVER" >"$OUT/kernel-version"
report
