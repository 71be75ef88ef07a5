#!/usr/bin/env bash
# Builds the local base image localhost/rtcbus-base:bookworm from Debian packages, for machines
# that reach a Debian mirror but no image registry (no `FROM python:...`). deploy/image/build.sh
# passes it to deploy/Dockerfile as BASE. Elsewhere the Dockerfile's default base is used and
# this script is not needed.
#
#   deploy/image/base.sh            # skips at once if the image is already in podman's storage
#   REBUILD=1 deploy/image/base.sh  # debootstrap again, ignoring both caches
#
# Two caches: the image in podman's storage, and the root filesystem as a tarball in
# ${XDG_CACHE_HOME:-~/.cache}/rtcbus/, so that a fresh podman storage imports in seconds
# instead of running debootstrap (about 40 s) again.
#
# Environment: BASE_IMAGE (default localhost/rtcbus-base:bookworm), DEBIAN_SUITE (bookworm),
# DEBIAN_MIRROR (default: the mirror apt uses for that suite, from /etc/apt/sources.list.d/*.sources
# or *.list, or /etc/apt/sources.list). Needs root (debootstrap), podman and debootstrap.
set -euo pipefail

suite="${DEBIAN_SUITE:-bookworm}"
image="${BASE_IMAGE:-localhost/rtcbus-base:$suite}"
# python3-venv for the builder stage's venv; ca-certificates for TLS to Kafka and registries.
packages="python3,python3-venv,ca-certificates"
cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/rtcbus"
# What goes into the root filesystem; its hash names the cached tarball, so a changed
# recipe never imports a stale one. Bump the last word when the trimming below changes.
recipe="$suite minbase $packages trim-1"
recipe_hash=$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
tarball="$cache_dir/rtcbus-base-$suite-$recipe_hash.tar"

say() { echo "base.sh: $*" >&2; }

if ! command -v podman >/dev/null; then
    say "FAILED: podman is not installed (apt-get install podman)"
    exit 1
fi

# The image records its recipe, so one made by an older recipe is made again.
if [ -z "${REBUILD:-}" ] && podman image exists "$image" \
    && [ "$(podman image inspect --format '{{index .Labels "io.rtcbus.base.recipe"}}' "$image")" = "$recipe_hash" ]; then
    say "$image is already in podman's storage"
    exit 0
fi

# The first URI apt uses for "$suite" itself (not -updates or -security), deb822 or one-line.
apt_mirror() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk -v suite="$suite" '
            function flush() { if (deb && has_suite && uri != "") { print uri; found = 1; exit } deb = 0; has_suite = 0; uri = "" }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) has_suite = 1 }
            END { if (!found) flush() }
        ' "$file"
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        # deb [options] URI suite components...
        sed -E 's/\[[^]]*\]//' "$file" | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
    done
}

if [ -z "${REBUILD:-}" ] && [ -s "$tarball" ]; then
    say "importing $tarball (cached root filesystem)"
else
    if ! command -v debootstrap >/dev/null; then
        say "FAILED: debootstrap is not installed (apt-get install debootstrap)"
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        say "FAILED: debootstrap needs root"
        exit 1
    fi
    mirror="${DEBIAN_MIRROR:-$(apt_mirror | head -n 1)}"
    if [ -z "$mirror" ]; then
        say "FAILED: no Debian mirror for $suite in /etc/apt; set DEBIAN_MIRROR"
        exit 1
    fi
    mkdir -p "$cache_dir"
    rootfs=$(mktemp -d "$cache_dir/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$rootfs.log" "$tarball.part"' EXIT
    say "debootstrap $suite from $mirror (about 40 s)"
    started=$SECONDS
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
        tail -n 30 "$rootfs.log" >&2
        say "FAILED: debootstrap (log above)"
        exit 1
    }
    rm -f "$rootfs.log"
    # Package lists, downloaded .debs, documentation (but the copyright files) and translations
    # are of no use in an image (about 50 MB); dpkg is told so too, for images built on this one.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    find "$rootfs/usr/share/doc" ! -type d ! -name copyright -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    cat > "$rootfs/etc/dpkg/dpkg.cfg.d/01-rtcbus-nodoc" <<'NODOC'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
NODOC
    tar --numeric-owner -C "$rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    find "$cache_dir" -maxdepth 1 -name "rtcbus-base-$suite-*.tar" ! -path "$tarball" -delete
    say "root filesystem in $tarball after $((SECONDS - started)) s"
fi

# An imported image has no config at all: give it the usual PATH.
podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL io.rtcbus.base.recipe=$recipe_hash" \
    --message "$recipe" \
    "$tarball" "$image" >/dev/null
say "imported $image"
