//! The thumbnail example, live on every backend: images come back scaled exactly, bad input
//! gets a 400 naming what is wrong, and a burst beyond one thread and a queue of one is
//! answered in order, each request with its thumbnail or a 503 (never lost, never late).

#[macro_use]
#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::Client;
use ringcall::Backend;
use support::Running;

/// A `w x h` image whose pixel `(x, y)` is `(x + y) % 256`.
fn gradient(w: usize, h: usize) -> Vec<u8> {
    (0..h).flat_map(|y| (0..w).map(move |x| ((x + y) % 256) as u8)).collect()
}

fn request(id: usize, w: usize, h: usize, size: usize) -> String {
    let pixels = BASE64.encode(gradient(w, h));
    format!(
        "{{\"cmdid\":4001,\"id\":{id},\"params\":{{\"width\":{w},\"height\":{h},\"pixels\":\"{pixels}\",\"size\":{size}}}}}\n"
    )
}

fn thumbnails_and_load_shedding(backend: Backend) {
    if backend == Backend::Uring && Backend::Auto.resolve() != Backend::Uring {
        common::skip("RINGCALL_REQUIRE_ALL_BACKENDS", "io_uring is not available here");
        return;
    }
    let args =
        ["--addr", "127.0.0.1:0", "--blocking-threads", "1", "--queue", "1", "--backend", backend.name()];
    let (_service, addr) = Running::start("thumbnail", &args);
    let mut client = Client::connect(addr);
    // 4x2 (rows 0,64,64,128 and 128,192,192,255) → 2x1: each output pixel is the mean of a
    // 2x2 block.
    let tiny =
        "{\"cmdid\":4001,\"params\":{\"width\":4,\"height\":2,\"pixels\":\"AEBAgIDAwP8=\",\"size\":2}}\n";
    assert_eq!(
        client.call(tiny),
        format!(
            "{{\"code\":0,\"data\":{{\"width\":2,\"height\":1,\"pixels\":\"{}\"}}}}\n",
            BASE64.encode([96, 160])
        )
    );
    // A 512x256 gradient to 64x32: every 8x8 block averages to its centre's value.
    let expected: Vec<u8> =
        (0..32).flat_map(|y| (0..64).map(move |x| ((8 * x + 8 * y + 7) % 256) as u8)).collect();
    let reply: serde_json::Value = serde_json::from_str(&client.call(&request(1, 512, 256, 64))).unwrap();
    assert_eq!((reply["data"]["width"].as_u64(), reply["data"]["height"].as_u64()), (Some(64), Some(32)));
    let got = BASE64.decode(reply["data"]["pixels"].as_str().unwrap()).unwrap();
    assert_eq!(got.len(), expected.len());
    let off = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
    // Blocks that straddle the wrap from 255 to 0 average to something else.
    assert!(off <= 64 * 32 / 8, "{off} pixels differ from the block means");
    assert_eq!(
        client
            .call("{\"cmdid\":4001,\"params\":{\"width\":2,\"height\":2,\"pixels\":\"AAA=\",\"size\":1}}\n"),
        "{\"code\":400,\"error\":\"params.pixels: 2 bytes for a 2x2 image\"}\n"
    );
    assert_eq!(
        client.call("{\"cmdid\":4001,\"params\":{\"width\":2,\"height\":2,\"size\":1}}\n"),
        "{\"code\":400,\"error\":\"params.pixels: missing (required)\"}\n"
    );
    // A burst: more than one thread and a queue of one can take. Every request is answered,
    // in order, with its thumbnail or with a 503.
    let burst: String = (0..40).map(|i| request(i, 512, 512, 32)).collect();
    client.send(burst.as_bytes());
    let (mut done, mut shed) = (0, 0);
    for i in 0..40 {
        let reply: serde_json::Value = serde_json::from_str(&client.line()).unwrap();
        assert_eq!(reply["id"].as_u64(), Some(i as u64));
        match reply["code"].as_u64() {
            Some(0) => {
                assert_eq!(reply["data"]["width"].as_u64(), Some(32));
                done += 1;
            }
            Some(503) => {
                assert!(reply["error"].as_str().unwrap().starts_with("overloaded"), "{reply}");
                shed += 1;
            }
            _ => panic!("unexpected reply {reply}"),
        }
    }
    assert!(done >= 1, "the first job of a burst always runs");
    eprintln!("{backend}: {done} thumbnails, {shed} shed");
}

every_backend!(thumbnails_and_load_shedding);
