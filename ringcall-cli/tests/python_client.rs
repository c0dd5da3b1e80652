//! The Python client's test suite (`clients/python/tests`, pytest), run against this build of
//! `ringcall serve`. It installs the package and its test dependencies (pytest, Flask) into a
//! virtualenv under `target/`, made on first use; PyPI must be reachable then.
//!
//! Without `python3`, or without PyPI to install from, the suite is skipped with a `SKIPPED`
//! line on the terminal, unless `RINGCALL_REQUIRE_PYTHON` is set (as CI does), which makes
//! that a failure.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Overrides where the suite's virtualenv is made (the offline probe makes its own).
const VENV: &str = "RINGCALL_PYTHON_VENV";

fn run(what: &str, command: &mut Command) {
    let status = command.status().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}

#[test]
fn python_client_suite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if Command::new(&python).arg("--version").output().is_err() {
        common::skip("RINGCALL_REQUIRE_PYTHON", &format!("the Python client suite needs {python}"));
        return;
    }
    // Where the virtualenv lives: under target/, or where the offline probe below says.
    let venv: PathBuf =
        std::env::var_os(VENV).map(PathBuf::from).unwrap_or_else(|| root.join("target").join("python-venv"));
    let bin = venv.join("bin");
    if !bin.join("pytest").exists() {
        run("python3 -m venv", Command::new(&python).args(["-m", "venv"]).arg(&venv));
    }
    let installed = Command::new(bin.join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-e"])
        .arg(format!("{}[test]", root.join("clients/python").display()))
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        // Offline, most likely: pytest and Flask come from PyPI.
        common::skip(
            "RINGCALL_REQUIRE_PYTHON",
            "pip could not install the Python suite's dependencies (pytest, Flask) from PyPI",
        );
        return;
    }
    run(
        "pytest clients/python/tests",
        Command::new(bin.join("pytest"))
            .args(["-q", "-p", "no:cacheprovider"])
            .current_dir(root.join("clients/python"))
            .env("RINGCALL_BINARY", env!("CARGO_BIN_EXE_ringcall")),
    );
}

/// Offline (no package index: `PIP_NO_INDEX`), the suite is skipped with a `SKIPPED` line that
/// names the cause, and where `RINGCALL_REQUIRE_PYTHON` is set that is a failure. Runs the
/// suite's test in a child of this binary, with a virtualenv of its own.
#[test]
fn without_a_package_index_the_suite_is_skipped_or_fails_where_required() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if Command::new(&python).arg("--version").output().is_err() {
        common::skip("RINGCALL_REQUIRE_PYTHON", &format!("the offline probe needs {python}"));
        return;
    }
    let venv = std::env::temp_dir().join(format!("ringcall-offline-venv-{}", std::process::id()));
    let probe = |required: bool| {
        let mut command = Command::new(std::env::current_exe().expect("this test binary"));
        command.args(["--exact", "python_client_suite"]).env(VENV, &venv).env("PIP_NO_INDEX", "1");
        command.env_remove("RINGCALL_REQUIRE_PYTHON");
        if required {
            command.env("RINGCALL_REQUIRE_PYTHON", "1");
        }
        command.output().expect("run this test binary again")
    };
    let skipped = probe(false);
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "{stderr}");
    assert!(
        stderr.contains("SKIPPED python_client_suite: pip could not install"),
        "no SKIPPED line naming pip:\n{stderr}"
    );
    let required = probe(true);
    let _ = std::fs::remove_dir_all(&venv);
    assert!(!required.status.success(), "offline with RINGCALL_REQUIRE_PYTHON set must fail");
}
