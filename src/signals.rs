//! Graceful shutdown on SIGINT and SIGTERM for every server of the process, so that a service
//! built on the library drains on a deploy exactly as `ringcall serve` does.
//!
//! This module owns the process's handlers for the two signals (installed with signal-hook
//! when the first server that wants them starts) and the list of servers they stop. The first
//! signal begins a graceful shutdown of every registered server; a second one exits at once
//! with status 130. SIGHUP makes every registered TLS server read its certificate and key
//! again (for new connections; open ones keep theirs). A signal that arrives while no server
//! is registered does what it would have done without ringcall (the default action: the
//! process ends).

use std::io;
use std::sync::{Mutex, OnceLock};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use slab::Slab;

use crate::backend::worker::StopSignal;

struct Registry {
    /// Each server's stop signal, and its TLS configuration if it serves TLS.
    servers: Slab<(std::sync::Arc<StopSignal>, Option<ringcall_core::TlsConfig>)>,
    /// A first signal already asked the servers to stop.
    stopping: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { servers: Slab::new(), stopping: false });
static LISTENING: OnceLock<io::Result<()>> = OnceLock::new();

/// A server's place in the registry; dropping it unregisters the server.
#[derive(Debug)]
pub(crate) struct Registration(usize);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = registry();
        registry.servers.try_remove(self.0);
        if registry.servers.is_empty() {
            // The shutdown asked for is done: a later signal starts afresh.
            registry.stopping = false;
        }
    }
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding this lock cannot leave the registry inconsistent.
    REGISTRY.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Stops `server` gracefully at the first SIGINT or SIGTERM, installing the handlers if this
/// is the first server that asks.
pub(crate) fn register(
    server: std::sync::Arc<StopSignal>,
    tls: Option<ringcall_core::TlsConfig>,
) -> io::Result<Registration> {
    LISTENING.get_or_init(listen).as_ref().map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
    let mut registry = registry();
    if registry.stopping {
        // Started after the shutdown was asked for: it stops too.
        server.stop();
    }
    Ok(Registration(registry.servers.insert((server, tls))))
}

fn listen() -> io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new().name("ringcall-signals".into()).spawn(move || {
        for signal in signals.forever() {
            on_signal(signal);
        }
    })?;
    Ok(())
}

fn on_signal(signal: i32) {
    let mut registry = registry();
    if registry.servers.is_empty() {
        drop(registry);
        // No server to drain: what the signal would have done without ringcall.
        let _ = signal_hook::low_level::emulate_default_handler(signal);
        return;
    }
    if signal == SIGHUP {
        let configs: Vec<_> = registry.servers.iter().filter_map(|(_, (_, tls))| tls.clone()).collect();
        drop(registry);
        reload(&configs);
        return;
    }
    if registry.stopping {
        tracing::warn!(signal, "second signal: exiting without draining");
        std::process::exit(130);
    }
    registry.stopping = true;
    // Stop first: nothing (not even a failing log write) may delay the shutdown.
    for (_, (server, _)) in &registry.servers {
        server.stop();
    }
    drop(registry);
    tracing::info!(signal, "shutdown requested; send the signal again to exit at once");
}

/// SIGHUP: every TLS server reads its certificate and key again; a failure keeps the one in
/// use and says why.
fn reload(configs: &[ringcall_core::TlsConfig]) {
    if configs.is_empty() {
        tracing::info!("SIGHUP: no server serves TLS; nothing to reload");
    }
    for tls in configs {
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded; new connections use it"),
            Err(e) => tracing::warn!("SIGHUP: TLS certificate not reloaded, the one in use stays: {e}"),
        }
    }
}
