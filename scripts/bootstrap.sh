#!/usr/bin/env bash
# bootstrap.sh: download a scalebox release and install it with its own install.sh.
#
#   curl -fsSL <raw URL of scripts/bootstrap.sh> -o bootstrap.sh && sudo bash bootstrap.sh
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

[[ $EUID -eq 0 ]] || die "Must run as root. Try: sudo bash bootstrap.sh"
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
  curl -fsSL --retry 3 -H 'Accept: application/vnd.github+json' "${auth[@]}" \
    -o "$WORK/latest.json" "$API/repos/$REPO/releases/latest" ||
    die "cannot get the latest release of $REPO from $API" \
      "check the network, or set SCALEBOX_RELEASE_URL to the tarball's URL or path"
  URL=$(python3 - "$WORK/latest.json" "$ARCH" <<'PY'
import json
import re
import sys

release = json.load(open(sys.argv[1]))
pattern = re.compile(r"scalebox-.+-" + re.escape(sys.argv[2]) + r"\.tar\.gz")
for asset in release.get("assets", []):
    if pattern.fullmatch(asset.get("name", "")):
        print(asset["browser_download_url"])
        break
PY
  )
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
curl -fL --retry 3 --proto '=https,file,http' -o "$TARBALL" "$URL" ||
  die "cannot download $URL" "check the URL and the network, then run bootstrap.sh again"

# Only the installer is taken out here; install.sh itself verifies the whole tarball.
python3 - "$TARBALL" "$WORK/install.sh" <<'PY' || die "$URL is not a scalebox release tarball" "check SCALEBOX_RELEASE_URL"
import sys
import tarfile

with tarfile.open(sys.argv[1], "r:gz") as archive:
    for member in archive:
        parts = member.name.split("/")
        if member.isreg() and len(parts) == 3 and parts[1:] == ["scripts", "install.sh"]:
            data = archive.extractfile(member).read()
            with open(sys.argv[2], "wb") as out:
                out.write(data)
            break
    else:
        sys.exit("bootstrap.sh: error: the tarball has no scripts/install.sh")
PY

bash "$WORK/install.sh" "$TARBALL"
