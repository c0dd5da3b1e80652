//! Where a pool's endpoints come from: the [`Discover`] trait and four sources — a static
//! list, DNS names (A/AAAA) and DNS SRV records re-resolved on an interval, and a file
//! re-read when it changes. Other
//! registries (Consul, etcd, Kubernetes endpoints) are a `Discover` implementation away.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

/// A source of endpoints (`HOST:PORT` strings the pool connects to). The pool asks at start
/// and every [`rediscover_every`](super::PoolConfig::rediscover_every); endpoints that
/// appear are added, those that disappear are dropped. An error keeps the known endpoints.
pub trait Discover: Send + Sync + 'static {
    /// The endpoints now.
    fn endpoints(&self) -> impl Future<Output = io::Result<Vec<String>>> + Send;
}

/// A fixed list.
#[derive(Debug, Clone)]
pub struct StaticList(Vec<String>);

impl StaticList {
    /// The endpoints, as `HOST:PORT`.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self(endpoints)
    }
}

impl Discover for StaticList {
    async fn endpoints(&self) -> io::Result<Vec<String>> {
        Ok(self.0.clone())
    }
}

/// DNS names, each `NAME:PORT`, resolved to every address they have (A and AAAA records) each
/// time the pool asks: a name that gains or loses addresses gains or loses endpoints. For
/// names that carry their ports too, see [`DnsSrv`].
#[derive(Debug, Clone)]
pub struct DnsNames(Vec<String>);

impl DnsNames {
    /// The names, as `NAME:PORT`.
    pub fn new(names: Vec<String>) -> Self {
        Self(names)
    }
}

impl Discover for DnsNames {
    async fn endpoints(&self) -> io::Result<Vec<String>> {
        let mut found = Vec::new();
        let mut failures = Vec::new();
        for name in &self.0 {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => found.extend(addrs.map(|a| a.to_string())),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        if found.is_empty() && !failures.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, failures.join("; ")));
        }
        found.sort();
        found.dedup();
        Ok(found)
    }
}

/// A file of endpoints, one `HOST:PORT` per line (blank lines and `#` comments skipped),
/// read again whenever its modification time changes: a deploy tool rewrites it (atomically,
/// by renaming a new file over it) and the pool follows.
#[derive(Debug)]
pub struct EndpointFile {
    path: PathBuf,
    last: Mutex<Option<(SystemTime, Vec<String>)>>,
}

impl EndpointFile {
    /// The file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), last: Mutex::new(None) }
    }
}

impl Discover for EndpointFile {
    async fn endpoints(&self) -> io::Result<Vec<String>> {
        let path = &self.path;
        let named = |e: io::Error| io::Error::new(e.kind(), format!("endpoint file {}: {e}", path.display()));
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).map_err(named)?;
        if let Some((at, endpoints)) = &*self.last.lock().unwrap_or_else(|e| e.into_inner())
            && *at == modified
        {
            return Ok(endpoints.clone());
        }
        // A small file: read at once rather than on a blocking thread.
        let text = std::fs::read_to_string(path).map_err(named)?;
        let endpoints: Vec<String> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((modified, endpoints.clone()));
        Ok(endpoints)
    }
}

/// DNS SRV records (`_service._tcp.example.com`): each names a target host and a port; the
/// targets are resolved (A and AAAA) to the endpoints. Only the records of the lowest
/// priority are used (higher ones are fallbacks, per RFC 2782); their weights are not: the
/// pool balances on requests in flight instead. Records are cached for their TTL.
pub struct DnsSrv {
    names: Vec<String>,
    resolver: hickory_resolver::TokioResolver,
}

impl std::fmt::Debug for DnsSrv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsSrv").field("names", &self.names).finish_non_exhaustive()
    }
}

impl DnsSrv {
    /// The SRV names, asked of the system's resolvers (`/etc/resolv.conf`).
    ///
    /// # Errors
    /// The system's resolver configuration cannot be read.
    pub fn new(names: Vec<String>) -> io::Result<Self> {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .map_err(|e| io::Error::other(format!("cannot read the system's DNS configuration: {e}")))?
            .build();
        Ok(Self { names, resolver })
    }

    /// The SRV names, asked of the DNS server at `nameserver` (a service registry's DNS
    /// interface, such as Consul's on port 8600).
    pub fn with_nameserver(names: Vec<String>, nameserver: std::net::SocketAddr) -> Self {
        use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
        let servers = NameServerConfigGroup::from_ips_clear(&[nameserver.ip()], nameserver.port(), true);
        let config = ResolverConfig::from_parts(None, vec![], servers);
        let resolver = hickory_resolver::Resolver::builder_with_config(
            config,
            hickory_resolver::name_server::TokioConnectionProvider::default(),
        )
        .build();
        Self { names, resolver }
    }
}

impl Discover for DnsSrv {
    async fn endpoints(&self) -> io::Result<Vec<String>> {
        let mut found = Vec::new();
        let mut failures = Vec::new();
        for name in &self.names {
            let records = match self.resolver.srv_lookup(name.as_str()).await {
                Ok(records) => records,
                Err(e) => {
                    failures.push(format!("{name}: {e}"));
                    continue;
                }
            };
            let best = records.iter().map(|r| r.priority()).min();
            for record in records.iter().filter(|r| Some(r.priority()) == best) {
                match self.resolver.lookup_ip(record.target().clone()).await {
                    Ok(ips) => found.extend(
                        ips.iter().map(|ip| std::net::SocketAddr::new(ip, record.port()).to_string()),
                    ),
                    Err(e) => failures.push(format!("{name}: target {}: {e}", record.target())),
                }
            }
        }
        if found.is_empty() && !failures.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, failures.join("; ")));
        }
        found.sort();
        found.dedup();
        Ok(found)
    }
}
