# shellcheck shell=bash
# Shared by the ci/ scripts (sourced, not run).

# Runs "$@" in the nested testbed where this host's KVM cannot run a Linux guest, directly otherwise.
# The testbed sees the host's root read-only, but mounts fresh /tmp and /run: a checkout living under
# them (CI may clone there) is shared into the testbed instead.
in_guest_capable_kvm() {
    local repo share=()
    repo=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
    case "$repo" in /tmp/* | /run/*) share=(--share "$repo") ;; esac
    if ci/testbed needed 2>/dev/null; then
        ci/testbed run "${share[@]}" --timeout "${TESTBED_TIMEOUT:-2400}" -- "$@"
    else
        "$@"
    fi
}
