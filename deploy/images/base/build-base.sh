#!/bin/sh
# The Python base image of every nbreduce image, for machines that reach no container registry: it stands
# in for python:3.11-slim-bookworm, the default PYTHON_IMAGE of the Dockerfiles, with the same layout.
#
#   deploy/images/base/build-base.sh IMAGE PYTHON [CACHE_DIR]
#
# * Debian 12 (bookworm) from Debian's archive: `debootstrap --variant=minbase`, the libraries CPython's
#   extension modules link against, ca-certificates, the day's security updates; no documentation, man
#   pages, translations or apt lists (as Debian's slim images).
# * CPython in /usr/local, as in the python:3.11 images: the interpreter PYTHON (the one the project's
#   .venv is made from, `make setup`). Not Debian's python3.11: bookworm has 3.11.2, and requirements.lock
#   needs 3.11.5 or later (soupsieve 4.1.3); python.org and GitHub (source, standalone builds) are not
#   reachable from the CI machines. So the images run the very interpreter the test suite runs on.
#   Its site-packages, test suite, IDLE and Tk are left out.
#
# The Makefile names IMAGE after a hash of this file and the interpreter's version, so a changed recipe
# makes a new base and an unchanged one is reused: from podman's image store, else from
# CACHE_DIR/<IMAGE>.tar (a `podman save` of it, kept across emptied stores). Needs root, debootstrap and
# podman; DEBIAN_MIRROR and DEBIAN_SECURITY_MIRROR override the mirrors.
set -eu

IMAGE=${1:?usage: $0 IMAGE PYTHON [CACHE_DIR]}
PYTHON=${2:?usage: $0 IMAGE PYTHON [CACHE_DIR]}
CACHE_DIR=${3:-}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ARCHIVE=""
[ -n "$CACHE_DIR" ] && ARCHIVE="$CACHE_DIR/$(printf '%s' "$IMAGE" | tr '/:' '__').tar"

if podman image exists "$IMAGE"; then
    echo "base image $IMAGE: present"
    exit 0
fi
if [ -n "$ARCHIVE" ] && [ -f "$ARCHIVE" ] && podman load --quiet --input "$ARCHIVE" >/dev/null \
        && podman image exists "$IMAGE"; then
    echo "base image $IMAGE: loaded from $ARCHIVE"
    exit 0
fi

PREFIX=$("$PYTHON" -c 'import sys; print(sys.base_prefix)')
VERSION=$("$PYTHON" -c 'import platform; print(platform.python_version())')
case "$VERSION" in
    3.11.*) ;;
    *) echo "base image: $PYTHON is Python $VERSION, the images need 3.11" >&2; exit 1 ;;
esac
[ -x "$PREFIX/bin/python3.11" ] || { echo "base image: no $PREFIX/bin/python3.11" >&2; exit 1; }

ROOT=$(mktemp -d /var/tmp/nbreduce-base.XXXXXX)
LOG="$ROOT.log"
cleanup() {
    umount "$ROOT/proc" 2>/dev/null || true
    rm -rf "$ROOT" "$LOG"
}
trap cleanup EXIT INT TERM
fail() {
    tail -20 "$LOG" >&2 || true
    echo "base image: $1 failed" >&2
    exit 1
}

echo "base image $IMAGE: debootstrap bookworm from $MIRROR, CPython $VERSION from $PREFIX"
# the shared libraries of CPython's extension modules (_ssl, _sqlite3, _ctypes, readline, _curses, _uuid, ...)
debootstrap --variant=minbase \
    --include=ca-certificates,libssl3,libsqlite3-0,libffi8,libbz2-1.0,liblzma5,zlib1g,libreadline8,libncursesw6,libuuid1,libexpat1,libgdbm6,libnsl2,libtirpc3 \
    bookworm "$ROOT" "$MIRROR" >"$LOG" 2>&1 || fail debootstrap

cat >"$ROOT/etc/dpkg/dpkg.cfg.d/nbreduce-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
EOF
mount -t proc proc "$ROOT/proc"
chroot "$ROOT" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade' >"$LOG" 2>&1 \
    || fail "apt-get upgrade (security updates)"
umount "$ROOT/proc"

# CPython, as the python images install it: /usr/local/{bin,lib,include}
tar -C "$PREFIX" -c \
    --exclude='lib/python3.11/site-packages/*' --exclude='lib/python3.11/test' \
    --exclude='lib/python3.11/idlelib' --exclude='lib/python3.11/tkinter' --exclude='lib/python3.11/turtledemo' \
    --exclude='lib/python3.11/lib-dynload/_tkinter*' --exclude='lib/python3.11/config-3.11-*' \
    bin/python3.11 lib/libpython3.11.so.1.0 lib/libpython3.so lib/python3.11 include/python3.11 \
    | tar -C "$ROOT/usr/local" -x
ln -s python3.11 "$ROOT/usr/local/bin/python3"
ln -s python3.11 "$ROOT/usr/local/bin/python"
ln -s libpython3.11.so.1.0 "$ROOT/usr/local/lib/libpython3.11.so"
chroot "$ROOT" ldconfig
chroot "$ROOT" /usr/local/bin/python3.11 -c \
    'import ssl, sqlite3, ctypes, lzma, bz2, zlib, readline, uuid, venv, ensurepip, sys; assert sys.prefix == "/usr/local"' \
    >"$LOG" 2>&1 || fail "CPython check"

rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
    "$ROOT"/var/log/* "$ROOT"/tmp/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/*
find "$ROOT/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +

tar --numeric-owner -C "$ROOT" -c . | podman import --quiet \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV PYTHON_VERSION=$VERSION" \
    --change 'CMD ["python3"]' \
    --change "LABEL org.opencontainers.image.title=\"Debian 12 (bookworm) minbase with CPython $VERSION\"" \
    --change "LABEL org.opencontainers.image.base.name=\"debootstrap bookworm $MIRROR\"" \
    - "$IMAGE" >/dev/null
if [ -n "$ARCHIVE" ]; then
    mkdir -p "$CACHE_DIR"
    podman save --quiet --output "$ARCHIVE.tmp" "$IMAGE" && mv "$ARCHIVE.tmp" "$ARCHIVE"
fi
echo "base image $IMAGE: built, $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
