//! The deployment files a user copies: the Dockerfile, the config the image carries, and
//! the Kubernetes manifests in `deploy/kubernetes/`. Every loadgate config among them
//! passes `loadgate check-config` (the built binary), and each manifest agrees with the
//! config it mounts: the ports it exposes and probes, the paths it mounts, the grace
//! period it gives. Docker is not needed: the Dockerfile is read, not built.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use loadgate::config::Config;
use serde_norway::Value;

use crate::support::process;
use crate::support::tls::TestCa;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `loadgate check-config FILE`; panics with what it printed unless it passes.
fn check_config(path: &Path) {
    let out = process::command()
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-config {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// The Dockerfile.

/// One Dockerfile instruction: its keyword (uppercase) and its arguments, continuation
/// lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// The instructions of each stage, in order (a stage starts at `FROM`; what comes
/// before the first one, such as a global `ARG`, is left out).
fn dockerfile_stages(text: &str) -> Vec<Vec<Instruction>> {
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    let mut logical = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && logical.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            logical.push_str(head);
            logical.push(' ');
            continue;
        }
        logical.push_str(trimmed);
        let full = std::mem::take(&mut logical);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let instruction = Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        };
        if instruction.keyword == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push(instruction);
        }
    }
    stages
}

/// A `COPY`'s flags (`--from=build`), sources and destination.
struct Copy {
    from: Option<String>,
    sources: Vec<String>,
    destination: String,
}

fn parse_copy(args: &str) -> Copy {
    let mut from = None;
    let mut paths = Vec::new();
    for word in args.split_whitespace() {
        match word.strip_prefix("--") {
            Some(flag) => {
                if let Some(stage) = flag.strip_prefix("from=") {
                    from = Some(stage.to_string());
                }
            }
            None => paths.push(word.to_string()),
        }
    }
    let destination = paths.pop().expect("COPY names a destination");
    assert!(!paths.is_empty(), "COPY {args} names no source");
    Copy {
        from,
        sources: paths,
        destination,
    }
}

/// The port of each address.
fn ports(addrs: impl IntoIterator<Item = SocketAddr>) -> BTreeSet<u16> {
    addrs.into_iter().map(|a| a.port()).collect()
}

#[test]
fn the_dockerfile_copies_files_that_exist_runs_as_non_root_and_starts_a_valid_config() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("a Dockerfile");
    let stages = dockerfile_stages(&text);
    assert!(stages.len() >= 2, "a multi-stage build: {stages:?}");
    let ignored: Vec<String> = std::fs::read_to_string(repo().join(".dockerignore"))
        .expect("a .dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    for needed in ["target", ".git"] {
        assert!(
            ignored.iter().any(|i| i == needed),
            ".dockerignore leaves {needed}/ in the build context: {ignored:?}"
        );
    }

    // Every file copied from the build context exists and is in the context.
    let mut from_context = Vec::new();
    for instruction in stages.iter().flatten() {
        if instruction.keyword == "ADD" {
            panic!("ADD {}: use COPY", instruction.args);
        }
        if instruction.keyword != "COPY" {
            continue;
        }
        let copy = parse_copy(&instruction.args);
        if copy.from.is_some() {
            continue;
        }
        for source in copy.sources {
            let source = source.trim_end_matches('/').to_string();
            assert!(
                repo().join(&source).exists(),
                "COPY {source}: no such file in the repository"
            );
            assert!(
                !ignored
                    .iter()
                    .any(|i| source == *i || source.starts_with(&format!("{i}/"))),
                "COPY {source}: excluded by .dockerignore"
            );
            from_context.push(source);
        }
    }
    // What `cargo build` reads: the manifest, the lock file (--locked), the sources, the
    // bench targets Cargo.toml declares, and the demo config embedded by include_str!.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "benches/overload.rs",
        "config/demo.toml",
    ] {
        assert!(
            from_context
                .iter()
                .any(|s| needed == s || needed.starts_with(&format!("{s}/"))),
            "the build needs {needed}, and the Dockerfile does not copy it: {from_context:?}"
        );
    }
    assert!(
        text.contains("cargo build --release --locked"),
        "the build uses the lock file"
    );

    // The runtime stage: the binary from the build stage, a non-root numeric user.
    let runtime = stages.last().unwrap();
    let user = runtime
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .expect("the runtime stage sets USER");
    let uid = user.args.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "USER {}: a numeric uid other than 0, so runAsNonRoot can check it",
        user.args
    );
    let copies: Vec<Copy> = runtime
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| parse_copy(&i.args))
        .collect();
    assert!(
        copies
            .iter()
            .any(|c| c.from.is_some() && c.sources.iter().any(|s| s.ends_with("loadgate"))),
        "the runtime stage copies the binary from the build stage"
    );

    // ENTRYPOINT + CMD run the config the image carries, and that config is valid and
    // listens where EXPOSE says.
    let exec_form = |keyword: &str| -> Vec<String> {
        runtime
            .iter()
            .rev()
            .find(|i| i.keyword == keyword)
            .map(|i| serde_json::from_str(&i.args).expect("exec form: a JSON array"))
            .unwrap_or_default()
    };
    let command: Vec<String> = [exec_form("ENTRYPOINT"), exec_form("CMD")].concat();
    assert!(
        command.first().is_some_and(|c| c.ends_with("/loadgate")),
        "{command:?}"
    );
    let config_at = command
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1].clone())
        .unwrap_or_else(|| panic!("no --config in {command:?}"));
    assert_eq!(command[1], "run", "{command:?}");
    let config_copy = copies
        .iter()
        .find(|c| c.from.is_none() && c.destination == config_at)
        .unwrap_or_else(|| panic!("nothing is copied to {config_at}"));
    let source = repo().join(&config_copy.sources[0]);
    check_config(&source);

    let config = Config::load(&source).unwrap_or_else(|e| panic!("{e}"));
    for addr in config.server.listen.iter().chain([&config.admin.listen]) {
        assert!(
            addr.ip().is_unspecified(),
            "{addr}: a container's listeners must be on every interface"
        );
    }
    let exposed: BTreeSet<u16> = runtime
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().expect("EXPOSE a port"))
        .collect();
    let listening = ports(
        config
            .server
            .listen
            .iter()
            .copied()
            .chain([config.admin.listen]),
    );
    assert_eq!(exposed, listening, "EXPOSE and the config's listen ports");
}

