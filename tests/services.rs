//! Services that do real work, on every backend, against the real server: state shared by
//! every core and made per core, typed params, replies deferred to async and blocking work
//! (still in request order), load shedding of the blocking pool, and request deadlines.

#[macro_use]
mod common;

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{Client, start_service, total_stat};
use ringcall::{Backend, Ctx, Deferred, HandlerError, HandlerResult, Reply, Request, Service};
use serde::Deserialize;

/// Blocking work that waits until the test opens the gate; the test sees when it started.
#[derive(Default)]
struct Gate {
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Gate {
    fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        state.0 += 1;
        self.changed.notify_all();
        while !state.1 {
            state = self.changed.wait(state).unwrap();
        }
    }

    fn wait_started(&self, n: usize) {
        let mut state = self.state.lock().unwrap();
        while state.0 < n {
            state = self.changed.wait_timeout(state, Duration::from_secs(30)).unwrap().0;
        }
    }

    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
}

struct Shop {
    greeting: String,
    price: u64,
    gate: Arc<Gate>,
}

impl Service for Shop {
    type Routes = ShopRoutes;
    type Local = Cell<u64>;

    fn local(&self, _core: usize) -> Cell<u64> {
        Cell::new(0)
    }
}

/// 4000: the service's greeting and this core's call count.
fn hello(ctx: &Ctx<'_, Shop>, _: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    let count = ctx.local().get() + 1;
    ctx.local().set(count);
    reply.object().str("greeting", &ctx.service().greeting).u64("count", count);
    Ok(())
}

#[derive(Deserialize)]
struct Order<'a> {
    item: &'a str,
    qty: u32,
}

/// 4001: typed params.
fn order(ctx: &Ctx<'_, Shop>, request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    let order: Order<'_> = request.params()?;
    reply.object().str("item", order.item).u64("total", u64::from(order.qty) * ctx.service().price);
    Ok(())
}

#[derive(Deserialize)]
struct Wait {
    ms: u64,
    value: String,
}

/// 4002: answers `value` after `ms` milliseconds, from an async task.
fn after(ctx: &Ctx<'_, Shop>, request: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let Wait { ms, value } = request.params()?;
    ctx.spawn(deferred, async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(value)
    });
    Ok(())
}

/// 4003: blocking work that waits at the gate, then answers how many jobs passed it.
fn gated(ctx: &Ctx<'_, Shop>, _: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let gate = ctx.service().gate.clone();
    ctx.spawn_blocking(deferred, move || {
        gate.pass();
        Ok("through")
    });
    Ok(())
}

/// 4004: a handler that forgets its reply.
fn forgets(_: &Ctx<'_, Shop>, _: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    drop(deferred);
    Ok(())
}

/// 4005: blocking work that panics.
fn crashes(ctx: &Ctx<'_, Shop>, _: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    ctx.spawn_blocking(deferred, || -> Result<(), HandlerError> { panic!("decoder bug") });
    Ok(())
}

ringcall::routes! {
    ShopRoutes for Shop {
        4000 => hello,
        4001 => order,
        4002 => after,
        4003 => gated,
        4004 => forgets,
        4005 => crashes,
    }
}

fn shop() -> (Shop, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    (Shop { greeting: "welcome".into(), price: 7, gate: gate.clone() }, gate)
}

