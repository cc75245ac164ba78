# shellcheck shell=bash
# Shared by the ci/ scripts (sourced, not run).

# Runs "$@" in the nested testbed where this host's KVM cannot run a Linux guest, directly otherwise.
# The testbed sees the host's root read-only, but mounts fresh /tmp and /run: a checkout living under
# them (CI may clone there) is shared into the testbed instead.
# TESTBED_EXTRA_ARGS adds options of `ci/testbed run` (e.g. "--scratch 2G").
in_guest_capable_kvm() {
    local repo share=() extra=()
    repo=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
    case "$repo" in /tmp/* | /run/*) share=(--share "$repo") ;; esac
    read -ra extra <<<"${TESTBED_EXTRA_ARGS:-}"
    if ! ci/testbed needed 2>/dev/null; then
        "$@"
        return
    fi
    # The outer VM's kernel (6.1 on TCG's multi-threaded emulation) panics (a kernel stack overflow
    # under KVM_RUN, an int3 left by code patching) or freezes (a soft lockup in KVM_RUN, or with no
    # nested guest at all; the testbed's watchdog kills it) every few hundred nested boots, which
    # says nothing of the command. Such a run is repeated, up to twice, and says so.
    local console rc attempt
    console=$(mktemp -t rund-testbed-console.XXXXXX)
    for attempt in 1 2 3; do
        rc=0
        ci/testbed run "${share[@]}" "${extra[@]}" --console-log "$console" \
            --timeout "${TESTBED_TIMEOUT:-2400}" -- "$@" || rc=$?
        if ((rc == 125 && attempt < 3)) && grep -qE 'Kernel panic|testbed-watchdog:' "$console"; then
            # The oops' first lines (the tail printed above is mostly its register dump).
            grep -m1 -A24 -E 'BUG:|Oops:|double fault|stack guard' "$console" | sed 's/^/  oops: /' >&2 || true
            echo "ci: the testbed's outer VM panicked or froze (above): running '$*' once more" >&2
            continue
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
