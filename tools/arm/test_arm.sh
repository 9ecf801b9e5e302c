#!/usr/bin/env bash
# make test-arm: the tests on an emulated aarch64 board (docs/arm.md).
# A Debian bookworm arm64 root filesystem under qemu-user-static, with the torch a Raspberry Pi
# runs (the CPU wheels), built once and cached outside the repository; each run copies the
# current working tree in, builds the native kernels (GRADFILTER_REQUIRE_NATIVE=1) and runs
# ARM_TESTS once per emulated core in ARM_CPUS. Needs root; installs what it needs with apt-get.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${GRADFILTER_ARM_CACHE:-$HOME/.cache/gradfilter/arm64}
ARM_CPUS=${ARM_CPUS:-cortex-a72 cortex-a76}
# the op, native, lean, blocks, surgery and training tests; linear and optim: the classifier and
# parameter-flush kernels, so that every native kernel runs
ARM_TESTS=${ARM_TESTS:-tests/test_ops_spec.py tests/test_ops_behaviour.py tests/test_native.py \
tests/test_lean.py tests/test_blocks.py tests/test_surgery.py tests/test_train.py \
tests/test_linear.py tests/test_optim.py}
TORCH_PINS="torch==2.9.1 torchvision==0.24.1"  # aarch64 CPU wheels (OpenBLAS), ARMv8.0-safe
MIRROR=http://deb.debian.org/debian
FS=$CACHE/rootfs
SRC=/work/gradfilter  # the working tree's copy, inside the root filesystem
VENV=/opt/venv

die() { echo "test-arm: $*" >&2; exit 1; }
step() { echo "== test-arm: $* ($(date -u +%H:%M:%S))"; }
[ "$(id -u)" = 0 ] || die "needs root (mounts, chroot, apt-get)"

MOUNTS=()  # unmounted in reverse order after each step and on any exit, Ctrl-C included
BINFMT_MOUNTED=''
cleanup() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" \
            || echo "test-arm: could not unmount ${MOUNTS[i]}" >&2
    done
    MOUNTS=()
}
trap 'cleanup; [ -z "$BINFMT_MOUNTED" ] || umount "$BINFMT_MOUNTED"' EXIT
trap 'exit 130' INT TERM
mnt() { mount "$@"; MOUNTS+=("${@: -1}"); }

stale_mounts() {  # a killed run (SIGKILL) leaves its mounts: remove them, deepest first
    local m
    for m in $(awk -v fs="$FS/" 'index($5, fs) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m"
    done
}

host_tools() {
    command -v qemu-aarch64-static >/dev/null && command -v mmdebstrap >/dev/null && return
    step "installing qemu-user-static and mmdebstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static mmdebstrap \
        >/dev/null
}

binfmt() {  # the kernel runs arm64 binaries through qemu-aarch64-static
    local dir=/proc/sys/fs/binfmt_misc
    if ! mountpoint -q "$dir"; then
        mount -t binfmt_misc binfmt_misc "$dir" || die "cannot mount binfmt_misc on $dir"
        BINFMT_MOUNTED=$dir
    fi
    if [ ! -e "$dir/qemu-aarch64" ]; then
        # Debian's entry; flag F opens the interpreter now, so it needn't exist in the chroot
        local conf
        conf=$(grep -hv '^#' /usr/lib/binfmt.d/qemu-aarch64.conf) \
            || die "no /usr/lib/binfmt.d/qemu-aarch64.conf (qemu-user-static)"
        echo "$conf" >"$dir/register"
    fi
    echo 1 >"$dir/qemu-aarch64"  # enable, in case it was registered but disabled
}

cpuinfo() {  # an ARM-looking /proc/cpuinfo: qemu-user shows the host's x86 one, torch crashes
    local part features n
    case "$1" in
        cortex-a72) part=0xd08 features="fp asimd evtstrm crc32 cpuid" ;;
        cortex-a76) part=0xd0b features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics \
fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
        *) die "no /proc/cpuinfo template for QEMU_CPU=$1 (cortex-a72, cortex-a76)" ;;
    esac
    for ((n = 0; n < $(nproc); n++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\n' "$n" "$features"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\n'
        printf 'CPU part\t: %s\nCPU revision\t: 1\n\n' "$part"
    done
}

mount_fs() {  # /proc, /sys, /dev and the ARM /proc/cpuinfo of QEMU_CPU=$1
    cpuinfo "$1" >"$CACHE/cpuinfo"
    mnt -t proc proc "$FS/proc"
    mnt --bind "$CACHE/cpuinfo" "$FS/proc/cpuinfo"
    mnt -t sysfs -o ro sysfs "$FS/sys"
    mnt --bind /dev "$FS/dev"
    mount --make-private "$FS/dev"  # the /dev/shm below must not show up on the host's /dev
    mnt -t tmpfs tmpfs "$FS/dev/shm"
}

in_fs() {  # run a command in the root filesystem on emulated core $1
    local cpu=$1
    shift
    chroot "$FS" /usr/bin/env -i HOME=/root PATH="$VENV/bin:/usr/bin:/bin" LANG=C.UTF-8 \
        QEMU_CPU="$cpu" PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
        TORCH_EXTENSIONS_DIR="/root/.cache/torch_extensions/$cpu" \
        /bin/bash -euo pipefail -c "$*"
}

host_files() {  # name resolution and the host's CA certificates (pip goes through them)
    cp -L /etc/resolv.conf "$FS/etc/resolv.conf"
    cp -L /etc/ssl/certs/ca-certificates.crt "$FS/etc/ssl/certs/ca-certificates.crt"
}

rootfs() {  # Debian bookworm arm64 with python, g++ and the CPU torch (once; cached)
    [ -e "$FS/.gradfilter-ready" ] && return
    step "building the arm64 root filesystem in $FS"
    rm -rf "$FS"
    mkdir -p "$CACHE"
    mmdebstrap --quiet --arch=arm64 --variant=apt \
        --include=python3,python3-venv,python3-dev,g++,ca-certificates \
        bookworm "$FS" "$MIRROR" || die "mmdebstrap failed"
    host_files
    step "installing $TORCH_PINS"
    mount_fs cortex-a76
    in_fs cortex-a76 "python3 -m venv $VENV && pip install -q $TORCH_PINS" \
        || die "could not install $TORCH_PINS from PyPI"
    cleanup
    touch "$FS/.gradfilter-ready"
}

sync_tree() {  # the working tree as it is now (tracked and untracked files, not ignored ones)
    step "copying the working tree"
    rm -rf "$FS$SRC"
    mkdir -p "$FS$SRC"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$FS$SRC" -xf -
}

install_project() {  # pip install -e . must keep the preinstalled CPU torch
    local stamp=$FS/opt/venv/.gradfilter-pyproject
    cmp -s "$ROOT/pyproject.toml" "$stamp" && return
    step "pip install -e . (the preinstalled torch must stay)"
    in_fs cortex-a76 "cd $SRC
        before=\$(python -c 'import torch; print(torch.__version__)')
        pip install -q -e . && pip install -q pytest hypothesis timm $TORCH_PINS
        after=\$(python -c 'import torch; print(torch.__version__)')
        echo \"torch before: \$before, after: \$after\"
        [ \"\$before\" = \"\$after\" ]" || die "pip install -e . failed or replaced torch"
    cp "$ROOT/pyproject.toml" "$stamp"
}

run_cpu() {  # build the native kernels and run the tests on emulated core $1
    local cpu=$1 log=$CACHE/pytest-$1.log
    mount_fs "$cpu"
    step "$cpu: building the native kernels"
    in_fs "$cpu" "cd $SRC && GRADFILTER_NATIVE=1 python -c \
        'from gradfilter import native; assert native.available(); print(\"native kernels: ok\")'" \
        || die "$cpu: the native kernels did not build"
    step "$cpu: pytest $ARM_TESTS"  # -q from pyproject.toml (a second -q drops the counts line)
    local rc=0
    in_fs "$cpu" "cd $SRC && GRADFILTER_REQUIRE_NATIVE=1 python -m pytest -p no:cacheprovider \
        --junitxml=/root/pytest-$cpu.xml $ARM_TESTS" 2>&1 | tee "$log" || rc=$?
    cleanup
    SUMMARY+=("$cpu: $(tail -n 1 "$log") (exit $rc)")
    [ "$rc" = 0 ] || FAILED=1
}

main() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/lock"  # one run at a time: they share the root filesystem
    flock -n 9 || { echo "test-arm: waiting for another run to finish"; flock 9; }
    stale_mounts
    host_tools
    binfmt
    rootfs
    host_files
    sync_tree
    mount_fs cortex-a76
    install_project
    in_fs cortex-a76 "python -c 'import torch; print(\"torch\", torch.__version__, \
    \"cuda\", torch.version.cuda)'"
    cleanup
    SUMMARY=()
    FAILED=0
    for cpu in $ARM_CPUS; do run_cpu "$cpu"; done
    step "summary"
    printf '  %s\n' "${SUMMARY[@]}"
    exit "$FAILED"
}

main "$@"; exit $?  # one line: bash has read all of it before running (edits mid-run are safe)
