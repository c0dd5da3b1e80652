//! The `ringline` command: `serve` runs the shipped server (built-ins plus echo).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ringline::{Backend, ServerConfig, backend::sys, handlers, protocol::DEFAULT_MAX_LINE};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

ringline::routes! {
    /// The shipped server's own commands (ping and stats are built into every server).
    ShippedRoutes {
        10000 => handlers::echo,
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "ringline",
    version,
    about = "Newline-delimited JSON RPC over persistent TCP, one io_uring ring per core"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: ping (0), stats (1) and echo (10000).
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = ringline::server::DEFAULT_ADDR)]
    addr: SocketAddr,
    /// Worker threads, one per core (default: every CPU this process may use).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Longest request line in bytes; longer lines get a 413 reply and the connection closes.
    #[arg(long, default_value_t = DEFAULT_MAX_LINE)]
    max_line: usize,
    /// I/O backend.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Seconds a graceful shutdown (SIGINT/SIGTERM) waits for connections to drain.
    #[arg(long, default_value_t = 10.0)]
    shutdown_timeout: f64,
    /// Do not pin worker threads to CPUs.
    #[arg(long)]
    no_pin: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let signals = block_shutdown_signals();
    let open_files = sys::raise_nofile_limit().unwrap_or_else(|e| {
        tracing::warn!("cannot raise the open-file limit: {e}");
        0
    });
    let config = ServerConfig {
        addr: args.addr,
        threads: args.threads,
        limits: ringline::protocol::Limits { max_line: args.max_line },
        backend: args.backend,
        pin_threads: !args.no_pin,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
    };
    let server = ringline::ServerBuilder::config(config.clone())
        .start::<ShippedRoutes>()
        .with_context(|| format!("cannot start the {} server", config.backend))?;
    tracing::info!(
        backend = %server.backend(),
        threads = server.threads(),
        addr = %server.local_addr(),
        max_line = config.limits.max_line,
        open_files,
        "ringline serving"
    );
    let stopper = server.stopper();
    std::thread::Builder::new()
        .name("ringline-signals".into())
        .spawn(move || wait_for_signals(signals, stopper))
        .context("cannot spawn the signal thread")?;
    server.wait()?;
    tracing::info!("ringline stopped");
    Ok(())
}

/// Blocks SIGINT and SIGTERM in every thread (workers inherit the mask) so that only the
/// signal thread receives them.
fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data manipulated only through the libc calls below.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// First signal: graceful shutdown. Second: exit at once.
fn wait_for_signals(set: libc::sigset_t, stopper: ringline::Stopper) {
    let mut received = 0;
    loop {
        let mut signal = 0;
        // SAFETY: set is a valid, initialised signal set.
        if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
            continue;
        }
        received += 1;
        if received == 1 {
            tracing::info!(signal, "shutdown requested; send the signal again to exit at once");
            stopper.stop();
        } else {
            tracing::warn!(signal, "second signal: exiting without draining");
            std::process::exit(130);
        }
    }
}
