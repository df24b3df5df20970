#!/usr/bin/env bash
# bootstrap.sh: download a scalebox release and install it with its own install.sh.
#
#   curl -fsSL <raw URL of scripts/bootstrap.sh> -o bootstrap.sh && sudo bash bootstrap.sh [--key KEY.pub]
#       [--template FILE | --backend process]
#
# --key KEY.pub (or SCALEBOX_KEY=KEY.pub) pins the release-signing key: the
# release must be signed by it, and the install.sh inside the tarball runs only
# after openssl found RELEASE.json signed by that key (or by a key already in
# /etc/scalebox/keys, without --key) and install.sh's sha256 listed there.
# Without any key the first install trusts the key shipped in the tarball
# (trust on first use; docs/release-format.md). --template and --backend go
# to install.sh as they are (docs/operations.md, "Install").
#
# Environment (the same names scalebox-update reads):
#   SCALEBOX_RELEASE_URL  the release tarball: https:// or file:// URL, or a path;
#                         default: the latest GitHub release's asset for this arch
#   SCALEBOX_UPDATE_REPO  GitHub repository OWNER/NAME (default The-Agentic-Journey/Scalebox)
#   SCALEBOX_GITHUB_API   API base URL (default https://api.github.com; GitHub Enterprise)
#   GITHUB_TOKEN          sent to the API only (private repositories, rate limits)
#   SCALEBOX_ALLOW_HTTP=1 allow a plain http:// release URL (refused otherwise)
#
# The downloaded tarball is checked by install.sh (signature, hashes, arch)
# before anything on the server changes.
set -euo pipefail
umask 022