// ---------------------------------------------------------------------------------------
// The Kubernetes manifests.

/// Every YAML document in `path`.
fn yaml_documents(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {value:?}"))
}

fn list<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value[key].as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

/// A Kubernetes duration as Spring writes it ("20s", "1m", "500ms"), in milliseconds.
fn spring_duration_ms(text: &str) -> u64 {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().expect("a number");
    match unit {
        "ms" => number,
        "" | "s" => number * 1000,
        "m" => number * 60_000,
        other => panic!("unit {other:?} in {text:?}"),
    }
}

/// `base` joined with `relative`, `..` and `.` resolved without the file system.
fn normalise(base: &str, relative: &Path) -> PathBuf {
    let mut out = PathBuf::from(base);
    for component in relative.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A container port given by number or by the name of one of `container`'s ports.
fn port_number(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let name = port.as_str().expect("a port number or name");
    list(container, "ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port named {name:?} in the container")) as u16
}

/// Asserts a probe is an httpGet of `path` on `port`.
fn assert_probe(container: &Value, probe: &str, path: &str, port: u16) {
    let get = &container[probe]["httpGet"];
    assert_eq!(
        get["path"].as_str(),
        Some(path),
        "{probe} of {}",
        str_of(container, "name")
    );
    assert_eq!(
        port_number(container, &get["port"]),
        port,
        "{probe} port of {}",
        str_of(container, "name")
    );
}

/// Checks one kustomization directory: its loadgate configs are valid, and its
/// Deployment runs loadgate on them with matching ports, probes, mounts and timing.
fn check_kustomization(dir: &Path) {
    let kustomization = &yaml_documents(&dir.join("kustomization.yaml"))[0];
    let resources: Vec<Value> = list(kustomization, "resources")
        .iter()
        .flat_map(|r| yaml_documents(&dir.join(r.as_str().unwrap())))
        .collect();
    let generators = list(kustomization, "configMapGenerator");
    assert!(
        !generators.is_empty(),
        "{}: no configMapGenerator",
        dir.display()
    );

    for generator in generators {
        let map_name = str_of(generator, "name");
        for file in list(generator, "files") {
            let file = file.as_str().unwrap();
            // The config at its place in the pod, with the TLS files a Secret would
            // bring beside it (its paths are relative: config/ and tls/ are siblings).
            let scratch = tempfile::tempdir().unwrap();
            let config_dir = scratch.path().join("config");
            let tls_dir = scratch.path().join("tls");
            std::fs::create_dir_all(&config_dir).unwrap();
            std::fs::create_dir_all(&tls_dir).unwrap();
            let leaf = TestCa::new().leaf(&tls_dir, "tls", &["shop.example.com"]);
            std::fs::rename(&leaf.cert_path, tls_dir.join("tls.crt")).unwrap();
            std::fs::rename(&leaf.key_path, tls_dir.join("tls.key")).unwrap();
            let placed = config_dir.join(file);
            std::fs::copy(dir.join(file), &placed).unwrap();
            check_config(&placed);
            let config = Config::load(&placed).unwrap_or_else(|e| panic!("{e}"));

            check_deployment(dir, &resources, map_name, file, &config, &config_dir);
        }
    }
}