fn state_and_typed_params(backend: Backend) {
    let Some(server) = start_service(backend, shop().0, |b| b) else { return };
    let mut client = Client::connect(server.local_addr());
    for calls in 1..=3u64 {
        let reply = client.call("{\"cmdid\":4000}\n");
        let count: u64 = reply
            .strip_prefix("{\"code\":0,\"data\":{\"greeting\":\"welcome\",\"count\":")
            .and_then(|rest| rest.strip_suffix("}}\n"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected reply {reply}"));
        if backend == Backend::EpollMt {
            // One work-stealing runtime: the connection's task may run on another worker
            // thread for each request, and each thread has its own state.
            assert!((1..=calls).contains(&count), "call {calls} counted {count}");
        } else {
            assert_eq!(count, calls, "a connection stays on its core");
        }
    }
    assert_eq!(
        client.call("{\"cmdid\":4001,\"id\":1,\"params\":{\"item\":\"tea\",\"qty\":3}}\n"),
        "{\"code\":0,\"id\":1,\"data\":{\"item\":\"tea\",\"total\":21}}\n"
    );
    assert_eq!(
        client.call("{\"cmdid\":4001,\"id\":2,\"params\":{\"item\":\"tea\",\"qty\":\"two\"}}\n"),
        "{\"code\":400,\"id\":2,\"error\":\"params.qty: invalid type: string \\\"two\\\", expected u32\"}\n"
    );
    assert_eq!(
        client.call("{\"cmdid\":4001,\"params\":{\"qty\":1}}\n"),
        "{\"code\":400,\"error\":\"params.item: missing (required)\"}\n"
    );
}

fn async_replies_keep_request_order(backend: Backend) {
    let Some(server) = start_service(backend, shop().0, |b| b) else { return };
    let mut client = Client::connect(server.local_addr());
    client.send(
        b"{\"cmdid\":4002,\"id\":1,\"params\":{\"ms\":50,\"value\":\"slow\"}}\n{\"cmdid\":0,\"id\":2}\n\
          {\"cmdid\":4002,\"id\":3,\"params\":{\"ms\":0,\"value\":\"fast\"}}\n",
    );
    assert_eq!(client.line(), "{\"code\":0,\"id\":1,\"data\":\"slow\"}\n");
    assert_eq!(client.line(), "{\"code\":0,\"id\":2,\"data\":\"pong\"}\n");
    assert_eq!(client.line(), "{\"code\":0,\"id\":3,\"data\":\"fast\"}\n");
    // Many in flight on one connection, answered in order.
    let mut batch = Vec::new();
    for i in 0..200 {
        let ms = (200 - i) % 7;
        batch.extend_from_slice(
            format!("{{\"cmdid\":4002,\"id\":{i},\"params\":{{\"ms\":{ms},\"value\":\"v{i}\"}}}}\n")
                .as_bytes(),
        );
    }
    client.send(&batch);
    for i in 0..200 {
        assert_eq!(client.line(), format!("{{\"code\":0,\"id\":{i},\"data\":\"v{i}\"}}\n"));
    }
    assert_eq!(total_stat(&mut client, "deferred"), 202);
    assert_eq!(total_stat(&mut client, "deferred_pending"), 0);
}

fn a_deadline_answers_504_and_the_connection_goes_on(backend: Backend) {
    let Some(server) = start_service(backend, shop().0, |b| b) else { return };
    let mut client = Client::connect(server.local_addr());
    // The work would take a minute; the caller wants an answer within 100 ms.
    assert_eq!(
        client
            .call("{\"cmdid\":4002,\"id\":9,\"timeout_ms\":100,\"params\":{\"ms\":60000,\"value\":\"x\"}}\n"),
        "{\"code\":504,\"id\":9,\"error\":\"deadline of 100 ms passed before the handler answered\"}\n"
    );
    assert_eq!(client.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    // A deadline that is not passed changes nothing.
    assert_eq!(
        client.call("{\"cmdid\":4002,\"timeout_ms\":60000,\"params\":{\"ms\":0,\"value\":\"y\"}}\n"),
        "{\"code\":0,\"data\":\"y\"}\n"
    );
    assert_eq!(
        client.call("{\"cmdid\":0,\"timeout_ms\":-1}\n"),
        "{\"code\":400,\"error\":\"timeout_ms must be a non-negative integer (milliseconds)\"}\n"
    );
    assert_eq!(total_stat(&mut client, "deadline_expired"), 1);
}

/// A deferred reply whose request set no `timeout_ms` gets the server's default deadline.
fn a_deferred_reply_without_a_deadline_gets_the_servers_default(backend: Backend) {
    let default = std::time::Duration::from_millis(100);
    let Some(server) = start_service(backend, shop().0, |b| b.deferred_timeout(Some(default))) else {
        return;
    };
    let mut client = Client::connect(server.local_addr());
    // The work would take a minute and the request names no deadline.
    assert_eq!(
        client.call("{\"cmdid\":4002,\"id\":3,\"params\":{\"ms\":60000,\"value\":\"x\"}}\n"),
        "{\"code\":504,\"id\":3,\"error\":\"deadline of 100 ms passed before the handler answered\"}\n"
    );
    assert_eq!(client.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    assert_eq!(total_stat(&mut client, "deadline_expired"), 1);
}

fn the_blocking_pool_sheds_load_with_503_while_the_core_serves_on(backend: Backend) {
    let (service, gate) = shop();
    let Some(server) = start_service(backend, service, |b| b.blocking_threads(1).blocking_queue(1)) else {
        return;
    };
    let mut first = Client::connect(server.local_addr());
    first.send(b"{\"cmdid\":4003,\"id\":1}\n");
    // The one blocking thread holds the first job...
    gate.wait_started(1);
    // ...so of the next two, one fills the queue and the other is shed.
    let mut second = Client::connect(server.local_addr());
    second.send(b"{\"cmdid\":4003,\"id\":2}\n{\"cmdid\":4003,\"id\":3}\n");
    while server.stats().total().replies_with(503) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The cores answer other requests meanwhile.
    let mut other = Client::connect(server.local_addr());
    assert_eq!(other.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    assert_eq!(total_stat(&mut other, "deferred_pending"), 2);
    gate.open();
    assert_eq!(first.line(), "{\"code\":0,\"id\":1,\"data\":\"through\"}\n");
    assert_eq!(second.line(), "{\"code\":0,\"id\":2,\"data\":\"through\"}\n");
    assert_eq!(
        second.line(),
        "{\"code\":503,\"id\":3,\"error\":\"overloaded: 1 jobs already wait for a blocking thread; retry later\"}\n"
    );
}

fn a_forgotten_or_crashed_reply_is_a_500_never_silence(backend: Backend) {
    let Some(server) = start_service(backend, shop().0, |b| b) else { return };
    let mut client = Client::connect(server.local_addr());
    client.send(b"{\"cmdid\":4004,\"id\":1}\n{\"cmdid\":4005,\"id\":2}\n{\"cmdid\":0,\"id\":3}\n");
    assert_eq!(
        client.line(),
        "{\"code\":500,\"id\":1,\"error\":\"handler for cmdid 4004 dropped its reply without answering\"}\n"
    );
    assert_eq!(client.line(), "{\"code\":500,\"id\":2,\"error\":\"handler for cmdid 4005 panicked\"}\n");
    assert_eq!(client.line(), "{\"code\":0,\"id\":3,\"data\":\"pong\"}\n");
}

fn a_peer_gone_before_its_deferred_reply_loses_nothing_of_others(backend: Backend) {
    let Some(server) = start_service(backend, shop().0, |b| b) else { return };
    let mut gone = Client::connect(server.local_addr());
    gone.send(b"{\"cmdid\":4002,\"params\":{\"ms\":200,\"value\":\"lost\"}}\n");
    let mut client = Client::connect(server.local_addr());
    while total_stat(&mut client, "deferred_pending") == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // A reset, not a FIN: the server cannot send the reply and closes the connection.
    gone.reset();
    while total_stat(&mut client, "deferred_abandoned") == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        client.call("{\"cmdid\":4002,\"params\":{\"ms\":300,\"value\":\"mine\"}}\n"),
        "{\"code\":0,\"data\":\"mine\"}\n"
    );
    assert_eq!(total_stat(&mut client, "deferred_pending"), 0);
}

every_backend!(
    state_and_typed_params,
    async_replies_keep_request_order,
    a_deadline_answers_504_and_the_connection_goes_on,
    the_blocking_pool_sheds_load_with_503_while_the_core_serves_on,
    a_forgotten_or_crashed_reply_is_a_500_never_silence,
    a_deferred_reply_without_a_deadline_gets_the_servers_default,
    a_peer_gone_before_its_deferred_reply_loses_nothing_of_others,
);
