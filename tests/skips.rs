//! A test that cannot run here says so where a reader of `cargo test` looks: its `SKIPPED`
//! line reaches the terminal although the test harness captures the tests' output, and where
//! the requirement is set in the environment (as CI sets it) the skip is a failure instead.

#[macro_use]
mod common;

use std::process::Command;

/// The environment variable that makes the probe run `skip` (in a child run of this binary).
const PROBE: &str = "RINGCALL_SKIP_PROBE";
/// The requirement the probe names; set in the child to make the skip a failure.
const REQUIRED: &str = "RINGCALL_SKIP_PROBE_REQUIRED";

#[test]
fn a_skipped_test_is_reported_past_the_harness_and_fails_where_required() {
    if std::env::var_os(PROBE).is_some() {
        common::skip(REQUIRED, "the probe's requirement is missing");
        return;
    }
    let probe = |required: bool| {
        let mut command = Command::new(std::env::current_exe().expect("this test binary"));
        command.args(["--exact", "a_skipped_test_is_reported_past_the_harness_and_fails_where_required"]);
        command.env(PROBE, "1").env_remove(REQUIRED);
        if required {
            command.env(REQUIRED, "1");
        }
        command.output().expect("run this test binary again")
    };
    // Captured (no --nocapture), as `cargo test` runs it.
    let skipped = probe(false);
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "SKIPPED a_skipped_test_is_reported_past_the_harness_and_fails_where_required: \
             the probe's requirement is missing"
        ),
        "the SKIPPED line did not reach the terminal:\n{stderr}"
    );
    let required = probe(true);
    assert!(!required.status.success(), "a missing requirement that is required must fail the test");
}
