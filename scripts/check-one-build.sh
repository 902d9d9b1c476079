#!/usr/bin/env bash
# One build of the engine for demo, test, bench and lint (issue #28).
#
# Cargo compiles a dependency once per feature set, and everything above it once per feature set
# of what it depends on. `make demo` (`cargo build -p sluice-sidecar`), `make test`
# (`cargo test --workspace`, dev-dependencies included), `make bench` (`cargo bench --profile dev
# --workspace`) and `make lint` (`cargo clippy --workspace --all-targets`) must therefore resolve
# the same features for every third-party package, or the second command rebuilds mistral.rs and
# candle. This compares the resolutions with `cargo tree` (no compiling, about a second): it
# exits 1 and names each package and the features that differ when they drift apart. The fix is
# in the workspace Cargo.toml ("One build of the engine").
#
# `cargo tree` resolves features as the build does: for the packages selected (-p / --workspace),
# for the host platform, and with dev-dependencies exactly when it shows them (`-e ...,dev`: as
# `cargo test`/`bench`/`clippy --all-targets`; `-e normal,build`: as `cargo build`/`run`).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# resolve NAME ARGS...: one "package|features" line per package (and per feature set: a build
# dependency can be resolved apart from the same package's normal use).
resolve() {
    local name=$1
    shift
    "$CARGO" tree --locked --quiet "$@" --prefix none --format '{p}|{f}' >"$tmp/$name.raw"
    sed 's/ (\*)$//' "$tmp/$name.raw" | grep -F '|' | sort -u >"$tmp/$name"
}

# compare A B: one line per package both resolve with different features, naming the features
# only one side turns on (or both sides' feature sets, where a package is resolved more than once
# and several of them differ).
compare() {
    awk -F'|' -v a="$1" -v b="$2" '
        { side = (NR == FNR) ? a : b; n = ++count[side, $1]; set[side, $1, n] = $2; pkgs[$1] = 1 }
        # the feature sets x resolves for p and y does not: how many, and the last one in lone
        function rest(x, y, p,    i, j, found, k) {
            k = 0
            for (i = 1; i <= count[x, p]; i++) {
                found = 0
                for (j = 1; j <= count[y, p]; j++) if (set[x, p, i] == set[y, p, j]) found = 1
                if (!found) { k++; lone = set[x, p, i] }
            }
            return k
        }
        # the features of set s that set t lacks
        function minus(s, t,    f, g, i, j, m, has, out) {
            m = split(s, f, ","); split(t, g, ",")
            for (j in g) has[g[j]] = 1
            out = ""
            for (i = 1; i <= m; i++) if (f[i] != "" && !(f[i] in has)) out = out (out == "" ? "" : ",") f[i]
            return out == "" ? "-" : out
        }
        function all(x, p,    i, out) {
            out = ""
            for (i = 1; i <= count[x, p]; i++) out = out (i > 1 ? " + " : "") "[" set[x, p, i] "]"
            return out
        }
        END {
            for (p in pkgs) {
                if (!count[a, p] || !count[b, p]) continue
                na = rest(a, b, p); sa = lone; nb = rest(b, a, p); sb = lone
                if (na == 0 && nb == 0) continue
                if (na == 1 && nb == 1)
                    printf "  %s: only %s: %s; only %s: %s\n", p, a, minus(sa, sb), b, minus(sb, sa)
                else
                    printf "  %s: %s %s; %s %s\n", p, a, all(a, p), b, all(b, p)
            }
        }' "$tmp/$1" "$tmp/$2" | sort
}

# demo: cargo build -p sluice-sidecar. build: cargo build --workspace (--bins), and
# cargo run --bin X from the root. test: cargo test --workspace, cargo bench --workspace,
# cargo clippy --workspace --all-targets (the same resolution: all members, dev-dependencies on).
resolve demo -p sluice-sidecar -e normal,build
resolve build --workspace -e normal,build
resolve test --workspace -e normal,build,dev

status=0
for pair in "demo test" "build test"; do
    set -- $pair
    drift=$(compare "$1" "$2")
    if [ -n "$drift" ]; then
        echo "check-one-build: '$1' and '$2' resolve different features for:" >&2
        echo "$drift" >&2
        status=1
    fi
done
if [ "$status" -ne 0 ]; then
    echo "check-one-build: turn those features on in the normal dependencies (workspace Cargo.toml," \
        "\"One build of the engine\"), or the engine is compiled twice." >&2
    exit 1
fi
echo "check-one-build: demo, build, test, bench and lint resolve one feature set per package" \
    "($(cut -d'|' -f1 "$tmp/demo" | sort -u | wc -l) in the demo build)."
