//! A stand-in SMS provider for measuring `sms_gateway`: an HTTP/1.1 server (keep-alive) that
//! answers every `POST` with `{"id":"msg-N"}` after `--delay-ms`, and a load mode that
//! measures what that server does alone (the upstream's own rate), with the same HTTP client
//! the gateway uses.
//!
//! ```sh
//! cargo run --release --example http_stub -- serve --addr 127.0.0.1:9000 --delay-ms 10
//! cargo run --release --example http_stub -- load --url http://127.0.0.1:9000/send --concurrency 1000 --duration 10
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
#[command(about = "A delayed HTTP responder, and a load generator for it")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer POSTs after a delay.
    Serve {
        /// Address to listen on (the address is printed on stdout).
        #[arg(long, default_value = "127.0.0.1:9000")]
        addr: String,
        /// Delay before each answer.
        #[arg(long, default_value_t = 10)]
        delay_ms: u64,
        /// Runtime threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Closed-loop load: `--concurrency` requests in flight for `--duration` seconds.
    Load {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
}

fn main() -> anyhow::Result<()> {
    ringcall_examples::init_logs();
    match Args::parse().command {
        Command::Serve { addr, delay_ms, threads } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()?;
            runtime.block_on(serve(addr, Duration::from_millis(delay_ms)))
        }
        Command::Load { url, concurrency, duration } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(load(url, concurrency, Duration::from_secs_f64(duration)))
        }
    }
}

async fn serve(addr: String, delay: Duration) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("{}", listener.local_addr()?);
    let served = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let served = served.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            loop {
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                if read.read_exact(&mut body).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
                let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                let reply = format!("{{\"id\":\"msg-{n}\"}}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                if write.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn load(url: String, concurrency: usize, duration: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, done) = (client.clone(), url.clone(), done.clone());
            tokio::spawn(async move {
                let body = r#"{"to":"+15551234567","text":"load"}"#;
                while Instant::now() < end {
                    let sent =
                        client.post(&url).header("content-type", "application/json").body(body).send().await;
                    if let Ok(response) = sent
                        && response.bytes().await.is_ok()
                    {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"requests\":{},\"requests_per_sec\":{:.0}}}",
        done.load(Ordering::Relaxed),
        done.load(Ordering::Relaxed) as f64 / secs
    );
    Ok(())
}
