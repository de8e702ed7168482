//! nginx as a comparison target: found on PATH (or named by `LOADGATE_BENCH_NGINX`,
//! `off` to skip), run in the foreground from a generated config in a temp dir, so
//! it needs no root and writes nothing outside that dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::Process;

/// nginx on PATH or in the usual sbin directories, unless `LOADGATE_BENCH_NGINX`
/// names it or says `off`. The error says why the row is skipped.
pub fn find() -> Result<PathBuf, String> {
    match std::env::var("LOADGATE_BENCH_NGINX").ok().as_deref() {
        Some("off" | "0" | "no") => return Err("LOADGATE_BENCH_NGINX=off".to_string()),
        Some(path) if !path.is_empty() => {
            return if Path::new(path).is_file() {
                Ok(PathBuf::from(path))
            } else {
                Err(format!("LOADGATE_BENCH_NGINX={path} is not a file"))
            };
        }
        _ => {}
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            "nginx is not installed (not on PATH nor in /usr/sbin; e.g. apt-get install nginx-light)"
                .to_string()
        })
}

/// nginx in the foreground with a generated config in a temp dir: no root needed,
/// nothing written outside the temp dir.
pub struct Nginx {
    pub addr: SocketAddr,
    // Field order: the process stops before its directory is removed.
    pub process: Process,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx proxying to `backend` as loadgate does (see [`proxy_conf`]).
    pub fn start(nginx: &Path, workers: usize, backend: SocketAddr) -> Result<Nginx, String> {
        Nginx::start_with_conf(nginx, |dir, listen| {
            proxy_conf(dir, workers, listen, backend)
        })
    }

    /// nginx with the config `conf(dir, listen)` returns: `dir` is the temp dir (for
    /// pid, logs, temp and cache paths), `listen` the address it must listen on.
    /// The config must keep nginx in the foreground (`daemon off;`).
    pub fn start_with_conf(
        nginx: &Path,
        conf: impl FnOnce(&Path, SocketAddr) -> String,
    ) -> Result<Nginx, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let port = super::free_local_port().map_err(|e| format!("free port: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf(dir.path(), addr))
            .map_err(|e| format!("writing {}: {e}", conf_path.display()))?;
        let conf = conf_path;
        let error_log = dir.path().join("error.log");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let mut process = Process::from_child("nginx", child);
        let listening = super::wait_until_listening(addr, Duration::from_secs(10));
        if !listening || !process.is_running() {
            process.stop();
            let log = std::fs::read_to_string(&error_log).unwrap_or_default();
            return Err(format!(
                "not listening on {addr}; error.log: {}",
                log.trim()
            ));
        }
        Ok(Nginx {
            addr,
            process,
            _dir: dir,
        })
    }
}

/// nginx doing what loadgate does on this path: HTTP/1.1 keep-alive to the backend
/// (pooled, like loadgate's client), X-Forwarded-*, Via and X-Request-Id, no access
/// log, and no request cap per keep-alive connection on either side.
pub fn proxy_conf(dir: &Path, workers: usize, listen: SocketAddr, backend: SocketAddr) -> String {
    proxy_conf_with(dir, workers, listen, backend, "", "")
}

/// [`proxy_conf`] with extra directives: `http` in the `http` block (e.g. a
/// `proxy_cache_path`), `location` in the proxied `location /` (e.g. `proxy_cache`).
/// `{dir}` in either is replaced with the temp dir.
pub fn proxy_conf_with(
    dir: &Path,
    workers: usize,
    listen: SocketAddr,
    backend: SocketAddr,
    http: &str,
    location: &str,
) -> String {
    let d = dir.display();
    // Each extra line on a line of its own, indented to its block.
    let extra = |text: &str, indent: &str| {
        text.replace("{dir}", &d.to_string())
            .lines()
            .map(|line| format!("\n{indent}{}", line.trim()))
            .collect::<String>()
    };
    let http = extra(http, "    ");
    let location = extra(location, "            ");
    format!(
        r#"# generated by benches/common/nginx.rs
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 60s;
    keepalive_requests 100000000;{http}
    upstream backend {{
        server {backend};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Request-Id $request_id;
            proxy_set_header Via "1.1 nginx";
            add_header X-Request-Id $request_id always;
            add_header Via "1.1 nginx" always;{location}
        }}
    }}
}}
"#
    )
}
