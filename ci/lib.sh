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
    if ci/testbed needed 2>/dev/null; then
        ci/testbed run "${share[@]}" "${extra[@]}" --timeout "${TESTBED_TIMEOUT:-2400}" -- "$@"
    else
        "$@"
    fi
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
