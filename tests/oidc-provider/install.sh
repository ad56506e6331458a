#!/usr/bin/env bash
# Installs the pinned npm packages of the oidc-provider test fixture (package.json, package-lock.json)
# into tests/oidc-provider/node_modules with `npm ci`, once: a second run with the same lockfile, the
# pinned oidc-provider in place and the same Node.js major does nothing. Needs Node.js >= 18.12 and npm.
#
# tests/oidc_provider.rs then runs with
#   S2S_NODE=$(command -v node) S2S_OIDC_PROVIDER_DIR=<repo>/tests/oidc-provider
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

say() { echo "oidc-provider/install.sh: $*"; }
die() {
    echo "oidc-provider/install.sh: $*" >&2
    exit 1
}

command -v node >/dev/null 2>&1 || die "node not found on PATH (Debian: apt-get install nodejs npm)"
command -v npm >/dev/null 2>&1 || die "npm not found on PATH (Debian: apt-get install npm)"

node_version="$(node --version)" # v20.20.2
node_major="${node_version#v}"
node_major="${node_major%%.*}"
[[ "$node_major" =~ ^[0-9]+$ && "$node_major" -ge 18 ]] || die "Node.js $node_version is too old: oidc-provider 8 needs 18.12 or later"

# The exact version package.json pins (the lockfile pins it and every transitive dependency).
pinned="$(node -p 'require("./package.json").dependencies["oidc-provider"]')"
[[ "$pinned" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "package.json must pin an exact oidc-provider version, not '$pinned'"

lock_sum="$(sha256sum package-lock.json | cut -d' ' -f1)"
stamp="node_modules/.s2s-installed"
want="oidc-provider=$pinned lock=$lock_sum node-major=$node_major"

installed=""
if [[ -f node_modules/oidc-provider/package.json ]]; then
    installed="$(node -p 'require("./node_modules/oidc-provider/package.json").version' 2>/dev/null || true)"
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && "$installed" == "$pinned" ]]; then
    say "oidc-provider $pinned already installed in $here/node_modules (node $node_version); nothing to do"
    exit 0
fi

if [[ -n "$installed" ]]; then
    say "reinstalling: found oidc-provider ${installed} (or a different lockfile or Node.js major), want $pinned"
else
    say "installing oidc-provider $pinned with npm ci into $here/node_modules (node $node_version, npm $(npm --version))"
fi
# No dependency needs an install script; running none keeps the install to unpacking pinned tarballs.
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

installed="$(node -p 'require("./node_modules/oidc-provider/package.json").version')"
[[ "$installed" == "$pinned" ]] || die "npm ci installed oidc-provider $installed, not $pinned"
# The fixture must at least load (ESM import of the package) on this Node.js.
node --input-type=module -e 'await import("oidc-provider")' >/dev/null ||
    die "oidc-provider $pinned does not load on Node.js $node_version"
echo "$want" >"$stamp"
packages="$(node -p 'Object.keys(require("./package-lock.json").packages).length - 1')"
say "installed oidc-provider $installed and its dependencies ($packages packages from package-lock.json)"
