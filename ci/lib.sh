# shellcheck shell=bash
# Shared by the ci/ scripts (sourced, not run).

# The `ci/testbed run` options that make checkout $1 visible inside, one per line: the testbed
# sees the host's root read-only but mounts fresh /tmp and /run, so a checkout living under them
# (CI may clone there) is shared.
testbed_repo_share() {
    case $1 in /tmp/* | /run/*) printf '%s\n' --share "$1" ;; esac
}

# Prints the first lines of the outer kernel's oops (or the watchdog's or lockup's line) in
# console log $1 to stderr: the tail of a console is mostly a register dump.
print_oops() {
    grep -m1 -A24 -E 'BUG:|Oops:|double fault|stack guard|soft lockup|testbed-watchdog' "$1" |
        sed 's/^/  oops: /' >&2 || true
}

# Runs "$@" in the nested testbed where this host's KVM cannot run a Linux guest, directly otherwise.
# TESTBED_EXTRA_ARGS adds options of `ci/testbed run` (e.g. "--scratch 2G").
in_guest_capable_kvm() {
    local repo share=() extra=()
    repo=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
    mapfile -t share < <(testbed_repo_share "$repo")
    read -ra extra <<<"${TESTBED_EXTRA_ARGS:-}"
    if ! ci/testbed needed 2>/dev/null; then
        "$@"
        return
    fi
    # The outer VM's kernel (6.1 on TCG's multi-threaded emulation) panics (a kernel stack overflow
    # under KVM_RUN, an int3 left by code patching) or freezes (a soft lockup in KVM_RUN, or with no
    # nested guest at all; the testbed's watchdog kills it) every few hundred nested boots, which
    # says nothing of the command. Such a run is made up to $TESTBED_ATTEMPTS times (default 3), and
    # says so.
    local console rc attempt attempts=${TESTBED_ATTEMPTS:-3}
    console=$(mktemp -t rund-testbed-console.XXXXXX)
    for ((attempt = 1; attempt <= attempts; attempt++)); do
        rc=0
        ci/testbed run "${share[@]}" "${extra[@]}" --console-log "$console" \
            --timeout "${TESTBED_TIMEOUT:-2400}" -- "$@" || rc=$?
        if ((rc == 125)) && grep -qE 'Kernel panic|testbed-watchdog:' "$console"; then
            print_oops "$console"
            if ((attempt < attempts)); then
                echo "ci: the testbed's outer VM panicked or froze (above): running '$*' once more" >&2
                continue
            fi
            echo "ci: the testbed's outer VM panicked or froze (above)" >&2
        fi
        break
    done
    rm -f "$console"
    return "$rc"
}

# Paths of the executables cargo builds for `cargo "$@" --no-run` (e.g. `test -p x --test y`,
# `bench -p x --bench y`), one per line.
cargo_executables() {
    cargo "$@" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and (m["profile"]["test"] or m["target"]["kind"] == ["bench"]):
        print(m["executable"])'
}
