#!/usr/bin/env bash
# Install the offline datasets that efdit.data loads (Fashion-MNIST; emoji on request).
#
#   scripts/install_data.sh           Fashion-MNIST (Debian package dataset-fashion-mnist, 30 MB)
#   scripts/install_data.sh --emoji   ... and the emoji PNGs (npm emoji-datasource-google/-twitter 16.0.0,
#                                     ~150 MB download, trimmed to the 64 px PNGs afterwards)
#
# Idempotent: anything already installed is left alone. Run from anywhere; npm data goes to
# <repo>/data/npm/node_modules (ignored by git).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FMNIST_FILE=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
EMOJI_VERSION=16.0.0

want_emoji=0
status=0
for arg in "$@"; do
    case "$arg" in
        --emoji) want_emoji=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "install_data.sh: unknown argument '$arg' (known: --emoji)" >&2; exit 2 ;;
    esac
done

# ---- Fashion-MNIST (Debian) ------------------------------------------------------------------
if [ -f "$FMNIST_FILE" ]; then
    echo "fashion-mnist: already installed ($FMNIST_FILE)"
elif [ "$(id -u)" -eq 0 ]; then
    echo "fashion-mnist: installing Debian package dataset-fashion-mnist"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
else
    echo "fashion-mnist: missing $FMNIST_FILE" >&2
    echo "  install it as root:  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" >&2
    echo "  (or put the four *-ubyte.gz files in a folder and set EFDIT_FMNIST_ROOT to it)" >&2
    status=1
fi

# ---- Emoji (npm), only on request --------------------------------------------------------------
if [ "$want_emoji" -eq 1 ]; then
    NM="$REPO/data/npm/node_modules"
    have=1
    for style in google twitter; do
        pkg="$NM/emoji-datasource-$style"
        if [ ! -f "$pkg/emoji.json" ] || [ ! -d "$pkg/img/$style/64" ] \
           || ! grep -q "\"version\": *\"$EMOJI_VERSION\"" "$pkg/package.json" 2>/dev/null; then
            have=0
        fi
    done
    if [ "$have" -eq 1 ]; then
        echo "emoji: already installed ($NM)"
    else
        if ! command -v npm >/dev/null 2>&1; then
            echo "emoji: npm not found; install Node.js/npm first (e.g. apt-get install -y npm)" >&2
            exit 1
        fi
        echo "emoji: npm install emoji-datasource-google/-twitter@$EMOJI_VERSION into $REPO/data/npm"
        mkdir -p "$REPO/data/npm"
        npm install --prefix "$REPO/data/npm" --no-audit --no-fund \
            "emoji-datasource-google@$EMOJI_VERSION" "emoji-datasource-twitter@$EMOJI_VERSION"
    fi
    # Trim: efdit reads only img/<style>/64/*.png; sprite sheets and other sizes are ~80% of the bytes.
    for style in google twitter; do
        img="$NM/emoji-datasource-$style/img"
        [ -d "$img" ] || continue
        rm -rf "$img"/*/sheets*
        for d in "$img"/*/*/; do
            [ -d "$d" ] || continue
            [ "$(basename "$d")" = "64" ] || rm -rf "$d"
        done
    done
    echo "emoji: ready ($(du -sh "$NM" 2>/dev/null | cut -f1) in $NM)"
fi
exit $status
