//! A real Apache Tomcat 10.1 (Debian's `tomcat10` package) as a child process, for the
//! tests and benches that run loadgate against the server it is built for.
//!
//! [`Tomcat::start`] builds a `CATALINA_BASE` in a temporary directory (one HTTP/1.1 NIO
//! connector on a free 127.0.0.1 port, `tests/tomcat-webapp` as ROOT), runs the JVM
//! directly (what `catalina.sh run` runs, without the shell in between, so the PID held
//! is the JVM's) and waits until every page of the webapp answers. Dropping the value
//! stops the JVM by its PID and deletes the directory.
//!
//! Self-contained, std and `tempfile` only: the benches include this file by path too.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `tomcat10` installs Tomcat (`CATALINA_HOME`).
const CATALINA_HOME: &str = "/usr/share/tomcat10";
/// Debian's stock config files; `/etc/tomcat10` holds the same ones, readable by root only.
const STOCK_CONF: [&str; 2] = ["/usr/share/tomcat10/etc", "/etc/tomcat10"];
/// The webapp deployed as ROOT.
const WEBAPP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tomcat-webapp");
/// Every page of the webapp: requested once before `start` returns, so none is
/// compiled by Jasper while a test measures.
const PAGES: [&str; 4] = [
    "/api/ready",
    "/actuator/health",
    "/actuator/metrics/tomcat.threads.busy",
    "/actuator/metrics/tomcat.threads.config.max",
];
/// The longest a start may take (a cold JVM on a busy 2-core CI machine takes seconds).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Attempts when the port picked is taken before Tomcat binds it.
const PORT_ATTEMPTS: usize = 5;
/// How long the JVM gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The JVM's options: a small heap, a quick start.
const JVM_OPTIONS: &[&str] = &[
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-Xshare:auto",
    // C1 only: starts in about half the time (Jasper compiles the JSPs on a cold JVM);
    // the work is sleeps, so the slower steady state does not show.
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Djava.security.egd=file:/dev/./urandom",
    // A connector that cannot bind makes the JVM exit instead of running without it.
    "-Dorg.apache.catalina.startup.EXIT_ON_INIT_FAILURE=true",
    // What catalina.sh adds on Java 17.
    "-Djava.protocol.handler.pkgs=org.apache.catalina.webresources",
    "-Djava.util.logging.manager=org.apache.juli.ClassLoaderLogManager",
    "-Djdk.tls.ephemeralDHKeySize=2048",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.rmi/sun.rmi.transport=ALL-UNNAMED",
];

/// A running Tomcat serving `tests/tomcat-webapp` on 127.0.0.1.
pub struct Tomcat {
    child: Child,
    addr: SocketAddr,
    base: tempfile::TempDir,
}

