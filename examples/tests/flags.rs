//! Every example takes the same kind of command line: `--help` lists its flags (`--addr`
//! among them) and exits 0, and a flag it does not know is an error a person can read, not a
//! start-up failure with a debug dump.

mod support;

use std::process::Command;

use support::example;

const EXAMPLES: [&str; 6] =
    ["analytics", "http_stub", "kv_service", "log_service", "sms_gateway", "thumbnail"];

/// The command line that serves: the examples' own, or the upstream stub's `serve` command.
fn serving(name: &str) -> Command {
    let mut command = Command::new(example(name));
    if name == "http_stub" {
        command.arg("serve");
    }
    command
}

#[test]
fn every_example_lists_its_flags_with_help() {
    for name in EXAMPLES {
        let out = serving(name).arg("--help").output().expect("run the example");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --help failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("--addr"), "{name} --help does not list --addr:\n{text}");
    }
}

#[test]
fn an_unknown_flag_is_a_readable_error() {
    for name in EXAMPLES {
        let out = serving(name).arg("--no-such-flag").output().expect("run the example");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} accepted --no-such-flag");
        assert!(text.contains("--no-such-flag") && text.contains("--help"), "{name} said:\n{text}");
    }
}
