#!/usr/bin/env bash
# install.sh: the first install of a scalebox release on a Debian server (12 or 13).
#
#   sudo bash install.sh [TARBALL]
#
# TARBALL defaults to the one scalebox-*-<arch>.tar.gz beside this script.
# Everything is checked before anything on the server changes: root, python3
# and its venv module, then the tarball (safe extraction, ed25519 signature,
# every file's sha256, arch and Python). Needs no network: the release brings
# its wheels. Running it again for the installed version changes nothing.
# Other versions are installed with scalebox-update, not with this script.
#
# Layout it makes (docs/architecture.md): /opt/scalebox/releases/<version>,
# /opt/scalebox/current, /usr/local/bin/{scaleboxd,scalebox,scalebox-update},
# /etc/systemd/system/<units>, /etc/scaleboxd/{config,version},
# /etc/scalebox/keys/release.pub.
#
# SCALEBOX_INSTALL_ROOT=DIR installs the files under DIR instead of / and skips
# systemd and the health check (for tests of the file layout; not for servers).
set -euo pipefail

R=${SCALEBOX_INSTALL_ROOT:-}
R=${R%/}
OPT=$R/opt/scalebox
CONFIG_DIR=$R/etc/scaleboxd
CONFIG=$CONFIG_DIR/config
KEYS=$R/etc/scalebox/keys
BIN=$R/usr/local/bin
UNIT_DIR=$R/etc/systemd/system
API_PORT=8080 # scaleboxd.socket's ListenStream
HEALTH_TIMEOUT=${SCALEBOX_HEALTH_TIMEOUT:-30}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { printf '==> %s\n' "$*"; }
die() {
  printf 'install.sh: error: %s\n' "$1" >&2
  if [[ $# -gt 1 ]]; then printf '  hint: %s\n' "$2" >&2; fi
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  -*) die "unknown option $1" "usage: sudo bash install.sh [TARBALL]" ;;
esac
[[ $# -le 1 ]] || die "too many arguments" "usage: sudo bash install.sh [TARBALL]"

# --- checks: nothing on the server changes before all of them pass -----------

[[ $EUID -eq 0 ]] || die "Must run as root. Try: sudo bash install.sh${*:+ $*}"

ARCH=$(uname -m)
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ $# -eq 1 ]]; then
  TARBALL=$1
else
  shopt -s nullglob
  found=("$SCRIPT_DIR"/scalebox-*-"$ARCH".tar.gz)
  shopt -u nullglob
  if [[ ${#found[@]} -ne 1 ]]; then
    die "found ${#found[@]} release tarballs (scalebox-*-$ARCH.tar.gz) beside $SCRIPT_DIR/install.sh, expected one" \
      "name the tarball: sudo bash install.sh /path/to/scalebox-VERSION-$ARCH.tar.gz"
  fi
  TARBALL=${found[0]}
fi
[[ -f $TARBALL && -r $TARBALL ]] || die "release tarball $TARBALL does not exist or is not readable" \
  "check the path; releases are named scalebox-VERSION-$ARCH.tar.gz"
TARBALL=$(cd "$(dirname "$TARBALL")" && pwd)/$(basename "$TARBALL")

command -v python3 >/dev/null || die "python3 is not installed" \
  "install the Debian package python3 (apt-get install python3), then run install.sh again"
PYVER=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# Debian splits venv's pip bootstrap (ensurepip) into python3-venv.
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  die "python3 -m venv is not usable here: the Debian package python3-venv (python$PYVER-venv) is missing" \
    "apt-get install python3-venv; on a server without a package mirror, copy python$PYVER-venv, python3-pip-whl and python3-setuptools-whl .deb files from a matching Debian machine and install them with dpkg -i"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/scalebox-install.XXXXXX")
BUILDING=""
MADE_OPT=""
cleanup() {
  if [[ -n $BUILDING ]]; then
    rm -rf "$BUILDING"
    # rmdir removes only what is empty, so only what this run made.
    if [[ -n $MADE_OPT ]]; then rmdir "$OPT/releases" "$OPT" 2>/dev/null || true; fi
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

shopt -s nullglob
trusted=("$KEYS"/*.pub)
shopt -u nullglob
if [[ ${#trusted[@]} -gt 0 ]]; then
  TRUST=(--trusted-keys "$KEYS")
else
  TRUST=(--trust-shipped-key)
fi

# The verifier is Python. An installed release's own verifier is already
# trusted; on a first install the one shipped in the tarball runs, from its
# wheels unpacked (zip) into a scratch directory: no venv, no pip, about a second.
if [[ -x $OPT/current/venv/bin/python ]] &&
  "$OPT/current/venv/bin/python" -c 'import scalebox.release.verify' 2>/dev/null; then
  VERIFY=("$OPT/current/venv/bin/python")
else
  log "unpacking the verifier from $(basename "$TARBALL")"
  python3 - "$TARBALL" "$WORK/site" "$ARCH" <<'PY' || die "cannot use $TARBALL (reason above); nothing was changed" "get the release tarball again"
# Reads only the wheels this Python can import, straight from the tarball, and
# unzips them into one directory for sys.path. Everything is checked again, in
# full, by the verifier itself.
import io
import re
import sys
import tarfile
import zipfile

tarball, site, arch = sys.argv[1], sys.argv[2], sys.argv[3]
here = "cp%d%d" % sys.version_info[:2]


def importable(name):
    py, abi = name[:-4].split("-")[-3:-1]
    tags = py.split(".")
    if "py3" in tags or here in tags:
        return True
    return abi == "abi3" and any(re.fullmatch(r"cp3\d+", t) and int(t[3:]) <= int(here[3:]) for t in tags)


found = 0
try:
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            top = parts[0]
            if not top.startswith("scalebox-") or ".." in parts or member.name.startswith("/"):
                sys.exit(f"install.sh: error: {tarball} is not a scalebox release (member {member.name!r})")
            if not top.endswith("-" + arch):
                sys.exit(f"install.sh: error: the release is for {top.rsplit('-', 1)[-1]}, this machine is {arch}")
            if member.isreg() and len(parts) == 3 and parts[1] == "wheels" and parts[2].endswith(".whl"):
                if member.size > 256 << 20:
                    sys.exit(f"install.sh: error: {member.name} is too large")
                if importable(parts[2]):
                    data = archive.extractfile(member).read()
                    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
                        wheel.extractall(site)  # extractall drops absolute and '..' parts
                    found += 1
except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
    sys.exit(f"install.sh: error: {tarball} is not a readable release tarball ({exc})")
if not found:
    sys.exit(f"install.sh: error: {tarball} holds no wheels for Python {sys.version_info[0]}.{sys.version_info[1]}")
PY
  VERIFY=(env "PYTHONPATH=$WORK/site" python3 -s)
fi

log "verifying $(basename "$TARBALL")"
VERSION=$("${VERIFY[@]}" -m scalebox.release.verify "$TARBALL" "$WORK/release" "${TRUST[@]}") ||
  die "the release tarball failed verification (reason above); nothing was changed" \
    "get the release again from a trusted source"
REL=$WORK/release/scalebox-$VERSION-$ARCH
[[ -f $REL/RELEASE.json ]] || die "the verifier reported version '$VERSION' but $REL is missing" \
  "report this as a bug in scalebox.release.verify"
if [[ ${TRUST[0]} == --trust-shipped-key ]]; then
  log "verified scalebox $VERSION with the key shipped in the tarball (first install: no trusted key yet)"
else
  log "verified scalebox $VERSION, signed by a key trusted in $KEYS"
fi
read -r -a PROGRAMS < <(python3 -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["entry_points"]))' "$REL/RELEASE.json")

INSTALLED=""
if [[ -L $OPT/current ]]; then
  INSTALLED=$(basename "$(readlink "$OPT/current")")
fi
if [[ -n $INSTALLED && $INSTALLED != "$VERSION" ]]; then
  die "scalebox $INSTALLED is installed here; install.sh only makes the first install" \
    "to move to $VERSION run: sudo SCALEBOX_RELEASE_URL=$TARBALL scalebox-update"
fi

# --- install: each step checks first, so a re-run changes only what is missing --

CHANGED=0
UNITS_CHANGED=0
RELEASE_DIR=$OPT/releases/$VERSION

if [[ -f $RELEASE_DIR/.complete ]]; then
  cmp -s "$RELEASE_DIR/RELEASE.json" "$REL/RELEASE.json" ||
    die "$RELEASE_DIR holds a different build of scalebox $VERSION" \
      "every build needs its own version; remove $RELEASE_DIR only if that build is not in use"
else
  if [[ -e $RELEASE_DIR ]]; then
    log "removing the unfinished $RELEASE_DIR left by an interrupted run"
    rm -rf "$RELEASE_DIR"
  fi
  log "installing scalebox $VERSION into $RELEASE_DIR (offline, from the release's wheels)"
  if [[ ! -d $OPT ]]; then MADE_OPT=1; fi
  BUILDING=$RELEASE_DIR
  mkdir -p "$RELEASE_DIR"
  python3 -m venv "$RELEASE_DIR/venv"
  "$RELEASE_DIR/venv/bin/pip" install --isolated --quiet --no-index --find-links "$REL/wheels" "scalebox==$VERSION"
  for name in "${PROGRAMS[@]}"; do
    [[ -x $RELEASE_DIR/venv/bin/$name ]] || die "the release's venv has no program $name" \
      "the release is broken; report it"
  done
  cp -R "$REL/units" "$RELEASE_DIR/units"
  if [[ -d $REL/docs ]]; then cp -R "$REL/docs" "$RELEASE_DIR/docs"; fi # what units' Documentation= names
  cp "$REL/RELEASE.json" "$REL/RELEASE.json.sig" "$RELEASE_DIR/"
  sync
  : >"$RELEASE_DIR/.complete" # last: a release directory without it is unfinished
  sync
  CHANGED=1 # BUILDING stays set until the config check passed: a refused config leaves no trace
fi

if [[ ! -e $CONFIG ]]; then
  log "writing $CONFIG with a new API token"
  token=$(python3 -c 'import secrets; print("sb-" + secrets.token_hex(24))')
  host_ip=$(python3 - <<'PY'
import socket
# A UDP connect only looks up the route; no packet is sent (TEST-NET-1 address).
try:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        print(s.getsockname()[0])
except OSError:
    print("")
PY
  )
  if [[ -z $host_ip ]]; then
    host_ip=$(hostname -I 2>/dev/null | awk '{print $1}')
  fi
  host_ip=${host_ip:-127.0.0.1}
  mkdir -p "$CONFIG_DIR"
  chmod 0755 "$CONFIG_DIR"
  tmp_config=$(mktemp "$CONFIG_DIR/.config.XXXXXX")
  cat >"$tmp_config" <<EOF
# /etc/scaleboxd/config: settings of scaleboxd, KEY=VALUE, one per line.
# Written once by install.sh; install.sh and scalebox-update never overwrite it.
# Mode 0600: it holds the API token. After a change: systemctl restart scaleboxd
#
# Keys and their defaults (uncomment a line to change it):
#   API_PORT=8080                  the API port (scaleboxd.socket listens on 8080)
#   DATA_DIR=/var/lib/scalebox     templates, VM disks and state
#   KERNEL_PATH=\$DATA_DIR/kernel/vmlinux
#   PORT_MIN=22001                 ssh ports handed to VMs: PORT_MIN..PORT_MAX
#   PORT_MAX=32000
#   DEFAULT_VCPU_COUNT=2
#   DEFAULT_MEM_SIZE_MIB=2048
#   DEFAULT_DISK_SIZE_GIB=2
#   MAX_DISK_SIZE_GIB=100
#   API_DOMAIN=                    empty: no HTTPS name for the API
#   VM_DOMAIN=                     empty: VMs get no https://<name>.<domain> URL
#   ACME_STAGING=false
#   VM_BACKEND=process
#   HOST_IP=<detected>             the address shown in VMs' ssh commands
API_TOKEN=$token
HOST_IP=$host_ip
EOF
  chmod 0600 "$tmp_config"
  mv -f "$tmp_config" "$CONFIG"
  CHANGED=1
fi
"$RELEASE_DIR/venv/bin/scaleboxd" --check-config "$CONFIG" >/dev/null ||
  die "scaleboxd $VERSION refuses the config $CONFIG (reason above)" \
    "fix $CONFIG and run install.sh again; nothing was switched yet"
BUILDING=""

if [[ $(readlink "$OPT/current" 2>/dev/null || true) != "releases/$VERSION" ]]; then
  log "pointing $OPT/current at releases/$VERSION"
  ln -sfn "releases/$VERSION" "$OPT/.current.tmp"
  mv -Tf "$OPT/.current.tmp" "$OPT/current"
  CHANGED=1
fi

mkdir -p "$BIN"
for name in "${PROGRAMS[@]}"; do
  target=$R/opt/scalebox/current/venv/bin/$name
  if [[ $(readlink "$BIN/$name" 2>/dev/null || true) != "$target" ]]; then
    log "linking $BIN/$name -> $target"
    ln -sfn "$target" "$BIN/.$name.tmp"
    mv -Tf "$BIN/.$name.tmp" "$BIN/$name"
    CHANGED=1
  fi
done

mkdir -p "$UNIT_DIR"
for unit in "$REL"/units/*; do
  name=$(basename "$unit")
  if ! cmp -s "$unit" "$UNIT_DIR/$name"; then
    log "installing $UNIT_DIR/$name"
    install -m 0644 "$unit" "$UNIT_DIR/.$name.tmp"
    mv -f "$UNIT_DIR/.$name.tmp" "$UNIT_DIR/$name"
    UNITS_CHANGED=1
    CHANGED=1
  fi
done

if [[ ${#trusted[@]} -eq 0 ]]; then
  log "trusting the release key $KEYS/release.pub for future updates"
  mkdir -p "$KEYS"
  install -m 0644 "$REL/keys/release.pub" "$KEYS/release.pub"
  CHANGED=1
fi

if [[ $(cat "$CONFIG_DIR/version" 2>/dev/null || true) != "$VERSION" ]]; then
  printf '%s\n' "$VERSION" >"$CONFIG_DIR/.version.tmp"
  mv -f "$CONFIG_DIR/.version.tmp" "$CONFIG_DIR/version"
  CHANGED=1
fi

token=$(sed -n 's/^API_TOKEN=//p' "$CONFIG" | tail -n 1)
host_ip=$(sed -n 's/^HOST_IP=//p' "$CONFIG" | tail -n 1)
host_ip=${host_ip:-127.0.0.1}

if [[ -n $R ]]; then
  log "SCALEBOX_INSTALL_ROOT=$R: skipping systemd and the health check"
else
  if ((UNITS_CHANGED)); then systemctl daemon-reload; fi
  if ! systemctl is-enabled --quiet scaleboxd.socket scaleboxd.service ||
    ! systemctl is-active --quiet scaleboxd.socket scaleboxd.service; then
    log "enabling and starting scaleboxd.socket and scaleboxd.service"
    systemctl enable --quiet --now scaleboxd.socket scaleboxd.service ||
      die "systemd could not start scaleboxd" \
        "see why: journalctl -u scaleboxd -n 50 --no-pager; then run install.sh again"
    CHANGED=1
  elif ((CHANGED)); then
    # Running, but from files this run replaced: start it on the new ones.
    systemctl restart scaleboxd.service
  fi

  # At boot it finishes an update that a crash or power loss interrupted; it
  # does nothing (ConditionPathExists) when no update journal is left.
  if ! systemctl is-enabled --quiet scalebox-update-recover.service; then
    log "enabling scalebox-update-recover.service (finishes an interrupted update at boot)"
    systemctl enable --quiet scalebox-update-recover.service
    CHANGED=1
  fi

  log "waiting up to ${HEALTH_TIMEOUT}s for http://127.0.0.1:$API_PORT/health to report $VERSION"
  python3 - "http://127.0.0.1:$API_PORT/health" "$VERSION" "$HEALTH_TIMEOUT" <<'PY' ||
import json
import sys
import time
import urllib.request

url, version, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + timeout
last = "no answer"
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            body = json.loads(response.read())
        if body.get("version") == version:
            sys.exit(0)
        last = f"it reports version {body.get('version')!r}"
    except (OSError, ValueError) as exc:
        last = str(exc)
    time.sleep(0.5)
print(f"install.sh: /health did not report {version}: {last}", file=sys.stderr)
sys.exit(1)
PY
    die "scaleboxd $VERSION did not become healthy within ${HEALTH_TIMEOUT}s" \
      "see why: journalctl -u scaleboxd -n 50 --no-pager (and systemctl status scaleboxd); then run install.sh again"
fi

state="installed and running"
if [[ -n $R ]]; then state="installed under $R"; fi
if ((CHANGED)); then
  log "scalebox $VERSION is $state"
else
  log "scalebox $VERSION is already $state; nothing changed"
fi
printf '\n  API:   http://%s:%s\n  Token: %s\n  (the token is in %s)\n\n' "$host_ip" "$API_PORT" "$token" "$CONFIG"
