//! The system under test: one proxy on 127.0.0.1:0 in front of three recording
//! backends, so a test sees which backend (and so which route) got a request.
//!
//! ```text
//! host internal.example, any path       -> internal  (route "internal")
//! any other host: /checkout              -> public    (critical)
//!                 /reports, /api/reports -> batch     (sheddable)
//!                 /cart/items            -> batch     (sheddable)
//!                 /                      -> public    (normal)
//! ```
//! Health checks, actuator polls and shedding are off: every byte a backend reads came
//! from a client request.

use std::time::Duration;

use loadgate::config::Config;
use loadgate::listener::Proxy;

use crate::hygiene::recorder::Recorder;

/// Which recording backend a request is expected at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Upstream "internal": every path of host `internal.example`.
    Internal,
    /// Upstream "public": `/checkout` and the catch-all `/` of any other host.
    Public,
    /// Upstream "batch": the sheddable routes `/reports`, `/api/reports`, `/cart/items`.
    Batch,
}

pub struct Rig {
    pub proxy: Proxy,
    internal: Recorder,
    public: Recorder,
    batch: Recorder,
}

impl Rig {
    pub async fn start() -> Rig {
        let internal = Recorder::start().await;
        let public = Recorder::start().await;
        let batch = Recorder::start().await;
        let toml = config_toml(&internal, &public, &batch);
        let config = Config::parse(&toml, "hygiene").unwrap_or_else(|e| panic!("config: {e}"));
        let proxy = Proxy::start(config).await.expect("proxy starts");
        Rig {
            proxy,
            internal,
            public,
            batch,
        }
    }

    pub fn backend(&self, which: Backend) -> &Recorder {
        match which {
            Backend::Internal => &self.internal,
            Backend::Public => &self.public,
            Backend::Batch => &self.batch,
        }
    }

    pub fn all(&self) -> [(Backend, &Recorder); 3] {
        [
            (Backend::Internal, &self.internal),
            (Backend::Public, &self.public),
            (Backend::Batch, &self.batch),
        ]
    }

    /// Bytes any backend read, complete requests or not.
    pub fn bytes_forwarded(&self) -> usize {
        self.all().iter().map(|(_, r)| r.bytes_seen()).sum()
    }

    /// Every request recorded so far, with the backend that got it.
    pub fn forwarded(&self) -> Vec<(Backend, Vec<u8>)> {
        self.all()
            .iter()
            .flat_map(|(which, r)| r.requests().into_iter().map(move |req| (*which, req)))
            .collect()
    }

    /// The first `n` requests at `which`, waiting up to `within` for them.
    pub async fn wait_for(
        &self,
        which: Backend,
        n: usize,
        within: Duration,
    ) -> Option<Vec<Vec<u8>>> {
        self.backend(which).wait_for(n, within).await
    }
}

fn config_toml(internal: &Recorder, public: &Recorder, batch: &Recorder) -> String {
    let upstream = |name: &str, backend: &Recorder| {
        format!(
            r#"
[[upstream]]
name = "{name}"
backends = ["{addr}"]
health = {{ enabled = false }}
actuator = {{ enabled = false }}
shedding = {{ mode = "off" }}
"#,
            addr = backend.addr()
        )
    };
    let mut toml = String::from(
        r#"
[server]
listen = ["127.0.0.1:0"]
worker_threads = 1
drain_timeout_ms = 200

[admin]
listen = "127.0.0.1:0"
"#,
    );
    toml.push_str(&upstream("internal", internal));
    toml.push_str(&upstream("public", public));
    toml.push_str(&upstream("batch", batch));
    toml.push_str(
        r#"
[[route]]
name = "internal"
host = "internal.example"
path_prefix = "/"
upstream = "internal"

[[route]]
name = "checkout"
path_prefix = "/checkout"
upstream = "public"
class = "critical"

[[route]]
name = "reports"
path_prefix = "/reports"
upstream = "batch"
class = "sheddable"

[[route]]
name = "api-reports"
path_prefix = "/api/reports"
upstream = "batch"
class = "sheddable"

[[route]]
name = "cart-items"
path_prefix = "/cart/items"
upstream = "batch"
class = "sheddable"

[[route]]
name = "default"
path_prefix = "/"
upstream = "public"
"#,
    );
    toml
}
