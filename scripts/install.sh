#!/usr/bin/env bash
# install.sh: the first install of a scalebox release on a Debian server (12 or 13).
#
#   sudo bash install.sh [--key KEY.pub] [--template FILE | --backend process] [TARBALL]
#
# TARBALL defaults to the one scalebox-*-<arch>.tar.gz beside this script.
# --key KEY.pub pins the release-signing key: the tarball must be signed by
# it, and it becomes the key /etc/scalebox/keys trusts for every later update.
# Without --key and without a key already in /etc/scalebox/keys, the first
# install trusts the key shipped inside the tarball (trust on first use).
#
# VMs are systemd-nspawn containers (VM_BACKEND=nspawn, the default): the
# Debian packages systemd-container, openssh-client and nftables are
# installed with apt-get when missing, and the template debian-base is put
# in place: --template FILE installs a prebuilt one (offline installs, CI,
# test machines; made with `python -m scalebox.daemon.vms.templates build
# FILE`), without it debian-base is built here with debootstrap from
# deb.debian.org (a minute or two; debootstrap is installed too). Both are
# skipped when the installed template is current.
# --backend process: stand-in VMs that answer one JSON line and cannot be
# logged into, only for fast API tests; no packages, no template.
# The backend goes into a new config as VM_BACKEND; an existing config keeps
# its own, and --backend must agree with it.
#
# Everything is checked before anything on the server changes: root, python3
# and its venv module, then the tarball (signature, every file's sha256, safe
# names, arch and Python). Whenever a key is trusted, the signature is checked
# by code that did not come from the tarball (openssl, then the installed
# release's verifier or the tarball's own only once its hash is signed).
# Needs no network: the release brings its wheels. Running it again for the
# installed version changes nothing. Other versions are installed with
# scalebox-update, not with this script. Exit codes: 0 installed (or nothing
# to do), 1 refused or failed (the message says what and what to do), 130
# interrupted.
#
# Layout it makes (docs/architecture.md): /opt/scalebox/releases/<version>,
# /opt/scalebox/current, /usr/local/bin/{scaleboxd,scalebox,scalebox-update},
# /etc/systemd/system/<units> (and scaleboxd.socket.d/port.conf when the
# config's API_PORT is not 8080), /etc/scaleboxd/{config,version},
# /etc/scalebox/keys/release.pub.
#
# SCALEBOX_INSTALL_ROOT=DIR installs the files under DIR instead of / and skips
# systemd and the health check (for tests of the file layout; not for servers).
set -euo pipefail
# Whatever the caller's umask (even 000), nothing this script makes is
# writable by others; the modes that matter are also set explicitly.
umask 022

R=${SCALEBOX_INSTALL_ROOT:-}
R=${R%/}
OPT=$R/opt/scalebox
CONFIG_DIR=$R/etc/scaleboxd
CONFIG=$CONFIG_DIR/config
KEYS=$R/etc/scalebox/keys
BIN=$R/usr/local/bin
UNIT_DIR=$R/etc/systemd/system
HEALTH_TIMEOUT=${SCALEBOX_HEALTH_TIMEOUT:-30}
USAGE="usage: sudo bash install.sh [--key KEY.pub] [--template FILE | --backend process] [TARBALL]"
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

