//! Every file in `config/` loads, and the embedded demo is what the docs promise.

use std::path::Path;

use loadgate::config::{CachePolicy, Config, RouteClass};

#[test]
fn every_file_in_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("readable directory entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = Config::load(&path) {
                panic!("{e}");
            }
            loaded.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    loaded.sort();
    assert!(
        loaded.iter().any(|f| f == "loadgate.toml") && loaded.iter().any(|f| f == "demo.toml"),
        "expected loadgate.toml and demo.toml, found {loaded:?}"
    );
}

#[test]
fn the_embedded_demo_is_the_file() {
    let from_file = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(Config::demo(), from_file);
}

#[test]
fn the_demo_shows_every_class_and_the_cache() {
    let c = Config::demo();
    for class in [
        RouteClass::Critical,
        RouteClass::Normal,
        RouteClass::Sheddable,
    ] {
        assert!(
            c.routes.iter().any(|r| r.class == class),
            "no {} route in the demo",
            class.as_str()
        );
    }
    assert!(
        c.routes.iter().any(|r| r.cache == CachePolicy::On),
        "no cached route"
    );

    assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
    assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
    let app = c.upstream("app").expect("upstream app");
    assert_eq!(app.backends, vec!["127.0.0.1:8081".to_string()]);
    assert_eq!(app.max_workers, 20);
    assert_eq!(app.health.path, "/actuator/health");

    let sim = c.sim.as_ref().expect("the demo runs the simulated backend");
    assert_eq!(sim.listen, "127.0.0.1:8081".parse().unwrap());
    assert_eq!(sim.workers, 20);
    assert_eq!(sim.service_time_ms, 50.0);
    assert_eq!(sim.keep_alive_timeout_ms, 20_000);
    assert!(
        app.idle_timeout.as_millis() < u128::from(sim.keep_alive_timeout_ms),
        "the proxy must drop idle connections before the backend does"
    );
    let catalog = sim.routes.iter().find(|r| r.path_prefix == "/api/catalog");
    assert_eq!(
        catalog.and_then(|r| r.cache_control.as_deref()),
        Some("max-age=30")
    );
}
