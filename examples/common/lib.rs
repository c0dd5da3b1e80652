//! What the example services share: the allocator, log set-up, start-up.

/// The allocator the `ringcall` command uses too (per-thread caches: the services allocate
/// per request on their async and blocking paths).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs to stderr (stdout carries the address), at `RUST_LOG` (default `info`), coloured only
/// on a terminal.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Starts `service`, prints the address it listens on (stdout: what scripts and tests read),
/// and serves until SIGINT or SIGTERM has drained it.
///
/// # Errors
/// The server cannot start (the address is taken, the backend is unavailable here).
pub fn serve<S: ringcall::Service>(
    builder: ringcall::ServerBuilder,
    service: S,
    name: &str,
) -> anyhow::Result<()> {
    let server = builder.start(service)?;
    println!("{}", server.local_addr());
    tracing::info!(addr = %server.local_addr(), backend = %server.backend(), "{name} listening");
    server.wait()?;
    tracing::info!("{name} stopped");
    Ok(())
}
