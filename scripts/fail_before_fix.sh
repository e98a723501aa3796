#!/usr/bin/env bash
# fail_before_fix.sh: shows that every issue-18 test fails on the code before its fix
# and passes on this checkout.
#
# What it does
#   1. Makes a git worktree ("before") at BEFORE_REV (default e017d59^, the parent of the
#      first issue-18 fix commit; the fixes are e017d59, a8562f0, def24ca, 90b90fc).
#   2. Puts this checkout's tests on top of it:
#      - the integration test files below are copied verbatim;
#      - scripts/fail_before_fix/unit/*.rs (main's unit tests, verbatim where the old code
#        has the items they use, otherwise adapted and marked so) are appended to the old
#        source files as `mod failfirst`;
#      - four integration files use APIs that the fix added. Each is first compiled verbatim
#        on the old tree (the compile errors are printed), then
#        scripts/fail_before_fix/before-api.patch adapts only their plumbing to the old API
#        (every adaptation is commented "fail_before_fix" in the patch). The patch also
#        adds eight before-only variants (ship.rs, export.rs, node.rs, otlp_export.rs) that
#        check a later part of a multi-part test on its own, because on the old code the
#        test stops at its first failed assertion; in the table their "after" is main's
#        whole test.
#   3. Builds the before tree's test binaries and runs each listed test alone with a time
#      limit (TEST_TIMEOUT, default 420 s); then builds and runs the same on this checkout.
#      Both use ONE target directory (CARGO_TARGET_DIR, default ./target), so the before
#      tests run before this checkout is built (both write target/debug/qatflow).
#   4. Prints per defect: test, result before (with the first line of the failure message),
#      result after; writes the same as TSV to OUT_TSV (default
#      results/reliability/fail_before_fix.tsv).
#   5. Removes the before worktree (also on error or Ctrl-C).
#
# Usage:  scripts/fail_before_fix.sh            (from anywhere inside the checkout)
#   env:  CARGO_TARGET_DIR  BEFORE_REV  BEFORE_DIR (default: a mktemp -d path; an existing
#         worktree there at BEFORE_REV is reused, rewriting only files whose content
#         differs, so a second run does not rebuild the workspace)  KEEP_BEFORE=1 (keep it)
#         TEST_TIMEOUT  OUT_TSV  ONLY (a regex on "defect test" rows, e.g. ONLY='^13 ')
# Needs:  git, cargo (the workspace's toolchain), jq, timeout. Only the package registry is
#         reached (cargo fetches crates the before tree's Cargo.lock names).
# Cost:   two builds of the workspace's CLI/node test binaries and all lib test harnesses
#         (on a 2-core VM with main's dependency builds in the target directory: about
#         8 min each), then about 6 min of "before" tests (mostly waiting on time limits:
#         the old code hangs or never answers) and 1 min of "after" tests.
# Expect: every "before" is FAIL (or DOES NOT COMPILE for a feature the old API lacks),
#         except the "fuzz" rows (new properties that the old code also satisfies); every
#         "after" is ok. The script exits 1 if an "after" is not ok or another "before"
#         passes.
set -euo pipefail

REPO=$(git rev-parse --show-toplevel)
cd "$REPO"
BEFORE_REV=${BEFORE_REV:-e017d59^}
BEFORE_DIR=${BEFORE_DIR:-$(mktemp -d /tmp/failfirst-before.XXXXXX)}
TEST_TIMEOUT=${TEST_TIMEOUT:-420}
OUT_TSV=${OUT_TSV:-$REPO/results/reliability/fail_before_fix.tsv}
ONLY=${ONLY:-.}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
HERE=$REPO/scripts/fail_before_fix
LOGS=$(mktemp -d /tmp/failfirst-logs.XXXXXX)

cleanup() {
    [ "${KEEP_BEFORE:-0}" = 1 ] && return
    git -C "$REPO" worktree remove --force "$BEFORE_DIR" 2>/dev/null || true
    rm -rf "$BEFORE_DIR"
    git -C "$REPO" worktree prune
}
trap cleanup EXIT

