#!/usr/bin/env bash
# Fetch Jane Austen's six novels (Debian package r-cran-janeaustenr, MIT licence) into
# ${BMOJO_DATA_CACHE:-<repo>/data_cache}/janeaustenr/, the R package's directory, without R and
# without a system install: apt-get downloads the .deb (signature-checked), dpkg-deb unpacks it.
# bmojo_jax.data.text.austen_documents reads data/Rdata.{rdx,rdb} from there (pip install rdata).
# Idempotent: does nothing when the data is already there.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${BMOJO_DATA_CACHE:-$repo/data_cache}"
dest="$cache/janeaustenr"

if [[ -f "$dest/data/Rdata.rdx" && -f "$dest/data/Rdata.rdb" ]]; then
  echo "Jane Austen's novels already in $dest"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
download() { apt-get -q -o APT::Sandbox::User=root download r-cran-janeaustenr; }
if ! download; then
  echo "apt-get download failed; refreshing the package lists (apt-get update) and retrying" >&2
  apt-get -q update
  download
fi
dpkg-deb -x r-cran-janeaustenr_*.deb unpacked

mkdir -p "$cache"
rm -rf "$dest"
cp -r unpacked/usr/lib/R/site-library/janeaustenr "$dest"
cp unpacked/usr/share/doc/r-cran-janeaustenr/copyright "$dest/copyright"
echo "Jane Austen's novels unpacked into $dest"
