//! Even load across cores for long-lived connections.
//!
//! Each core accepts on its own `SO_REUSEPORT` listener, and the kernel picks the listener by
//! a hash of the connection's addresses: with thousands of short connections that evens
//! out, but with a few dozen long-lived ones (a service's callers keep theirs open for days)
//! it routinely leaves one core with most of them, and that core's CPU with most of the
//! work. So a core that accepts a connection while another core holds fewer hands it over:
//! it puts the socket in that core's inbox and wakes it, and that core serves it as if it
//! had accepted it. Cores stay within one connection of each other.
//!
//! A core's load is the connections open on it (its counters) plus those handed to it and
//! not yet taken in. Accepting is not the request path: the inbox's lock and the wake-up are
//! paid once per handed-over connection, never per request. A core that has begun shutting
//! down takes no more (a hand-over to it fails and the accepting core keeps the
//! connection), and it takes in what its inbox held, like its listener's backlog.
//! `epoll-mt` needs none of this: its tasks already move between threads.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::stats::StatsRegistry;

/// How a core is woken when a connection lands in its inbox.
type Wake = Box<dyn Fn() + Send + Sync>;

/// Whether a core takes connections from others.
enum Inbox {
    /// Not serving yet: nothing is handed to it.
    Starting,
    /// Serving: connections handed to it wait here until `wake` has it take them in.
    Serving { wake: Wake, waiting: Vec<OwnedFd> },
    /// Shutting down: it takes no more.
    Stopped,
}

struct Core {
    inbox: Mutex<Inbox>,
    /// Mirrors `Inbox::Serving`, for choosing a core without taking every lock.
    serving: AtomicBool,
    /// Handed over and not yet taken in.
    in_transit: AtomicUsize,
}

/// The cores of one server and their inboxes.
pub(crate) struct Balancer {
    stats: Arc<StatsRegistry>,
    cores: Box<[Core]>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer").field("cores", &self.cores.len()).finish_non_exhaustive()
    }
}

/// The core a connection accepted on `me` should be served on: the least loaded one if it
/// holds fewer than `me` (the first of them), else `me`. `loads[c]` is `None` for a core
/// that takes no connections from others.
pub(crate) fn choose(loads: &[Option<usize>], me: usize) -> usize {
    let mine = loads.get(me).copied().flatten().unwrap_or(0);
    let least = loads.iter().enumerate().filter_map(|(c, load)| load.map(|l| (l, c))).min();
    match least {
        Some((load, core)) if load < mine => core,
        _ => me,
    }
}