impl Tomcat {
    /// Starts Tomcat with `max_threads` worker threads (all started at once) on a free
    /// 127.0.0.1 port, the webapp as ROOT, and waits until every page answers.
    ///
    /// Returns `None`, after saying why on stderr, when Debian's tomcat10 or java is
    /// not installed. Panics with the tail of Tomcat's log when it does not come up
    /// within 90 s.
    pub fn start(max_threads: usize) -> Option<Tomcat> {
        assert!(max_threads > 0, "Tomcat needs at least one thread");
        let bootstrap = Path::new(CATALINA_HOME).join("bin/bootstrap.jar");
        if !bootstrap.is_file() {
            eprintln!(
                "skipping: Debian's tomcat10 is not installed (no {}; apt-get install tomcat10)",
                bootstrap.display()
            );
            return None;
        }
        let Some(java) = find_java() else {
            eprintln!(
                "skipping: Debian's tomcat10 is not installed (no java on PATH or in JAVA_HOME; \
                 apt-get install tomcat10 pulls in a JRE)"
            );
            return None;
        };
        let started = Instant::now();
        for attempt in 1..=PORT_ATTEMPTS {
            let base = tempfile::Builder::new()
                .prefix("loadgate-tomcat-")
                .tempdir()
                .expect("a temporary CATALINA_BASE");
            let addr = free_port();
            build_base(base.path(), addr, max_threads);
            let mut tomcat = Tomcat {
                child: spawn(&java, base.path()),
                addr,
                base,
            };
            match tomcat.wait_until_ready(started + START_TIMEOUT) {
                Ok(()) => return Some(tomcat),
                Err(Failure::PortTaken) if attempt < PORT_ATTEMPTS => continue,
                Err(failure) => panic!(
                    "Tomcat on {addr} {failure}; the tail of its log:\n{}",
                    tomcat.log_tail(60)
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The JVM's stdout and stderr (Tomcat logs to the console too).
    pub fn log_path(&self) -> PathBuf {
        self.base.path().join("logs/console.log")
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Polls every page until each has answered 200, the JVM exits, or `deadline`.
    fn wait_until_ready(&mut self, deadline: Instant) -> Result<(), Failure> {
        let mut pending = PAGES.iter().peekable();
        let mut last = String::from("no answer yet");
        while let Some(page) = pending.peek() {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = fs::read_to_string(self.log_path()).unwrap_or_default();
                return Err(if log.contains("Address already in use") {
                    Failure::PortTaken
                } else {
                    Failure::Exited(status.to_string())
                });
            }
            if Instant::now() >= deadline {
                return Err(Failure::Timeout(last));
            }
            match get(self.addr, page) {
                Ok((200, _)) => {
                    pending.next();
                    continue;
                }
                Ok((status, body)) => last = format!("{page} answered {status}: {body}"),
                Err(e) => last = format!("{page}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Tomcat {
    /// SIGTERM (Tomcat's shutdown hook stops it cleanly), SIGKILL if it is still
    /// running after 5 s; either way the JVM is reaped before the directory goes.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + STOP_TIMEOUT;
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() >= deadline {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.wait();
    }
}

/// Why a start attempt failed.
enum Failure {
    /// Another socket took the port between our probe and Tomcat's bind.
    PortTaken,
    Exited(String),
    Timeout(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::PortTaken => write!(f, "could not bind its port"),
            Failure::Exited(status) => write!(f, "exited during startup ({status})"),
            Failure::Timeout(last) => {
                write!(f, "did not answer within {START_TIMEOUT:?} (last: {last})")
            }
        }
    }
}

/// `$JAVA_HOME/bin/java`, else the first `java` on `PATH`.
fn find_java() -> Option<PathBuf> {
    let from_home = std::env::var_os("JAVA_HOME").map(|home| PathBuf::from(home).join("bin/java"));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("java"));
    from_home
        .into_iter()
        .chain(on_path)
        .find(|java| java.is_file())
}

/// A port that was free a moment ago (bound on 127.0.0.1:0, then released).
fn free_port() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port on 127.0.0.1")
}

/// Writes a `CATALINA_BASE`: conf/ (our server.xml, Debian's other files with jar
/// scanning off), webapps/ROOT, and empty logs/, work/ and temp/.
fn build_base(base: &Path, addr: SocketAddr, max_threads: usize) {
    let stock = STOCK_CONF
        .iter()
        .map(Path::new)
        .find(|dir| fs::read(dir.join("web.xml")).is_ok())
        .unwrap_or_else(|| panic!("no readable Tomcat config in {STOCK_CONF:?}"));
    let read = |name: &str| {
        fs::read_to_string(stock.join(name))
            .unwrap_or_else(|e| panic!("reading {}: {e}", stock.join(name).display()))
    };
    let conf = base.join("conf");
    for dir in ["conf", "logs", "work", "temp", "webapps"] {
        fs::create_dir_all(base.join(dir)).expect("creating CATALINA_BASE directories");
    }
    let write = |name: &str, text: &str| {
        fs::write(conf.join(name), text).unwrap_or_else(|e| panic!("writing conf/{name}: {e}"))
    };
    write("server.xml", &server_xml(addr, max_threads));
    write("web.xml", &read("web.xml"));
    write("logging.properties", &read("logging.properties"));
    // Later keys win: scan no jar for TLDs or annotations (the webapp has none).
    write(
        "catalina.properties",
        &format!(
            "{}\n# loadgate tests: no jar scanning, for a fast start.\n\
             tomcat.util.scan.StandardJarScanFilter.jarsToSkip=*\n\
             tomcat.util.scan.StandardJarScanFilter.jarsToScan=\n",
            read("catalina.properties")
        ),
    );
    write(
        "context.xml",
        &read("context.xml").replace(
            "</Context>",
            "    <JarScanner scanClassPath=\"false\" scanManifest=\"false\" />\n</Context>",
        ),
    );
    copy_dir(Path::new(WEBAPP), &base.join("webapps/ROOT"));
}

/// One NIO connector on `addr` with a warm pool of `max_threads`; the rest as Tomcat's
/// stock server.xml has it (acceptCount 100, keep-alive 20 s), minus the shutdown port,
/// AJP and the listeners that do not apply (the security listener refuses root).
fn server_xml(addr: SocketAddr, max_threads: usize) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by loadgate's tests/it/support/tomcat.rs. -->
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector address="{ip}" port="{port}" protocol="HTTP/1.1"
               maxThreads="{max_threads}" minSpareThreads="{max_threads}"
               connectionTimeout="20000" keepAliveTimeout="20000"
               maxParameterCount="1000" />
    <Engine name="Catalina" defaultHost="localhost">
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false" />
    </Engine>
  </Service>
</Server>
"#,
        ip = addr.ip(),
        port = addr.port(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
    let entries = fs::read_dir(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copying {}: {e}", entry.path().display()));
        }
    }
}

/// Runs the JVM as `catalina.sh run` would, output to logs/console.log.
fn spawn(java: &Path, base: &Path) -> Child {
    let log = fs::File::create(base.join("logs/console.log")).expect("creating the console log");
    let classpath =
        format!("{CATALINA_HOME}/bin/bootstrap.jar:{CATALINA_HOME}/bin/tomcat-juli.jar");
    Command::new(java)
        .args(JVM_OPTIONS)
        .arg(format!(
            "-Djava.util.logging.config.file={}",
            base.join("conf/logging.properties").display()
        ))
        .arg(format!("-Dcatalina.home={CATALINA_HOME}"))
        .arg(format!("-Dcatalina.base={}", base.display()))
        .arg(format!("-Djava.io.tmpdir={}", base.join("temp").display()))
        .args(["-classpath", &classpath])
        .args(["org.apache.catalina.startup.Bootstrap", "start"])
        .current_dir(base)
        .env("CATALINA_HOME", CATALINA_HOME)
        .env("CATALINA_BASE", base)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("cloning the log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", java.display()))
}

/// One `GET path` over HTTP/1.0 (so the answer is never chunked and ends at close),
/// bounded by 10 s. Returns the status and the body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, answer.to_string());
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_string()))
}
