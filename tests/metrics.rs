//! The Prometheus endpoint against live servers (every backend): after known traffic, a
//! scrape parses as Prometheus text and holds exactly the counts of that traffic.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Client, start};
use ringcall::Backend;

/// `GET /metrics` over a plain socket, as a scraper does: the status line and the body.
fn scrape(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: */*\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The sum of the samples of `metric` whose labels include `labels` (over the cores, say).
fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric || s.metric == format!("{metric}_total"))
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{metric} is not a counter or gauge: {other:?}"),
        })
        .sum()
}

fn metrics_count_the_traffic_exactly(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let metrics = ringcall::metrics::serve("127.0.0.1:0".parse().unwrap(), server.stats_registry()).unwrap();
    let mut c = Client::connect(server.local_addr());
    for i in 0..5 {
        assert_eq!(
            c.call(&format!("{{\"cmdid\":10000,\"params\":{{\"i\":{i}}}}}\n")),
            format!("{{\"code\":0,\"data\":{{\"i\":{i}}}}}\n")
        );
    }
    for _ in 0..3 {
        assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    }
    for _ in 0..2 {
        assert!(c.call("{\"cmdid\":4242}\n").starts_with("{\"code\":404,"));
    }
    assert!(c.call("not json\n").starts_with("{\"code\":400,"));
    assert_eq!(c.call("{\"cmdid\":9001}\n"), "{\"code\":500,\"error\":\"disk on fire\"}\n");

    let (status, body) = scrape(metrics.local_addr(), "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.ends_with("# EOF\n"), "{body}");
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let v = |metric: &str, labels: &[(&str, &str)]| value(&parsed, metric, labels);
    assert_eq!(v("ringcall_requests", &[]), 12.0, "{body}");
    assert_eq!(v("ringcall_replies", &[("code", "0")]), 8.0);
    assert_eq!(v("ringcall_replies", &[("code", "404")]), 2.0);
    assert_eq!(v("ringcall_replies", &[("code", "400")]), 1.0);
    assert_eq!(v("ringcall_replies", &[("code", "500")]), 1.0);
    assert_eq!(v("ringcall_connections_accepted", &[]), 1.0);
    assert_eq!(v("ringcall_connections_open", &[]), 1.0);
    assert_eq!(v("ringcall_command_replies", &[("cmdid", "10000"), ("code", "0")]), 5.0);
    assert_eq!(v("ringcall_command_replies", &[("cmdid", "0"), ("code", "0")]), 3.0);
    assert_eq!(v("ringcall_command_replies", &[("cmdid", "9001"), ("code", "500")]), 1.0);
    // Unknown cmdids are not commands: counted in the totals only.
    assert_eq!(v("ringcall_command_replies", &[("cmdid", "4242")]), 0.0);
    // One histogram per command, whose count is its requests and whose +Inf bucket is all.
    let echo = parsed
        .samples
        .iter()
        .find(|s| s.metric == "ringcall_command_handler_seconds" && s.labels.get("cmdid") == Some("10000"))
        .expect("the echo handler's histogram");
    let prometheus_parse::Value::Histogram(buckets) = &echo.value else {
        panic!("not a histogram: {echo:?}")
    };
    assert_eq!(buckets.last().map(|b| (b.less_than, b.count)), Some((f64::INFINITY, 5.0)));
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count), "cumulative buckets");
    assert!(body.contains("ringcall_command_handler_seconds_count{cmdid=\"10000\"} 5\n"), "{body}");

    // Each call's reply left as a batch of its own: twelve batches, counted once their sends
    // are done (which may trail the client's reading them by a moment).
    let batches = |body: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with("ringcall_reply_batch_seconds_count{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let mut seen = batches(&body);
    for _ in 0..500 {
        if seen == 12 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        seen = batches(&scrape(metrics.local_addr(), "/metrics").1);
    }
    assert_eq!(seen, 12, "{body}");
    // The same batches, per command: the five echoes and three pings (unknown cmdids and
    // unparsable lines belong to no command).
    let body = scrape(metrics.local_addr(), "/metrics").1;
    assert!(body.contains("ringcall_command_in_server_seconds_count{cmdid=\"10000\"} 5\n"), "{body}");
    assert!(body.contains("ringcall_command_in_server_seconds_count{cmdid=\"0\"} 3\n"), "{body}");

    // Anything but /metrics.
    assert_eq!(scrape(metrics.local_addr(), "/").0, "HTTP/1.1 404 Not Found");
}

every_backend!(metrics_count_the_traffic_exactly);

/// Every series the Grafana dashboard (`deploy/grafana-dashboard.json`) queries is one the
/// server exports, so a renamed metric cannot leave a panel silently empty.
#[test]
fn the_dashboard_queries_only_metrics_the_server_exports() {
    let Some(server) = start(Backend::Epoll) else { return };
    let metrics = ringcall::metrics::serve("127.0.0.1:0".parse().unwrap(), server.stats_registry()).unwrap();
    let mut c = Client::connect(server.local_addr());
    assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    let (_, body) = scrape(metrics.local_addr(), "/metrics");
    let exported: std::collections::HashSet<&str> =
        body.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .filter(|t| t.starts_with("ringcall_"))
            {
                queried += 1;
                assert!(
                    exported.contains(name),
                    "panel {:?} queries {name}, which the server does not export",
                    panel["title"]
                );
            }
        }
    }
    assert!(queried >= 10, "the dashboard queries {queried} series");
}

/// Reads one HTTP/1.1 response with a Content-Length from a kept-alive connection: its status
/// line and body.
fn response(reader: &mut std::io::BufReader<TcpStream>) -> (String, String) {
    use std::io::BufRead;
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if header == "\r\n" {
            break;
        }
        if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (status.trim_end().to_owned(), String::from_utf8(body).unwrap())
}

/// A thousand idle connections, a client trickling its request head a byte at a time, and
/// one with an oversized head do not keep a scraper out: scrapes are answered meanwhile, on
/// a kept-alive connection too (as Prometheus keeps one).
#[test]
fn scrapes_are_answered_beside_idle_and_slowloris_connections() {
    common::raise_nofile();
    let Some(server) = start(Backend::Epoll) else { return };
    let metrics = ringcall::metrics::serve("127.0.0.1:0".parse().unwrap(), server.stats_registry()).unwrap();
    let addr = metrics.local_addr();
    let idle: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut slowloris = TcpStream::connect(addr).unwrap();
    slowloris.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..20 {
            if slowloris.write_all(b"a").is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    // A head over the limit is refused, and only that connection is affected.
    let mut huge = TcpStream::connect(addr).unwrap();
    let _ = write!(huge, "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(64 * 1024));
    let mut answer = String::new();
    let _ = huge.read_to_string(&mut answer);
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer:.60}");

    let kept = TcpStream::connect(addr).unwrap();
    kept.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut reader = std::io::BufReader::new(kept.try_clone().unwrap());
    for _ in 0..5 {
        let (status, body) = scrape(addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains("ringcall_requests_total"), "{body:.200}");
        write!(reader.get_mut(), "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let (status, body) = response(&mut reader);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.ends_with("# EOF\n"), "{body:.200}");
    }
    trickle.join().unwrap();
    drop(idle);
}