REPO=${SCALEBOX_UPDATE_REPO:-The-Agentic-Journey/Scalebox}
API=${SCALEBOX_GITHUB_API:-https://api.github.com}
API=${API%/}
ARCH=$(uname -m)

log() { printf '==> %s\n' "$*"; }
die() {
  printf 'bootstrap.sh: error: %s\n' "$1" >&2
  if [[ $# -gt 1 ]]; then printf '  hint: %s\n' "$2" >&2; fi
  exit 1
}

USAGE="usage: sudo bash bootstrap.sh [--key KEY.pub] [--template FILE | --backend process]"
KEY_FILE=${SCALEBOX_KEY:-}
PASS=() # options for install.sh
while [[ $# -gt 0 ]]; do
  case $1 in
    --key)
      [[ $# -ge 2 && -n $2 ]] || die "--key needs the path of a public key (PEM)" "$USAGE"
      KEY_FILE=$2
      shift 2
      ;;
    --key=?*) KEY_FILE=${1#--key=}; shift ;;
    --template | --backend)
      [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value" "$USAGE"
      PASS+=("$1" "$2")
      shift 2
      ;;
    --template=?* | --backend=?*) PASS+=("$1"); shift ;;
    *) die "unknown argument $1" "$USAGE" ;;
  esac
done

[[ $EUID -eq 0 ]] || die "Must run as root. Try: sudo bash bootstrap.sh"
if [[ -n $KEY_FILE ]]; then
  [[ -f $KEY_FILE && -r $KEY_FILE ]] || die "the key $KEY_FILE does not exist or is not a readable file" \
    "give the release-signing public key (PEM): --key /path/to/release.pub"
  KEY_FILE=$(cd "$(dirname "$KEY_FILE")" && pwd)/$(basename "$KEY_FILE")
fi
command -v curl >/dev/null || die "curl is not installed" "apt-get install curl, or download the release tarball yourself and run its scripts/install.sh"
command -v python3 >/dev/null || die "python3 is not installed" "apt-get install python3 python3-venv"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/scalebox-bootstrap.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

allow_http() { [[ ${SCALEBOX_ALLOW_HTTP:-} =~ ^(1|true|yes)$ ]]; }

URL=${SCALEBOX_RELEASE_URL:-}
if [[ -z $URL ]]; then
  [[ $REPO =~ ^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$ ]] ||
    die "SCALEBOX_UPDATE_REPO='$REPO' is not a GitHub repository name" "use OWNER/NAME"
  log "asking $API for the latest release of $REPO"
  auth=()
  if [[ -n ${GITHUB_TOKEN:-} ]]; then auth=(-H "Authorization: Bearer $GITHUB_TOKEN"); fi
  curl -fsSL --retry 3 --max-filesize 4194304 --max-time 120 \
    -H 'Accept: application/vnd.github+json' "${auth[@]}" -o "$WORK/latest.json" "$API/repos/$REPO/releases/latest" ||
    die "cannot get the latest release of $REPO from $API" \
      "check the network, or set SCALEBOX_RELEASE_URL to the tarball's URL or path"
  URL=$(python3 -I - "$WORK/latest.json" "$ARCH" <<'PY'
import json
import re
import sys

try:
    release = json.load(open(sys.argv[1]))
    pattern = re.compile(r"scalebox-.+-" + re.escape(sys.argv[2]) + r"\.tar\.gz")
    for asset in release.get("assets", []):
        if pattern.fullmatch(asset.get("name", "")):
            print(asset["browser_download_url"])
            break
except (ValueError, RecursionError, AttributeError, TypeError, KeyError) as exc:
    sys.exit(f"bootstrap.sh: error: the releases API answered something unexpected ({type(exc).__name__})")
PY
  ) || die "cannot read the latest release of $REPO from $API's answer (reason above)" \
    "set SCALEBOX_RELEASE_URL to the tarball's URL or path"
  [[ -n $URL ]] || die "the latest release of $REPO has no scalebox-*-$ARCH.tar.gz" \
    "set SCALEBOX_RELEASE_URL to a release tarball for $ARCH"
fi

case "$URL" in
  https://* | file://*) ;;
  http://*) allow_http || die "refusing the plain http URL $URL" "use https, or set SCALEBOX_ALLOW_HTTP=1 on a network you trust" ;;
  *://*) die "unsupported URL $URL" "use an https:// or file:// URL, or a path" ;;
  *)
    [[ -f $URL ]] || die "release tarball $URL does not exist" "check the path"
    URL=file://$(cd "$(dirname "$URL")" && pwd)/$(basename "$URL")
    ;;
esac

name=$(basename "${URL%%\?*}")
[[ $name =~ ^scalebox-[A-Za-z0-9._+-]+\.tar\.gz$ ]] || name=scalebox-release.tar.gz
TARBALL=$WORK/$name
log "downloading $URL"
# Give up on a stalled download: under 1 KiB/s for a minute.
curl -fL --retry 3 --speed-limit 1024 --speed-time 60 --max-filesize 1073741824 --proto '=https,file,http' -o "$TARBALL" "$URL" ||
  die "cannot download $URL" "check the URL and the network, then run bootstrap.sh again"

# Only the installer and the signed manifest are taken out here (bounded sizes,
# Debian's python3 only); install.sh itself verifies the whole tarball.
python3 -I - "$TARBALL" "$WORK" <<'PY' || die "$URL is not a scalebox release tarball (reason above); nothing was changed" "check SCALEBOX_RELEASE_URL"
import os
import resource
import sys
import tarfile
import zlib

hard = resource.getrlimit(resource.RLIMIT_AS)[1]
cap = 768 << 20 if hard == resource.RLIM_INFINITY else min(768 << 20, hard)
resource.setrlimit(resource.RLIMIT_AS, (cap, hard))  # a hostile tar header: MemoryError
WANTED = {"RELEASE.json": 4 << 20, "RELEASE.json.sig": 4096, "scripts/install.sh": 1 << 20}
found = {}
try:
    with tarfile.open(sys.argv[1], "r:gz") as archive:
        for count, member in enumerate(archive, 1):
            if count > 10_000:
                sys.exit("bootstrap.sh: error: the tarball has more than 10000 members")
            rel = member.name.partition("/")[2]
            if rel in WANTED:
                if rel in found or not member.isreg() or member.size > WANTED[rel]:
                    sys.exit(f"bootstrap.sh: error: the tarball's {rel} is twice there, not a file or too large")
                found[rel] = archive.extractfile(member).read(WANTED[rel] + 1)
except (tarfile.TarError, zlib.error, OSError, EOFError, ValueError, MemoryError) as exc:
    sys.exit(f"bootstrap.sh: error: cannot read the tarball ({type(exc).__name__}: {exc})")
for rel in WANTED:
    if rel not in found:
        sys.exit(f"bootstrap.sh: error: the tarball has no {rel}")
    with open(os.path.join(sys.argv[2], os.path.basename(rel)), "xb") as out:
        out.write(found[rel])
PY

# With a key to trust, the install.sh from the tarball runs only once openssl
# found RELEASE.json signed by that key and install.sh's sha256 listed in it.
TRUST=()
if [[ -n $KEY_FILE ]]; then
  TRUST=("$KEY_FILE")
else
  shopt -s nullglob
  TRUST=(/etc/scalebox/keys/*.pub)
  shopt -u nullglob
fi
if [[ ${#TRUST[@]} -gt 0 ]]; then
  command -v openssl >/dev/null || die "openssl is not installed; bootstrap.sh needs it to check the release against ${TRUST[*]}" \
    "apt-get install openssl (the Debian package openssl), then run bootstrap.sh again"
  signer=""
  for key in "${TRUST[@]}"; do
    if openssl pkeyutl -verify -pubin -inkey "$key" -rawin -in "$WORK/RELEASE.json" \
      -sigfile "$WORK/RELEASE.json.sig" >/dev/null 2>&1; then
      signer=$key
      break
    fi
  done
  [[ -n $signer ]] || die "the release $URL is not signed by ${TRUST[*]}; nothing was changed" \
    "get the release from its publisher again; if the publisher really changed keys, check the new key's fingerprint with them and pass it: --key NEW.pub"
  listed=$(python3 -I -c 'import json, sys; print(json.load(open(sys.argv[1]))["files"]["scripts/install.sh"])' \
    "$WORK/RELEASE.json" 2>/dev/null) || die "the signed RELEASE.json lists no scripts/install.sh; nothing was changed" \
    "do not install this release; report it to its publisher"
  actual=$(sha256sum "$WORK/install.sh")
  [[ ${actual%% *} == "$listed" ]] || die "the tarball's scripts/install.sh does not match its signed RELEASE.json; nothing was changed" \
    "get the release again from a trusted source"
  log "RELEASE.json is signed by $signer; running its install.sh"
fi

if [[ -n $KEY_FILE ]]; then
  bash "$WORK/install.sh" --key "$KEY_FILE" "${PASS[@]}" "$TARBALL"
else
  bash "$WORK/install.sh" "${PASS[@]}" "$TARBALL"
fi
