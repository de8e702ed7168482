//! What an operator reads from a proxy's admin listener: `/status`, `/readyz` and the
//! samples of `/metrics`, fetched over HTTP as an operator would.
//!
//! Metrics are process-wide (one Prometheus recorder for every proxy the tests start):
//! a test asserts on series labelled with something of its own (an upstream name, a
//! backend address), or on how a counter moved.

use loadgate::listener::Proxy;

use super::{client, get, Got};

/// `GET path` on the admin listener.
pub async fn fetch(proxy: &Proxy, path: &str) -> Got {
    get(&client(), &format!("http://{}{path}", proxy.admin_addr())).await
}

/// The `/status` document.
pub async fn status(proxy: &Proxy) -> serde_json::Value {
    fetch(proxy, "/status").await.json()
}

pub async fn readyz(proxy: &Proxy) -> Got {
    fetch(proxy, "/readyz").await
}

/// The `/metrics` text.
pub async fn metrics(proxy: &Proxy) -> String {
    fetch(proxy, "/metrics").await.text()
}

/// The value of the series `name` with exactly `labels` (in any order), if scraped.
pub async fn metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    sample(&metrics(proxy).await, name, labels)
}

/// Like [`metric`], for a counter: 0 until it is first incremented (an absent series).
pub async fn counter(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(proxy, name, labels).await.unwrap_or(0.0)
}

/// Waits (at most 5 s) for the counter `name{labels}` to read `want`, and returns what
/// it read last. A request is counted when its response body ends on the proxy's side,
/// which can be just after the client has read the last byte.
pub async fn counter_settles(proxy: &Proxy, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let value = counter(proxy, name, labels).await;
        if value == want || tokio::time::Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of the first sample line `name{labels} value` of a Prometheus text
/// rendering whose label set is `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rendered) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let mut found = label_pairs(rendered)?;
            let mut wanted: Vec<(&str, String)> =
                labels.iter().map(|&(k, v)| (k, v.to_string())).collect();
            found.sort();
            wanted.sort();
            (series_name == name && found == wanted)
                .then(|| value.parse().ok())
                .flatten()
        })
}

/// The `key="value"` pairs of a rendered label set (`a="1",b="2"`), values unescaped.
fn label_pairs(mut rendered: &str) -> Option<Vec<(&str, String)>> {
    let mut pairs = Vec::new();
    while !rendered.is_empty() {
        let (key, rest) = rendered.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => value.push(chars.next()?.1),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        pairs.push((key, value));
        rendered = rest[end + 1..].trim_start_matches(',');
    }
    Some(pairs)
}
