# Sourced by scripts/test: starts a throwaway PostgreSQL server on 127.0.0.1 for the fleet tests
# (tests/fleet_postgres.rs), exports its URL as S2S_POSTGRES_URL and stops it when the shell exits.
# Installs Debian's `postgresql` when no server binaries are found. With S2S_POSTGRES_URL already set,
# that server is used instead (the tests create and drop a database of their own in it).

start_test_postgres() {
    if [[ -n "${S2S_POSTGRES_URL:-}" ]]; then
        echo "scripts/test: using PostgreSQL at S2S_POSTGRES_URL"
        return
    fi
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    local bindir
    bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [[ -z "$bindir" || ! -x "$bindir/initdb" ]]; then
        echo "scripts/test: installing Debian's postgresql"
        export DEBIAN_FRONTEND=noninteractive
        "${sudo[@]}" apt-get install -y -q postgresql >/dev/null 2>&1 ||
            { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q postgresql >/dev/null; }
        bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    fi
    [[ -x "$bindir/initdb" ]] || {
        echo "scripts/test: no PostgreSQL server binaries after installing postgresql" >&2
        exit 1
    }

    S2S_PG_DIR="$(mktemp -d /tmp/s2s-authz-pg.XXXXXX)"
    # PostgreSQL refuses to run as root: run it as the `postgres` user the Debian package creates.
    S2S_PG_AS=()
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres:postgres "$S2S_PG_DIR"
        S2S_PG_AS=(runuser -u postgres --)
    fi
    local port
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "${S2S_PG_AS[@]}" "$bindir/initdb" -D "$S2S_PG_DIR/data" -U postgres --auth=trust --encoding=UTF8 \
        --locale=C >"$S2S_PG_DIR/initdb.log" 2>&1 || {
        cat "$S2S_PG_DIR/initdb.log" >&2
        exit 1
    }
    S2S_PG_CTL="$bindir/pg_ctl"
    trap stop_test_postgres EXIT
    "${S2S_PG_AS[@]}" "$S2S_PG_CTL" -D "$S2S_PG_DIR/data" -l "$S2S_PG_DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $S2S_PG_DIR -c max_connections=200" start >/dev/null || {
        cat "$S2S_PG_DIR/server.log" >&2
        exit 1
    }
    export S2S_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
    echo "scripts/test: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
}

stop_test_postgres() {
    if [[ -n "${S2S_PG_DIR:-}" && -d "$S2S_PG_DIR/data" ]]; then
        "${S2S_PG_AS[@]}" "$S2S_PG_CTL" -D "$S2S_PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$S2S_PG_DIR"
    fi
}