fn check_deployment(
    dir: &Path,
    resources: &[Value],
    map_name: &str,
    file: &str,
    config: &Config,
    config_dir: &Path,
) {
    let what = format!("{}: {file}", dir.display());
    let deployment = resources
        .iter()
        .find(|r| {
            r["kind"] == "Deployment"
                && list(&r["spec"]["template"]["spec"], "volumes")
                    .iter()
                    .any(|v| v["configMap"]["name"].as_str() == Some(map_name))
        })
        .unwrap_or_else(|| panic!("{what}: no Deployment mounts ConfigMap {map_name}"));
    let pod = &deployment["spec"]["template"]["spec"];
    let volume = list(pod, "volumes")
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some(map_name))
        .map(|v| str_of(v, "name"))
        .unwrap();

    // The container that mounts the ConfigMap runs `loadgate run --config` on the file.
    let (containers, init) = (list(pod, "containers"), list(pod, "initContainers"));
    let (loadgate, mount) = containers
        .iter()
        .chain(init)
        .find_map(|c| {
            list(c, "volumeMounts")
                .iter()
                .find(|m| m["name"].as_str() == Some(volume))
                .map(|m| (c, m))
        })
        .unwrap_or_else(|| panic!("{what}: no container mounts volume {volume}"));
    assert!(
        mount["subPath"].is_null(),
        "{what}: a subPath mount never sees a ConfigMap change"
    );
    let mount_path = str_of(mount, "mountPath");
    let args: Vec<&str> = list(loadgate, "args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let expected = format!("{mount_path}/{file}");
    assert_eq!(
        args,
        ["run", "--config", expected.as_str()],
        "{what}: the container's args"
    );
    let sidecar = init
        .iter()
        .any(|c| std::ptr::eq(c, loadgate) && c["restartPolicy"] == "Always");
    assert!(
        containers.iter().any(|c| std::ptr::eq(c, loadgate)) || sidecar,
        "{what}: an init container that is not a native sidecar (restartPolicy: Always)"
    );
    let non_root = |v: &Value| v["securityContext"]["runAsNonRoot"].as_bool() == Some(true);
    assert!(non_root(loadgate) || non_root(pod), "{what}: runAsNonRoot");

    // Ports: every listener declared, the probes and the scrape on the admin port.
    let data_ports = ports(
        config
            .server
            .listen
            .iter()
            .chain(config.listeners.iter().map(|l| &l.address))
            .copied(),
    );
    let admin = config.admin.listen.port();
    let declared: BTreeSet<u16> = list(loadgate, "ports")
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap() as u16)
        .collect();
    let mut listening = data_ports.clone();
    listening.insert(admin);
    assert_eq!(declared, listening, "{what}: containerPorts");
    for addr in config.server.listen.iter().chain([&config.admin.listen]) {
        assert!(
            addr.ip().is_unspecified(),
            "{what}: {addr} is not reachable"
        );
    }
    assert_probe(loadgate, "livenessProbe", "/healthz", admin);
    assert_probe(loadgate, "readinessProbe", "/readyz", admin);
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(admin.to_string().as_str()),
        "{what}: the scrape port"
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));

    // Every Service selecting these pods sends to a loadgate data port.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let services: Vec<&Value> = resources
        .iter()
        .filter(|r| r["kind"] == "Service")
        .filter(|s| {
            let selector = s["spec"]["selector"].as_mapping().unwrap();
            selector
                .iter()
                .all(|(k, v)| labels[k.as_str().unwrap()] == *v)
        })
        .collect();
    assert!(!services.is_empty(), "{what}: no Service selects the pods");
    for service in services {
        for port in list(&service["spec"], "ports") {
            let target = port_number(loadgate, &port["targetPort"]);
            assert!(
                data_ports.contains(&target),
                "{what}: Service {} sends to {target}, not to loadgate ({data_ports:?})",
                str_of(&service["metadata"], "name")
            );
        }
    }

    // TLS files: where the config looks for them, a Secret is mounted.
    for listener in &config.listeners {
        for certificate in listener.tls.iter().flat_map(|t| &t.certificates) {
            for path in [&certificate.cert_path, &certificate.key_path] {
                let relative = path.strip_prefix(config_dir).unwrap();
                let in_pod = normalise(mount_path, relative);
                let secret_volume = list(loadgate, "volumeMounts")
                    .iter()
                    .find(|m| in_pod.starts_with(str_of(m, "mountPath")))
                    .map(|m| str_of(m, "name"))
                    .unwrap_or_else(|| panic!("{what}: nothing is mounted at {in_pod:?}"));
                let secret = list(pod, "volumes")
                    .iter()
                    .find(|v| v["name"].as_str() == Some(secret_volume))
                    .map(|v| &v["secret"])
                    .unwrap();
                assert!(
                    secret["secretName"].is_string(),
                    "{what}: {in_pod:?} comes from volume {secret_volume}, not a Secret"
                );
                let key = in_pod.file_name().unwrap().to_str().unwrap();
                assert!(
                    ["tls.crt", "tls.key"].contains(&key),
                    "{what}: {key} is not a key of a kubernetes.io/tls Secret"
                );
            }
        }
    }

    // The grace period covers the whole shutdown: loadgate's delay and drain, and for a
    // sidecar (stopped only once the app has exited) the app's preStop sleep and
    // Spring's graceful phase before them.
    let grace_ms = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: terminationGracePeriodSeconds"))
        * 1000;
    let mut needed = config.server.shutdown_delay.as_millis() as u64
        + config.server.drain_timeout.as_millis() as u64;
    if sidecar {
        let app_ms = containers
            .iter()
            .map(|c| {
                let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
                    .as_u64()
                    .unwrap_or(0)
                    * 1000;
                let env = |name: &str| {
                    list(c, "env")
                        .iter()
                        .find(|e| e["name"].as_str() == Some(name))
                        .and_then(|e| e["value"].as_str())
                };
                let graceful = env("SERVER_SHUTDOWN") == Some("graceful");
                assert!(graceful, "{what}: the app shuts down gracefully");
                let phase = env("SPRING_LIFECYCLE_TIMEOUT_PER_SHUTDOWN_PHASE")
                    .map_or(30_000, spring_duration_ms);
                pre_stop + phase
            })
            .max()
            .unwrap_or(0);
        needed += app_ms;
    }
    assert!(
        grace_ms >= needed,
        "{what}: terminationGracePeriodSeconds {} s does not cover {needed} ms of shutdown",
        grace_ms / 1000
    );
}

