//! A thumbnail service: CPU-heavy work on the blocking pool, with load shedding. Each request
//! carries a grayscale image; the reply is the image scaled down to fit a square of `size`
//! pixels (area averaging, aspect ratio kept). The core only parses and answers: the scaling
//! runs on `--blocking-threads` threads, and when `--queue` jobs already wait the request is
//! answered 503 at once instead of queueing without bound.
//!
//! ```sh
//! cargo run --release --example thumbnail -- --addr 127.0.0.1:8893 --blocking-threads 2 --queue 64
//! # a 4x2 image (base64 of 8 bytes of gray) scaled to fit 2x2:
//! printf '{"cmdid":4001,"params":{"width":4,"height":2,"pixels":"AEBAgIDAwP8=","size":2}}\n' | nc -q1 127.0.0.1 8893
//! ```
//!
//! - 4001 thumbnail `{"width": w, "height": h, "pixels": "<base64 of w*h bytes>", "size": s}`
//!   → `{"width": …, "height": …, "pixels": "<base64>"}`; 503 when overloaded, 504 past
//!   `timeout_ms`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::Parser;
use ringcall::{Backend, Ctx, Deferred, HandlerError, HandlerResult, Request, Server, Service};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(about = "A thumbnail service on ringcall: CPU work on a bounded pool")]
struct Args {
    /// Address to listen on (port 0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8893")]
    addr: String,
    /// Threads that scale images (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    blocking_threads: usize,
    /// Jobs that may wait for a thread; beyond, requests are answered 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Largest image accepted, in pixels.
    #[arg(long, default_value_t = 16 << 20)]
    max_pixels: usize,
    /// I/O backend: auto, uring, tokio-uring, epoll or epoll-mt.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

struct Thumbnails {
    max_pixels: usize,
}

impl Service for Thumbnails {
    type Routes = ThumbnailRoutes;
    type Local = ();

    fn local(&self, _core: usize) {}
}

#[derive(Deserialize)]
struct Image<'a> {
    width: usize,
    height: usize,
    pixels: &'a str,
    size: usize,
}

#[derive(Serialize, Debug, PartialEq)]
struct Thumbnail {
    width: usize,
    height: usize,
    pixels: String,
}

/// 4001: checks the request on the core, scales on the blocking pool.
fn thumbnail(ctx: &Ctx<'_, Thumbnails>, request: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let Image { width, height, pixels, size } = request.params()?;
    let bad = |m: String| HandlerError::bad_request(m);
    if width == 0 || height == 0 || size == 0 {
        return Err(bad("params.width, height and size must be 1 or more".into()));
    }
    let max = ctx.service().max_pixels;
    if width.saturating_mul(height) > max {
        return Err(bad(format!("params: a {width}x{height} image is over the limit of {max} pixels")));
    }
    // The base64 text is copied out of the receive buffer: the job outlives the request.
    let pixels = pixels.to_owned();
    ctx.spawn_blocking(deferred, move || {
        let gray = BASE64.decode(pixels).map_err(|e| bad(format!("params.pixels: not base64: {e}")))?;
        if gray.len() != width * height {
            return Err(bad(format!("params.pixels: {} bytes for a {width}x{height} image", gray.len())));
        }
        let (w, h, small) = scale(&gray, width, height, size);
        Ok(Thumbnail { width: w, height: h, pixels: BASE64.encode(small) })
    });
    Ok(())
}

/// Scales `gray` (w x h) to fit `size` x `size`, averaging the source pixels each target pixel
/// covers (exact area weights, so a 2x2 block becomes its mean).
fn scale(gray: &[u8], w: usize, h: usize, size: usize) -> (usize, usize, Vec<u8>) {
    let scale = (size as f64 / w as f64).min(size as f64 / h as f64).min(1.0);
    let (tw, th) =
        (((w as f64 * scale).round() as usize).max(1), ((h as f64 * scale).round() as usize).max(1));
    let (fx, fy) = (w as f64 / tw as f64, h as f64 / th as f64);
    let mut out = Vec::with_capacity(tw * th);
    for ty in 0..th {
        let (y0, y1) = (ty as f64 * fy, (ty + 1) as f64 * fy);
        for tx in 0..tw {
            let (x0, x1) = (tx as f64 * fx, (tx + 1) as f64 * fx);
            let (mut sum, mut area) = (0.0, 0.0);
            for y in y0.floor() as usize..(y1.ceil() as usize).min(h) {
                let wy = (y1.min(y as f64 + 1.0) - y0.max(y as f64)).max(0.0);
                for x in x0.floor() as usize..(x1.ceil() as usize).min(w) {
                    let wx = (x1.min(x as f64 + 1.0) - x0.max(x as f64)).max(0.0);
                    sum += f64::from(gray[y * w + x]) * wx * wy;
                    area += wx * wy;
                }
            }
            out.push((sum / area).round() as u8);
        }
    }
    (tw, th, out)
}

ringcall::routes! {
    ThumbnailRoutes for Thumbnails {
        4001 => thumbnail,
    }
}

fn main() -> anyhow::Result<()> {
    ringcall_examples::init_logs();
    let args = Args::parse();
    ringcall_examples::serve(
        Server::builder()
            .addr(args.addr)
            .backend(args.backend)
            .threads(args.threads)
            .blocking_threads(args.blocking_threads)
            .blocking_queue(args.queue),
        Thumbnails { max_pixels: args.max_pixels },
        "thumbnail",
    )
}
