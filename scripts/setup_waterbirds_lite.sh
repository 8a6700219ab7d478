#!/usr/bin/env bash
# Fetch the Waterbirds-lite assets (bird cut-outs and background photos from the Debian packages
# tuxpaint-stamps-default and tuxpaint-data, GPL-2) into the data cache. Run once at setup time; nothing here is
# ever committed. Cache: $FAITHFUL_VIT_DATA or ~/.cache/faithful_vit (the same folder the Python loader reads).
set -euo pipefail

CACHE="${FAITHFUL_VIT_DATA:-$HOME/.cache/faithful_vit}"
DEST="$CACHE/waterbirds_lite/debian"
BIRDS=usr/share/tuxpaint/stamps/animals/birds
TEMPLATES=usr/share/tuxpaint/templates

if compgen -G "$DEST/$BIRDS/*.png" > /dev/null && compgen -G "$DEST/$TEMPLATES/*.jpg" > /dev/null; then
    echo "Waterbirds-lite assets already in $DEST"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
# apt-get download needs package lists; refresh them only when the first attempt fails.
if ! apt-get download tuxpaint-stamps-default tuxpaint-data; then
    apt-get update
    apt-get download tuxpaint-stamps-default tuxpaint-data
fi

mkdir -p "$DEST"
dpkg-deb --fsys-tarfile tuxpaint-stamps-default_*.deb \
    | tar -x -C "$DEST" --wildcards "./$BIRDS/*.png" ./usr/share/doc/tuxpaint-stamps-default/copyright
dpkg-deb --fsys-tarfile tuxpaint-data_*.deb \
    | tar -x -C "$DEST" --wildcards "./$TEMPLATES/*.jpg" ./usr/share/doc/tuxpaint-data/copyright
echo "Waterbirds-lite assets in $DEST ($(du -sh "$DEST" | cut -f1)); licence: $DEST/usr/share/doc/*/copyright"