# Integration test files copied from this checkout onto the before tree.
COPIED=(
    crates/cli/tests/cli.rs
    crates/cli/tests/export.rs
    crates/cli/tests/node.rs
    crates/shards/tests/ship.rs
    crates/node/tests/security.rs
    crates/teacher/tests/http_backends.rs
    crates/telemetry/tests/otlp_export.rs
)
# Of those, the ones that use APIs added by the fix: target name and file.
ADAPTED=(
    "ship crates/shards/tests/ship.rs"
    "security crates/node/tests/security.rs"
    "http_backends crates/teacher/tests/http_backends.rs"
    "otlp_export crates/telemetry/tests/otlp_export.rs"
)
# Unit tests appended to old source files: overlay -> file.
UNITS=(
    "core_jsonl.rs crates/core/src/jsonl.rs"
    "store_lib.rs crates/store/src/lib.rs"
    "node_config.rs crates/node/src/config.rs"
    "shards_format.rs crates/shards/src/format.rs"
    "teacher_offline.rs crates/teacher/src/backend/offline.rs"
)
# defect | binary (a test target, or lib:<package>) | test before ("-WORD": does not compile
# on the old tree; the compile error naming WORD is shown) | test after ("=": the same name)
TESTS='
1|ship|the_receiver_checks_what_it_imports_with_its_own_gates|=
2|cli|an_unset_token_variable_stops_the_node|=
2|security|a_public_bind_without_a_token_is_refused|=
2|lib:qatflow-node|config::failfirst::an_unset_token_variable_is_an_error_naming_it|config::tests::an_unset_token_variable_is_an_error_naming_it
3|node|status_shows_the_peer_state|=
4|cli|export_follows_symlinks_and_writes_through_special_files|=
5|cli|a_closed_pipe_is_not_a_panic|=
6|http_backends|half_a_line_loses_only_that_line|=
7|cli|nothing_importable_is_unusable_input|=
7|cli|bad_input_never_panics|=
8|cli|a_bad_line_is_reported_by_number_and_the_rest_imported|=
8|lib:qatflow-store|failfirst::an_invalid_item_refuses_the_whole_batch|tests::an_invalid_item_refuses_the_whole_batch
9|cli|a_byte_order_mark_is_accepted|=
9|lib:qatflow-core|jsonl::failfirst::a_leading_byte_order_mark_is_dropped|jsonl::tests::a_leading_byte_order_mark_is_dropped
10|ship|a_shard_whose_content_cannot_be_imported_is_quarantined_and_answered_rejected|=
10|security|a_rejected_shard_is_answered_rejected_for_good|=
10|lib:qatflow-shards|format::failfirst::a_zstd_bomb_stops_at_the_ratio_cap|format::tests::a_zstd_bomb_stops_at_the_ratio_cap
10|ship|a_refused_shard_leaves_no_file_and_is_not_offered_for_commit_again|a_shard_whose_content_cannot_be_imported_is_quarantined_and_answered_rejected
11|export|a_checkpoint_whose_config_disagrees_with_its_tensors_is_refused|=
11|export|a_missing_checkpoint_is_called_missing|a_checkpoint_whose_config_disagrees_with_its_tensors_is_refused
12|cli|the_example_dataset_repeats_no_conversation|=
12|lib:qatflow-store|failfirst::identical_messages_under_other_metadata_are_flagged|tests::identical_messages_under_other_metadata_are_flagged
12|lib:qatflow-teacher|backend::offline::failfirst::no_two_categories_write_the_same_messages|backend::offline::tests::no_two_categories_write_the_same_messages
13|node|sigterm_stops_a_training_node_in_bounded_time|=
14|otlp_export|spans_reach_an_otlp_receiver_with_the_service_name|=
14|otlp_export|spans_reach_an_otlp_receiver_with_the_service_name_at_info|spans_reach_an_otlp_receiver_with_the_service_name
14|node|one_trace_covers_both_nodes|=
14|node|one_trace_covers_both_nodes_at_info|one_trace_covers_both_nodes
14|node|one_trace_covers_both_nodes_at_info_without_the_generation_block|one_trace_covers_both_nodes
14|node|one_trace_covers_both_nodes_at_info_ship_shard_and_kicks_only|one_trace_covers_both_nodes
14|node|one_trace_covers_both_nodes_at_info_idle_kicks_only|one_trace_covers_both_nodes
15|cli|an_endless_line_is_a_clear_error|=
15|lib:qatflow-core|jsonl::failfirst::a_line_without_end_stops_the_reader|jsonl::tests::a_line_without_end_stops_the_reader
15|node|a_refused_workstation_backs_off_and_says_so|status_shows_the_peer_state
cap|http_backends|-max_requests|the_request_cap_stops_a_run_and_the_spend_is_recorded
fuzz|lib:qatflow-core|jsonl::failfirst::fuzz::arbitrary_bytes|jsonl::tests::fuzz::arbitrary_bytes
fuzz|lib:qatflow-core|jsonl::failfirst::fuzz::json_like_fragments|jsonl::tests::fuzz::json_like_fragments
fuzz|lib:qatflow-core|jsonl::failfirst::fuzz::arbitrary_text_never_panics_the_parser|jsonl::tests::fuzz::arbitrary_text_never_panics_the_parser
fuzz|lib:qatflow-shards|format::failfirst::compressed_arbitrary_bytes_never_panic|format::tests::compressed_arbitrary_bytes_never_panic
'
TARGETS=(--lib --test cli --test export --test node --test ship --test security
    --test http_backends --test otlp_export)

