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
    let venv: PathBuf = root.join("target").join("python-venv");
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