fn lock(inbox: &Mutex<Inbox>) -> MutexGuard<'_, Inbox> {
    inbox.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Balancer {
    /// A balancer for the cores `stats` counts for.
    pub(crate) fn new(stats: Arc<StatsRegistry>) -> Arc<Self> {
        let cores = (0..stats.cores())
            .map(|_| Core {
                inbox: Mutex::new(Inbox::Starting),
                serving: AtomicBool::new(false),
                in_transit: AtomicUsize::new(0),
            })
            .collect();
        Arc::new(Self { stats, cores })
    }

    /// Core `core` serves: connections handed to it call `wake`, after which it calls
    /// [`take`](Self::take).
    pub(crate) fn serve(&self, core: usize, wake: impl Fn() + Send + Sync + 'static) {
        *lock(&self.cores[core].inbox) = Inbox::Serving { wake: Box::new(wake), waiting: Vec::new() };
        self.cores[core].serving.store(true, Ordering::Release);
    }

    fn load(&self, core: usize) -> Option<usize> {
        let c = &self.cores[core];
        c.serving
            .load(Ordering::Acquire)
            .then(|| self.stats.core(core).open_connections() as usize + c.in_transit.load(Ordering::Relaxed))
    }

    /// Places `fd`, just accepted on `me`: `Some(fd)` to serve it there, `None` when it was
    /// handed to a core holding fewer connections. (Drivers decide with their engine; this is
    /// the same rule for the tests.)
    #[cfg(test)]
    pub(crate) fn place(&self, me: usize, fd: OwnedFd) -> Option<OwnedFd> {
        match self.target(me) {
            target if target == me => Some(fd),
            target => self.hand_over(target, fd),
        }
    }

    /// The core a connection just accepted on `me` should go to ([`choose`]).
    pub(crate) fn target(&self, me: usize) -> usize {
        let loads: Vec<Option<usize>> = (0..self.cores.len()).map(|c| self.load(c)).collect();
        choose(&loads, me)
    }

    /// Hands `fd` to `target`: `None` once it is in its inbox, `Some(fd)` back if `target`
    /// takes no connections (it is starting or shutting down).
    pub(crate) fn hand_over(&self, target: usize, fd: OwnedFd) -> Option<OwnedFd> {
        let core = &self.cores[target];
        let mut inbox = lock(&core.inbox);
        match &mut *inbox {
            Inbox::Serving { wake, waiting } => {
                waiting.push(fd);
                core.in_transit.fetch_add(1, Ordering::Relaxed);
                wake();
                None
            }
            Inbox::Starting | Inbox::Stopped => Some(fd),
        }
    }

    /// The connections handed to `core` since it last looked.
    pub(crate) fn take(&self, core: usize) -> Vec<OwnedFd> {
        let c = &self.cores[core];
        let taken = match &mut *lock(&c.inbox) {
            Inbox::Serving { waiting, .. } => std::mem::take(waiting),
            Inbox::Starting | Inbox::Stopped => Vec::new(),
        };
        c.in_transit.fetch_sub(taken.len(), Ordering::Relaxed);
        taken
    }

    /// `core` is shutting down: it takes no more, and gets what its inbox still held.
    pub(crate) fn stop(&self, core: usize) -> Vec<OwnedFd> {
        let c = &self.cores[core];
        c.serving.store(false, Ordering::Release);
        let taken = match std::mem::replace(&mut *lock(&c.inbox), Inbox::Stopped) {
            Inbox::Serving { waiting, .. } => waiting,
            Inbox::Starting | Inbox::Stopped => Vec::new(),
        };
        c.in_transit.fetch_sub(taken.len(), Ordering::Relaxed);
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_the_least_loaded_core_only_if_it_holds_fewer() {
        assert_eq!(choose(&[Some(0), Some(0)], 0), 0);
        assert_eq!(choose(&[Some(1), Some(0)], 0), 1);
        assert_eq!(choose(&[Some(1), Some(1)], 1), 1);
        assert_eq!(choose(&[Some(5), Some(3), Some(2), Some(2)], 0), 2, "the first of the least loaded");
        assert_eq!(choose(&[Some(5), Some(3), None], 0), 1, "a core that is not serving takes nothing");
        assert_eq!(choose(&[Some(5), None], 0), 0);
        assert_eq!(choose(&[None, Some(0)], 0), 0, "a core shutting down keeps what it still accepts");
    }

    fn socket() -> OwnedFd {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into()
    }

    #[test]
    fn hand_overs_wake_the_target_and_stop_at_its_shutdown() {
        let stats = StatsRegistry::new(2);
        let balancer = Balancer::new(stats.clone());
        let woken = Arc::new(AtomicUsize::new(0));
        // Nobody serves yet: the accepting core keeps what it accepted.
        assert!(balancer.place(0, socket()).is_some());
        balancer.serve(0, || {});
        let count = woken.clone();
        balancer.serve(1, move || {
            count.fetch_add(1, Ordering::Relaxed);
        });
        // Core 0 holds one connection, core 1 none: the next goes to core 1.
        stats.core(0).connection_opened();
        assert!(balancer.place(0, socket()).is_none());
        assert_eq!(woken.load(Ordering::Relaxed), 1);
        // In transit, it counts for core 1 already: the next stays on core 0.
        assert!(balancer.place(0, socket()).is_some());
        assert_eq!(balancer.take(1).len(), 1);
        assert!(balancer.take(1).is_empty());
        stats.core(0).connection_opened();
        assert!(balancer.place(0, socket()).is_none());
        // Shutting down, core 1 gets what was waiting and takes no more.
        assert_eq!(balancer.stop(1).len(), 1);
        assert!(balancer.place(0, socket()).is_some());
        assert!(balancer.take(1).is_empty());
    }
}