log() { printf '\n== %s\n' "$*" >&2; }

# Builds the test binaries of the tree in $1; writes "<binary key> <path> <package dir>"
# lines to $2.
build() {
    local tree=$1 out=$2
    (cd "$tree" && cargo test --workspace --locked --no-run "${TARGETS[@]}" \
        --message-format=json-render-diagnostics) |
        jq -r 'select(.reason == "compiler-artifact" and .executable != null)
            | (.manifest_path | rtrimstr("/Cargo.toml")) as $dir
            | if (.target.kind | index("lib")) then "lib:\(.target.name | gsub("_"; "-")) \(.executable) \($dir)"
              elif (.target.kind | index("test")) then "\(.target.name) \(.executable) \($dir)"
              else empty end' >"$out"
}

# Runs test $2 of binary key $1 from map $3 in tree $4; prints "ok", "FAIL: reason" or
# "TIMEOUT".
run_one() {
    local key=$1 name=$2 map=$3 tree=$4 exe dir log rc
    exe=$(awk -v k="$key" '$1 == k { print $2 }' "$map" | tail -1)
    dir=$(awk -v k="$key" '$1 == k { print $3 }' "$map" | tail -1)
    [ -n "$exe" ] || { echo "NO BINARY ($key)"; return; }
    log=$LOGS/$(basename "$tree")-$key-${name//:/_}.log
    set +e
    # In the package's directory, as cargo test runs it.
    (cd "$dir" && timeout --kill-after=10 "$TEST_TIMEOUT" "$exe" --exact "$name" \
        --test-threads=1) >"$log" 2>&1
    rc=$?
    set -e
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "TIMEOUT after ${TEST_TIMEOUT}s"
    elif grep -q '^test result: ok. 1 passed' "$log"; then
        echo "ok"
    elif grep -q '^test result: ok. 0 passed' "$log"; then
        echo "NOT FOUND"
    else
        # The message: the lines after the first "panicked at FILE:LINE:COL:", up to the
        # backtrace, on one line; with the file and line of the failed assertion.
        local at why
        at=$(grep -m1 -o 'panicked at [^ ]*' "$log" | sed 's/^panicked at //; s/:[0-9]*:$//; s|.*/||')
        why=$(awk '/panicked at/ && !n { n = 1; next }
                   n && /^(stack backtrace:|note: run with|failures:$)/ { exit }
                   n { printf "%s ", $0 }' "$log" | tr -s ' \t' ' ' | cut -c1-300)
        echo "FAIL (${at:-?}): ${why:-exit $rc, see $log}"
    fi
}

# Writes stdin to $1 only when the content differs (cargo's freshness is by mtime).
put() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

log "before tree: $BEFORE_REV at $BEFORE_DIR (target $CARGO_TARGET_DIR)"
want=$(git rev-parse "$BEFORE_REV^{commit}")
if [ "$(git -C "$BEFORE_DIR" rev-parse HEAD 2>/dev/null)" = "$want" ] &&
    [ "$(git -C "$BEFORE_DIR" rev-parse --show-toplevel 2>/dev/null)" = "$BEFORE_DIR" ]; then
    echo "reusing the worktree (only files whose content changes are rewritten)" >&2
else
    rm -rf "$BEFORE_DIR"
    git worktree add --detach "$BEFORE_DIR" "$want" >&2
fi
for f in "${COPIED[@]}"; do put "$BEFORE_DIR/$f" <"$REPO/$f"; done
for u in "${UNITS[@]}"; do
    set -- $u
    cat <(git -C "$BEFORE_DIR" show "HEAD:$2") <(echo) "$HERE/unit/$1" | put "$BEFORE_DIR/$2"
done

log "the verbatim files that use the fix's APIs, compiled on the old tree"
declare -A VERBATIM
for a in "${ADAPTED[@]}"; do
    set -- $a
    set +e
    err=$(cd "$BEFORE_DIR" && cargo test --workspace --locked --no-run --test "$1" \
        --message-format=short 2>&1 | grep -E '(^error|: error)\[')
    set -e
    VERBATIM[$1]=${err:-compiles}
    echo "$err" | sed "s/^/$1: /" >&2
done
(cd "$BEFORE_DIR" && git apply "$HERE/before-api.patch")

# Both trees build target/debug/qatflow in the one target directory, and the CLI tests run
# that file: the before tests run before this checkout is built.
ROWS=()
while IFS='|' read -r defect key before after; do
    [ -n "$defect" ] || continue
    [ "$after" = "=" ] && after=$before
    echo "$defect $after" | grep -Eq -- "$ONLY" || continue
    ROWS+=("$defect|$key|$before|$after")
done <<<"$TESTS"

log "building the before tree"
build "$BEFORE_DIR" "$LOGS/before.map"
before_bin=$(stat -c %i "$CARGO_TARGET_DIR/debug/qatflow")
declare -A BEFORE
for i in "${!ROWS[@]}"; do
    IFS='|' read -r defect key before after <<<"${ROWS[$i]}"
    if [ "${before:0:1}" = "-" ]; then
        # "-WORD": main's test does not compile on the old tree; show the error naming WORD.
        BEFORE[$i]="DOES NOT COMPILE: $(grep -m1 -F -- "${before:1}" <<<"${VERBATIM[$key]:-?}" |
            sed 's|^[^ ]*/||')"
    else
        log "before: $defect $key $before"
        BEFORE[$i]=$(run_one "$key" "$before" "$LOGS/before.map" "$BEFORE_DIR")
    fi
    echo "${BEFORE[$i]}" >&2
done

log "building this checkout"
build "$REPO" "$LOGS/after.map"
# cargo re-links target/debug/qatflow from the tree just built, also when fresh: check it.
after_bin=$(stat -c %i "$CARGO_TARGET_DIR/debug/qatflow")
if [ "$after_bin" = "$before_bin" ]; then
    echo "target/debug/qatflow is still the before tree's binary" >&2
    exit 2
fi
mkdir -p "$(dirname "$OUT_TSV")"
printf 'defect\tbinary\ttest (after)\ttest (before, if another)\tbefore\tafter\n' >"$OUT_TSV"
bad=0
declare -A AFTER
for i in "${!ROWS[@]}"; do
    IFS='|' read -r defect key before after <<<"${ROWS[$i]}"
    log "after:  $defect $key $after"
    # A before-only variant shares its "after" test with another row: run that once.
    if [ -z "${AFTER["$key|$after"]:-}" ]; then
        AFTER["$key|$after"]=$(run_one "$key" "$after" "$LOGS/after.map" "$REPO")
    fi
    a=${AFTER["$key|$after"]}
    b=${BEFORE[$i]}
    # The fuzz properties are new checks, not the test of a listed defect: passing on the
    # old code is expected of them (they found a bug only in the fix's own BOM code).
    case $defect:$b in fuzz:ok) ;; *:ok | *:"NOT FOUND"* | *:"NO BINARY"*) bad=1 ;; esac
    [ "$a" = ok ] || bad=1
    other=$before
    [ "$before" = "$after" ] && other=
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$defect" "$key" "$after" "$other" "$b" "$a" |
        tee -a "$OUT_TSV"
done

log "results (also in $OUT_TSV; logs in $LOGS)"
column -t -s $'\t' "$OUT_TSV" || cat "$OUT_TSV"
exit $bad