#[test]
fn every_kubernetes_config_passes_check_config_and_matches_its_manifests() {
    let root = repo().join("deploy/kubernetes");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&root).expect("deploy/kubernetes exists") {
        let dir = entry.unwrap().path();
        if dir.join("kustomization.yaml").exists() {
            check_kustomization(&dir);
            checked.push(dir.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    checked.sort();
    assert_eq!(checked, ["edge", "sidecar"]);
}

#[test]
fn the_sidecar_fronts_the_app_on_loopback_with_its_actuator_on_the_management_port() {
    let dir = repo().join("deploy/kubernetes/sidecar");
    let config = Config::load(&dir.join("loadgate.toml")).unwrap_or_else(|e| panic!("{e}"));
    let deployment = yaml_documents(&dir.join("deployment.yaml")).remove(0);
    let app = list(&deployment["spec"]["template"]["spec"], "containers")
        .iter()
        .find(|c| c["name"] == "app")
        .expect("the app container");
    let env = |name: &str| {
        list(app, "env")
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("the app sets no {name}"))
    };
    let upstream = &config.upstreams[0];
    assert_eq!(
        upstream.backends,
        [format!("{}:{}", env("SERVER_ADDRESS"), env("SERVER_PORT"))],
        "loadgate forwards to the app's server.address:server.port"
    );
    assert_eq!(
        upstream.management_port.map(|p| p.to_string()).as_deref(),
        Some(env("MANAGEMENT_SERVER_PORT")),
        "health checks and polls go to the management port"
    );
    assert_eq!(
        upstream.max_workers.to_string(),
        env("SERVER_TOMCAT_THREADS_MAX"),
        "max_workers is the app's thread pool"
    );
    assert_eq!(env("SERVER_TOMCAT_MBEANREGISTRY_ENABLED"), "true");
    assert!(env("MANAGEMENT_ENDPOINTS_WEB_EXPOSURE_INCLUDE").contains("metrics"));
    assert!(
        (upstream.idle_timeout.as_millis() as u64)
            < spring_duration_ms(env("SERVER_TOMCAT_KEEP_ALIVE_TIMEOUT")),
        "the proxy must close idle connections before Tomcat does"
    );
}