ORIG_ARGS="$*"
KEY_FILE=""
TEMPLATE_FILE=""
BACKEND=""
ARGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --key)
      [[ $# -ge 2 && -n $2 ]] || die "--key needs the path of a public key (PEM)" "$USAGE"
      KEY_FILE=$2
      shift 2
      ;;
    --key=?*) KEY_FILE=${1#--key=}; shift ;;
    --template)
      [[ $# -ge 2 && -n $2 ]] || die "--template needs the path of a template tarball" "$USAGE"
      TEMPLATE_FILE=$2
      shift 2
      ;;
    --template=?*) TEMPLATE_FILE=${1#--template=}; shift ;;
    --backend)
      [[ $# -ge 2 && -n $2 ]] || die "--backend needs nspawn or process" "$USAGE"
      BACKEND=$2
      shift 2
      ;;
    --backend=?*) BACKEND=${1#--backend=}; shift ;;
    --) shift; ARGS+=("$@"); break ;;
    -*) die "unknown option $1" "$USAGE" ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[[ ${#ARGS[@]} -le 1 ]] || die "too many arguments" "$USAGE"
case $BACKEND in
  "" | nspawn) ;;
  process)
    [[ -z $TEMPLATE_FILE ]] || die "--template is for the nspawn backend; --backend process has no templates to install" "$USAGE"
    ;;
  *) die "unknown backend '$BACKEND': expected nspawn (containers you ssh into) or process (stand-ins for API tests)" "$USAGE" ;;
esac
set -- "${ARGS[@]}"

# --- checks: nothing on the server changes before all of them pass -----------

[[ $EUID -eq 0 ]] || die "Must run as root. Try: sudo bash install.sh${ORIG_ARGS:+ $ORIG_ARGS}"

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

if [[ -n $TEMPLATE_FILE ]]; then
  [[ -f $TEMPLATE_FILE && -r $TEMPLATE_FILE ]] || die "the template $TEMPLATE_FILE does not exist or is not a readable file; nothing was changed" \
    "give a template tarball made by: python -m scalebox.daemon.vms.templates build FILE (docs/operations.md)"
  TEMPLATE_FILE=$(cd "$(dirname "$TEMPLATE_FILE")" && pwd)/$(basename "$TEMPLATE_FILE")
fi

command -v python3 >/dev/null || die "python3 is not installed" \
  "install the Debian package python3 (apt-get install python3), then run install.sh again"
PYVER=$(python3 -I -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# Debian splits venv's pip bootstrap (ensurepip) into python3-venv.
if ! python3 -I -c 'import ensurepip, venv' 2>/dev/null; then
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

# Reads a release before it is trusted, with Debian's python3 and its standard
# library only (-I: no code from the current directory or the environment).
# Every refusal is printed here in full; install.sh then just exits 1.
cat >"$WORK/reader.py" <<'PY'
import hashlib
import json
import os
import re
import resource
import sys
import tarfile
import zipfile
import zlib

MAX_MEMBERS = 10_000
MAX_MANIFEST = 4 << 20
MAX_SIGNATURE = 4096
MAX_WHEEL = 256 << 20
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", re.ASCII)
# Programs land in /usr/local/bin and units in /etc/systemd/system: plain names of ours only.
PROGRAM = re.compile(r"scalebox[A-Za-z0-9._-]{0,56}", re.ASCII)
UNIT = re.compile(r"scalebox[A-Za-z0-9._@-]{0,48}\.(service|socket|timer|target|path)", re.ASCII)
AGAIN = "get the release again from a trusted source"
HOSTILE = "do not install this release; report it to its publisher"

# A huge tar header or manifest ends in MemoryError here, not in an exhausted server.
_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
_cap = 768 << 20
if _hard == resource.RLIM_INFINITY or _hard > _cap:
    resource.setrlimit(resource.RLIMIT_AS, (_cap, _hard))


def fail(what, hint=AGAIN):
    print(f"install.sh: error: {what}; nothing was changed", file=sys.stderr)
    print(f"  hint: {hint}", file=sys.stderr)
    sys.exit(1)


def walk(tarball, arch):
    """(archive, member, parts) for each member; names checked, one top directory for arch."""
    name = os.path.basename(tarball)
    top = None
    with tarfile.open(tarball, "r:gz") as archive:
        for count, member in enumerate(archive, 1):
            if count > MAX_MEMBERS:
                fail(f"{name} has more than {MAX_MEMBERS} members")
            parts = member.name.split("/")
            if member.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
                fail(f"{name} is not a scalebox release (unsafe member {member.name[:200]!r})")
            if top is None:
                top = parts[0]
                if not (top.startswith("scalebox-") and SAFE.fullmatch(top[len("scalebox-") :])):
                    fail(f"{name} is not a scalebox release (top directory {top[:100]!r})")
                if not top.endswith("-" + arch):
                    fail(f"the release is for {top.rsplit('-', 1)[-1]}, this machine is {arch}",
                         f"use the release built for {arch}")
            elif parts[0] != top:
                fail(f"{name} has more than one top directory ({top!r}, {parts[0][:100]!r})")
            yield archive, member, parts


def guarded(action):
    try:
        action()
    except MemoryError:
        fail(f"{os.path.basename(sys.argv[2])} needs more than {_cap >> 20} MiB to read (a hostile tar header?)")
    except RecursionError:
        fail("RELEASE.json is nested too deeply to read", HOSTILE)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        fail(f"{sys.argv[2]} is not a readable release tarball ({exc})")


def read_manifest(path):
    with open(path, "rb") as f:
        data = json.loads(f.read(MAX_MANIFEST + 1))
    if not isinstance(data, dict):
        fail("RELEASE.json is not a JSON object", HOSTILE)
    return data


def signed(tarball, out, arch):
    """Copy RELEASE.json and its signature out of the tarball, nothing else."""
    found = {}
    for archive, member, parts in walk(tarball, arch):
        rel = "/".join(parts[1:])
        if rel not in ("RELEASE.json", "RELEASE.json.sig"):
            continue
        if rel in found:
            fail(f"the tarball holds {rel} twice", HOSTILE)
        limit = MAX_MANIFEST if rel == "RELEASE.json" else MAX_SIGNATURE
        if not member.isreg() or member.size > limit:
            fail(f"{rel} in the tarball is not a regular file of at most {limit} bytes", HOSTILE)
        found[rel] = archive.extractfile(member).read(limit + 1)
    for rel in ("RELEASE.json", "RELEASE.json.sig"):
        if rel not in found:
            fail(f"the tarball has no {rel}: it is not a signed scalebox release")
        with open(os.path.join(out, rel), "xb") as f:
            f.write(found[rel])


def importable(wheel):
    here = "cp%d%d" % sys.version_info[:2]
    try:
        py, abi = wheel[:-4].split("-")[-3:-1]
    except ValueError:
        return False
    tags = py.split(".")
    if "py3" in tags or here in tags:
        return True
    return abi == "abi3" and any(
        re.fullmatch(r"cp3\d+", t) and int(t[3:]) <= int(here[3:]) for t in tags
    )


def wheels(tarball, site, arch, manifest=None):
    """Unzip the wheels this Python imports into site; with a signed manifest, only those
    whose sha256 it lists."""
    files, top = None, None
    if manifest is not None:
        data = read_manifest(manifest)
        files, version = data.get("files"), data.get("version")
        if not isinstance(files, dict) or not isinstance(version, str) or not SAFE.fullmatch(version):
            fail("the signed RELEASE.json has no valid version and files", HOSTILE)
        top = f"scalebox-{version}-{arch}"
    store = site + ".wheels"
    os.makedirs(store, mode=0o700)
    seen = set()
    for archive, member, parts in walk(tarball, arch):
        if top is not None and parts[0] != top:
            fail(f"the tarball's top directory {parts[0]!r} is not {top!r}, as its signed RELEASE.json says", HOSTILE)
        if not (member.isreg() and len(parts) == 3 and parts[1] == "wheels"):
            continue
        name = parts[2]
        if not name.endswith(".whl") or not importable(name):
            continue
        rel = "wheels/" + name
        if name in seen:
            fail(f"the tarball holds {rel} twice", HOSTILE)
        seen.add(name)
        if files is not None and rel not in files:
            fail(f"{rel} is not listed in the signed RELEASE.json", HOSTILE)
        if member.size > MAX_WHEEL:
            fail(f"{rel} is larger than {MAX_WHEEL >> 20} MiB")
        digest = hashlib.sha256()
        path = os.path.join(store, name)
        source = archive.extractfile(member)
        with open(path, "xb") as out:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if files is not None and digest.hexdigest() != files[rel]:
            fail(f"{rel} does not match the signed RELEASE.json (sha256 {digest.hexdigest()[:16]}...)",
                 "the file was changed after signing; " + AGAIN)
        with zipfile.ZipFile(path) as wheel:
            wheel.extractall(site)  # extractall drops absolute and '..' parts
    if not seen:
        fail(f"the tarball holds no wheels for Python {sys.version_info[0]}.{sys.version_info[1]}")


def names(manifest):
    """The version, the programs and the units, each a plain name of ours, one line each."""
    data = read_manifest(manifest)
    version = data.get("version")
    if not isinstance(version, str) or not SAFE.fullmatch(version):
        fail("RELEASE.json's version is not a plain name", HOSTILE)
    listed = {}
    for key, kind, pattern in (("entry_points", "program", PROGRAM), ("units", "unit", UNIT)):
        value = data.get(key)
        if not isinstance(value, list) or not value:
            fail(f"RELEASE.json's {key} is not a list of names", HOSTILE)
        folded = {}
        for item in value:
            if not isinstance(item, str) or not pattern.fullmatch(item):
                fail(f"RELEASE.json lists the {kind} {str(item)[:100]!r}, which is not a plain "
                     f"scalebox {kind} name", HOSTILE)
            if item.casefold() in folded:
                fail(f"RELEASE.json lists the {kind}s {folded[item.casefold()]!r} and {item!r}, "
                     "which are the same name ignoring case", HOSTILE)
            folded[item.casefold()] = item
        listed[key] = value
    print(version)
    print(" ".join(listed["entry_points"]))
    print(" ".join(listed["units"]))


def tools(wheels_dir, out):
    """For a release scalebox-update can stage: wheel_install.py from its own scalebox wheel
    into out, and its installer and packaging wheels printed as one PYTHONPATH. Nothing
    printed for a release without them (one older than 0.2.0: built with pip)."""
    names = sorted(os.listdir(wheels_dir))

    def newest(project):
        found = [n for n in names if n.startswith(project + "-") and n.endswith("-py3-none-any.whl")]
        return os.path.join(wheels_dir, found[-1]) if found else None

    ours = [n for n in names if n.startswith("scalebox-") and n.endswith(".whl")]
    path = [newest("installer"), newest("packaging")]
    if None in path or len(ours) != 1:
        return
    with zipfile.ZipFile(os.path.join(wheels_dir, ours[0])) as wheel:
        try:
            script = wheel.read("scalebox/update/wheel_install.py")
        except KeyError:
            return
    with open(out, "xb") as f:
        f.write(script)
    print(os.pathsep.join(path))


COMMANDS = {"signed": signed, "wheels": wheels, "names": names, "tools": tools}
guarded(lambda: COMMANDS[sys.argv[1]](*sys.argv[2:]))
PY
reader() { python3 -I "$WORK/reader.py" "$@"; }

need_openssl() {
  command -v openssl >/dev/null || die "openssl is not installed; install.sh needs it to check the release against $1 with code that does not come from the release; nothing was changed" \
    "apt-get install openssl (the Debian package openssl), then run install.sh again"
}

# --- which keys the release must be signed by ----------------------------------

TRUST_DIR=""
if [[ -n $KEY_FILE ]]; then
  [[ -f $KEY_FILE && -r $KEY_FILE ]] || die "the key $KEY_FILE does not exist or is not a readable file; nothing was changed" \
    "give the release-signing public key (PEM): --key /path/to/release.pub"
  need_openssl "the key $KEY_FILE"
  mkdir -m 0700 "$WORK/pinned"
  # A copy: the key that is checked is the key that gets installed.
  head -c 65537 -- "$KEY_FILE" >"$WORK/pinned/release.pub"
  key_text=""
  if [[ $(stat -c %s "$WORK/pinned/release.pub") -le 65536 ]]; then
    key_text=$(openssl pkey -pubin -in "$WORK/pinned/release.pub" -noout -text 2>/dev/null || true)
  fi
  [[ $key_text == "ED25519 Public-Key:"* ]] || die "$KEY_FILE is not an ed25519 public key in PEM form; nothing was changed" \
    "use the release-signing key's .pub file (it begins with -----BEGIN PUBLIC KEY-----; ./do keygen makes keys/release.pub)"
  TRUST_DIR=$WORK/pinned
else
  shopt -s nullglob
  trusted=("$KEYS"/*.pub)
  shopt -u nullglob
  if [[ ${#trusted[@]} -gt 0 ]]; then TRUST_DIR=$KEYS; fi
fi
if [[ -n $TRUST_DIR ]]; then
  TRUST=(--trusted-keys "$TRUST_DIR")
else
  TRUST=(--trust-shipped-key)
fi

# --- the verifier: never code from this tarball that no trusted key vouched for ---

# An installed release's own verifier is already trusted. On a first install the
# one shipped in the tarball runs, from its wheels unzipped into a scratch
# directory (no venv, no pip, about a second) -- but when a key is trusted, only
# after openssl found RELEASE.json signed by that key and every wheel to import
# matches its sha256 there.
if [[ -x $OPT/current/venv/bin/python ]] &&
  "$OPT/current/venv/bin/python" -I -c 'import scalebox.release.verify' 2>/dev/null; then
  VERIFY=("$OPT/current/venv/bin/python" -I -m scalebox.release.verify)
else
  SIGNED=()
  if [[ -n $TRUST_DIR ]]; then
    if [[ -n $KEY_FILE ]]; then what="the key $KEY_FILE"; else what="the keys in $KEYS"; fi
    need_openssl "$what"
    log "checking the signature of RELEASE.json in $(basename "$TARBALL") with openssl against $what"
    mkdir -m 0700 "$WORK/signed"
    reader signed "$TARBALL" "$WORK/signed" "$ARCH" || exit 1
    signer=""
    tried=()
    for key in "$TRUST_DIR"/*.pub; do
      shown=$key
      if [[ -n $KEY_FILE ]]; then shown=$KEY_FILE; fi
      tried+=("$shown")
      if openssl pkeyutl -verify -pubin -inkey "$key" -rawin -in "$WORK/signed/RELEASE.json" \
        -sigfile "$WORK/signed/RELEASE.json.sig" >/dev/null 2>&1; then
        signer=$shown
        break
      fi
    done
    [[ -n $signer ]] || die "$(basename "$TARBALL") is not signed by a trusted key (tried ${tried[*]}); nothing was changed" \
      "get the release from its publisher again; if the publisher really changed keys, check the new key's fingerprint with them, then pin it: sudo bash install.sh --key NEW.pub TARBALL"
    log "RELEASE.json is signed by $signer"
    SIGNED=("$WORK/signed/RELEASE.json")
  fi
  log "unpacking the verifier from $(basename "$TARBALL")"
  reader wheels "$TARBALL" "$WORK/site" "$ARCH" "${SIGNED[@]}" || exit 1
  VERIFY=(python3 -I -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from scalebox.release.verify import main; sys.exit(main(sys.argv[1:]))' "$WORK/site")
fi

log "verifying $(basename "$TARBALL")"
VERSION=$("${VERIFY[@]}" "$TARBALL" "$WORK/release" "${TRUST[@]}") ||
  die "the release tarball failed verification (reason above); nothing was changed" \
    "get the release again from a trusted source"
[[ $VERSION =~ ^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$ ]] ||
  die "the verifier reported the version '${VERSION:0:80}', which is not a plain name; nothing was changed" \
    "do not install this release; report it to its publisher"
REL=$WORK/release/scalebox-$VERSION-$ARCH
[[ -f $REL/RELEASE.json ]] || die "the verifier reported version '$VERSION' but $REL is missing" \
  "report this as a bug in scalebox.release.verify"
if [[ -z $TRUST_DIR ]]; then
  log "verified scalebox $VERSION with the key shipped in the tarball (first install, no key pinned: trust on first use)"
elif [[ -n $KEY_FILE ]]; then
  log "verified scalebox $VERSION, signed by the pinned key $KEY_FILE"
else
  log "verified scalebox $VERSION, signed by a key trusted in $KEYS"
fi

# Names from the manifest become paths: each must be a plain name of ours.
NAMES=$(reader names "$REL/RELEASE.json") || exit 1
mapfile -t lines <<<"$NAMES"
[[ ${lines[0]} == "$VERSION" ]] || die "RELEASE.json says version ${lines[0]} but the verifier reported $VERSION; nothing was changed" \
  "report this as a bug in scalebox.release.verify"
read -r -a PROGRAMS <<<"${lines[1]}"
read -r -a UNITS <<<"${lines[2]}"
for unit in "${UNITS[@]}"; do
  [[ -f $REL/units/$unit && ! -L $REL/units/$unit ]] || die "the release lists the unit $unit but has no file units/$unit; nothing was changed" \
    "the release is incomplete; get it again"
done

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
  install -d -m 0755 "$OPT" "$OPT/releases" "$RELEASE_DIR"
  # Built as scalebox-update stages a release: the release's own wheel_install.py and its
  # installer and packaging wheels, into a venv without pip (the same files as pip, a .pyc
  # per module, in about a second), then a record of every file, so that the first update
  # shares what it can with this release. A release without them is built with pip.
  TOOLS=$(reader tools "$REL/wheels" "$WORK/wheel_install.py") || exit 1
  if [[ -n $TOOLS ]]; then
    python3 -I -m venv --without-pip "$RELEASE_DIR/venv"
    no_python_env=()
    for name in $(compgen -e); do
      if [[ $name == PYTHON* ]]; then no_python_env+=(-u "$name"); fi
    done
    env "${no_python_env[@]}" PYTHONPATH="$TOOLS" "$RELEASE_DIR/venv/bin/python" -s \
      "$WORK/wheel_install.py" "$REL/wheels" "scalebox==$VERSION" >/dev/null
  else
    python3 -I -m venv "$RELEASE_DIR/venv"
    "$RELEASE_DIR/venv/bin/pip" install --isolated --quiet --no-index --find-links "$REL/wheels" "scalebox==$VERSION"
  fi
  for name in "${PROGRAMS[@]}"; do
    [[ -x $RELEASE_DIR/venv/bin/$name ]] || die "the release's venv has no program $name" \
      "the release is broken; report it"
  done
  # Only the units RELEASE.json lists; any other file under units/ stays behind.
  install -d -m 0755 "$RELEASE_DIR/units"
  for unit in "${UNITS[@]}"; do
    install -m 0644 "$REL/units/$unit" "$RELEASE_DIR/units/$unit"
  done
  if [[ -d $REL/docs ]]; then # what the units' Documentation= names
    install -d -m 0755 "$RELEASE_DIR/docs"
    install -m 0644 "$REL"/docs/*.md "$RELEASE_DIR/docs/"
  fi
  install -m 0644 "$REL/RELEASE.json" "$REL/RELEASE.json.sig" "$RELEASE_DIR/"
  if [[ -n $TOOLS ]]; then
    why=$("$RELEASE_DIR/venv/bin/python" -I -c '
import sys
from pathlib import Path
from scalebox.update import stage
if not hasattr(stage, "write_record"):
    sys.exit(0)  # a release from before records: its first update compiles every .pyc
try:
    stage.write_record(Path(sys.argv[1]))
except Exception as exc:  # one line for the operator, whatever failed
    print(str(exc) or type(exc).__name__)
    sys.exit(1)
' "$RELEASE_DIR") || die "cannot record the files of $RELEASE_DIR: ${why:-its Python failed, see above}" \
      "check the disk (df -h $OPT: full? read-only?) and run install.sh again; the unfinished release is removed"
  fi
  sync
  : >"$RELEASE_DIR/.complete" # last: a release directory without it is unfinished
  sync
  CHANGED=1 # BUILDING stays set until the config check passed: a refused config leaves no trace
fi

if [[ ! -e $CONFIG ]]; then
  log "writing $CONFIG with a new API token"
  token=$(python3 -I -c 'import secrets; print("sb-" + secrets.token_hex(24))')
  host_ip=$(python3 -I - <<'PY'
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
  install -d -m 0755 "$CONFIG_DIR"
  tmp_config=$(mktemp "$CONFIG_DIR/.config.XXXXXX")
  cat >"$tmp_config" <<EOF
# /etc/scaleboxd/config: settings of scaleboxd, KEY=VALUE, one per line.
# Written once by install.sh; install.sh and scalebox-update never overwrite it.
# Mode 0600: it holds the API token. After a change: systemctl restart scaleboxd
#
# Keys and their defaults (uncomment a line to change it):
#   API_PORT=8080                  the API port (install.sh and scalebox-update make
#                                  scaleboxd.socket listen on it)
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
#   VM_NETWORK=10.187.0.0/16       nspawn: each VM gets a /30 of it
#   VM_PIDS_MAX=4096               nspawn: most processes in one VM
#   HOST_IP=<detected>             the address shown in VMs' ssh commands
API_TOKEN=$token
HOST_IP=$host_ip
# nspawn: each VM a container you ssh into. process: stand-ins for API tests only.
VM_BACKEND=${BACKEND:-nspawn}
EOF
  chmod 0600 "$tmp_config"
  mv -f "$tmp_config" "$CONFIG"
  CHANGED=1
fi
"$RELEASE_DIR/venv/bin/scaleboxd" --check-config "$CONFIG" >/dev/null ||
  die "scaleboxd $VERSION refuses the config $CONFIG (reason above)" \
    "fix $CONFIG and run install.sh again; nothing was switched yet"
BUILDING=""

# --- the VM backend: its packages and the template debian-base ----------------

# What scaleboxd will run, read by its own code (the key, else the default).
USED=$("$RELEASE_DIR/venv/bin/python" -I -c 'import sys; from pathlib import Path; from scalebox.config import load; print(load(Path(sys.argv[1]), {}).vm_backend)' "$CONFIG") ||
  die "cannot read VM_BACKEND from $CONFIG (reason above)" "fix $CONFIG and run install.sh again"
if [[ -n $BACKEND && $BACKEND != "$USED" ]]; then
  die "$CONFIG runs VMs on the $USED backend (its VM_BACKEND, or the default), not $BACKEND as --backend asks; nothing was switched yet" \
    "set VM_BACKEND=$BACKEND in $CONFIG, or leave --backend out, then run install.sh again"
fi
if [[ $USED == process ]]; then
  log "VM_BACKEND=process: stand-in VMs for API tests; no container packages or template needed"
elif [[ -n $R ]]; then
  log "SCALEBOX_INSTALL_ROOT=$R: skipping the nspawn backend's packages and template"
else
  wanted=(systemd-container openssh-client nftables e2fsprogs) # e2fsprogs: mkfs.ext4 for VM disks
  status_cmd=("$RELEASE_DIR/venv/bin/python" -I -m scalebox.daemon.vms.templates status --config "$CONFIG")
  template_state=$("${status_cmd[@]}" 2>&1) && template_current=1 || template_current=0
  if ((!template_current)) && [[ -z $TEMPLATE_FILE ]]; then wanted+=(debootstrap); fi
  missing=()
  for pkg in "${wanted[@]}"; do
    if [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true) != ii* ]]; then missing+=("$pkg"); fi
  done
  if ((${#missing[@]})); then
    log "installing the packages the nspawn backend needs: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" ||
      die "apt-get could not install ${missing[*]} (reason above); nothing was switched yet" \
        "run apt-get update, or install those packages from .deb files with dpkg -i, then run install.sh again; without a mirror, a prebuilt template (--template FILE) spares debootstrap"
    CHANGED=1
  fi
  if ((template_current)); then
    log "$template_state"
  else
    templates=("$RELEASE_DIR/venv/bin/python" -I -m scalebox.daemon.vms.templates)
    if [[ -n $TEMPLATE_FILE ]]; then
      log "installing the template debian-base from $TEMPLATE_FILE"
      "${templates[@]}" install "$TEMPLATE_FILE" --config "$CONFIG" ||
        die "could not install the template $TEMPLATE_FILE (reason above); nothing was switched yet" \
          "give a template made by this release: python -m scalebox.daemon.vms.templates build FILE"
    else
      # Built under DATA_DIR, not /tmp: debootstrap refuses a nodev /tmp.
      log "building the template debian-base with debootstrap (Debian 12, a minute or two)"
      "${templates[@]}" rebuild --config "$CONFIG" ||
        die "could not build the template debian-base with debootstrap (reason above); nothing was switched yet" \
          "without a reachable Debian mirror, build it where there is one (python -m scalebox.daemon.vms.templates build debian-base.tar.gz), copy it here and run: sudo bash install.sh --template debian-base.tar.gz"
    fi
    CHANGED=1
  fi
fi

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
SOCKET_CHANGED=0
for name in "${UNITS[@]}"; do # only the units RELEASE.json lists
  unit=$REL/units/$name
  if ! cmp -s "$unit" "$UNIT_DIR/$name"; then
    log "installing $UNIT_DIR/$name"
    install -m 0644 "$unit" "$UNIT_DIR/.$name.tmp"
    mv -f "$UNIT_DIR/.$name.tmp" "$UNIT_DIR/$name"
    UNITS_CHANGED=1
    CHANGED=1
    if [[ $name == scaleboxd.socket ]]; then SOCKET_CHANGED=1; fi
  fi
done

# scaleboxd.socket listens on the config's API_PORT: the release's own code
# writes the drop-in, as every update does (scalebox.update.socket_port), and
# says the port.
port_state=$("$RELEASE_DIR/venv/bin/python" -I -m scalebox.update.socket_port --root "${R:-/}") ||
  die "cannot make scaleboxd.socket listen on the API_PORT of $CONFIG (reason above)" \
    "fix API_PORT in $CONFIG, then run install.sh again"
API_PORT=${port_state%% *}
if [[ $port_state == *" changed" ]]; then
  log "scaleboxd.socket listens on port $API_PORT, the API_PORT of $CONFIG ($UNIT_DIR/scaleboxd.socket.d/port.conf)"
  UNITS_CHANGED=1
  SOCKET_CHANGED=1
  CHANGED=1
fi

if [[ -n $KEY_FILE ]]; then
  shopt -s nullglob
  present=("$KEYS"/*.pub)
  shopt -u nullglob
  pinned_as=""
  for key in "${present[@]}"; do
    if cmp -s "$key" "$WORK/pinned/release.pub"; then pinned_as=$key; fi
  done
  if [[ -z $pinned_as ]]; then
    pinned_as=$KEYS/release.pub
    if [[ -e $pinned_as ]]; then
      pinned_as=$KEYS/pinned-$(sha256sum "$WORK/pinned/release.pub" | cut -c1-16).pub
    fi
    log "trusting the pinned key $KEY_FILE as $pinned_as for future updates"
    install -d -m 0755 "$R/etc/scalebox" "$KEYS"
    install -m 0644 "$WORK/pinned/release.pub" "$pinned_as"
    CHANGED=1
  fi
elif [[ -z $TRUST_DIR ]]; then
  log "trusting the release key shipped in the tarball as $KEYS/release.pub for future updates (trust on first use)"
  install -d -m 0755 "$R/etc/scalebox" "$KEYS"
  install -m 0644 "$REL/keys/release.pub" "$KEYS/release.pub"
  CHANGED=1
fi

if [[ $(cat "$CONFIG_DIR/version" 2>/dev/null || true) != "$VERSION" ]]; then
  printf '%s\n' "$VERSION" >"$CONFIG_DIR/.version.tmp"
  chmod 0644 "$CONFIG_DIR/.version.tmp"
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
  if ((SOCKET_CHANGED)) && systemctl is-active --quiet scaleboxd.socket; then
    # A new port or socket unit: systemd applies it only when the socket restarts.
    log "restarting scaleboxd.socket (it listens on port $API_PORT)"
    systemctl restart scaleboxd.socket
  fi
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
  python3 -I - "http://127.0.0.1:$API_PORT/health" "$VERSION" "$HEALTH_TIMEOUT" <<'PY' ||
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
