//! Process metrics in the Prometheus client convention (`process_resident_memory_bytes`,
//! `process_cpu_seconds_total`, …, as the official clients name them, so standard
//! dashboards work), read from `/proc/self` each time `/metrics` is scraped.
//!
//! Linux only: where `/proc/self` cannot be read (another OS, a locked-down mount)
//! each metric that could not be read is left out of the scrape, never shown as 0.
//! They are rendered here, with their help and type, rather than recorded through the
//! `metrics` facade: its counters count whole numbers, and CPU seconds are not.

use std::fmt::Write as _;
use std::sync::OnceLock;

use super::{
    PROCESS_CPU_SECONDS_TOTAL, PROCESS_MAX_FDS, PROCESS_OPEN_FDS, PROCESS_RESIDENT_MEMORY_BYTES,
    PROCESS_START_TIME_SECONDS, PROCESS_THREADS, PROCESS_VIRTUAL_MEMORY_BYTES,
};

/// The process as one scrape reads it; `None` for what could not be read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub start_time_seconds: Option<f64>,
    pub threads: Option<u64>,
}

/// Reads the process's figures now.
pub fn sample() -> Sample {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|text| Stat::parse(&text));
    let status = std::fs::read_to_string("/proc/self/status").ok();
    let ticks = clock_ticks() as f64;
    Sample {
        resident_memory_bytes: status.as_deref().and_then(resident_bytes),
        virtual_memory_bytes: stat.map(|s| s.vsize),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64),
        max_fds: std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|text| max_open_files(&text)),
        cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / ticks),
        start_time_seconds: start_time(stat),
        threads: stat.map(|s| s.threads),
    }
}

/// Appends the process metrics to a Prometheus text rendering: each one read, with its
/// `# HELP` and `# TYPE` lines.
pub fn render(out: &mut String) {
    sample().render(out);
}

impl Sample {
    fn render(&self, out: &mut String) {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        let int = |v: Option<u64>| v.map(|v| v.to_string());
        let float = |v: Option<f64>| v.map(|v| v.to_string());
        let metrics = [
            (
                PROCESS_CPU_SECONDS_TOTAL,
                "counter",
                "Total user and system CPU time spent in seconds.",
                float(self.cpu_seconds),
            ),
            (
                PROCESS_OPEN_FDS,
                "gauge",
                "Number of open file descriptors.",
                int(self.open_fds),
            ),
            (
                PROCESS_MAX_FDS,
                "gauge",
                "Maximum number of open file descriptors.",
                int(self.max_fds),
            ),
            (
                PROCESS_VIRTUAL_MEMORY_BYTES,
                "gauge",
                "Virtual memory size in bytes.",
                int(self.virtual_memory_bytes),
            ),
            (
                PROCESS_RESIDENT_MEMORY_BYTES,
                "gauge",
                "Resident memory size in bytes.",
                int(self.resident_memory_bytes),
            ),
            (
                PROCESS_START_TIME_SECONDS,
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                float(self.start_time_seconds),
            ),
            (
                PROCESS_THREADS,
                "gauge",
                "Number of OS threads in the process.",
                int(self.threads),
            ),
        ];
        for (name, kind, help, value) in metrics {
            if let Some(value) = value {
                let _ = write!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
                );
            }
        }
    }
}

/// The fields of `/proc/self/stat` read here (see proc(5)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    /// User and system CPU time, in clock ticks.
    utime: u64,
    stime: u64,
    threads: u64,
    /// When the process started, in clock ticks after boot.
    starttime: u64,
    /// Virtual memory size, in bytes.
    vsize: u64,
}

impl Stat {
    /// Parses `pid (comm) state ppid …`. The command name may hold spaces and
    /// parentheses, so the fields are counted from the last `)`.
    fn parse(text: &str) -> Option<Stat> {
        let (_, rest) = text.rsplit_once(')')?;
        // Field 3 (state) is the first after the name.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            threads: field(20)?,
            starttime: field(22)?,
            vsize: field(23)?,
        })
    }
}

/// `VmRSS` of `/proc/self/status`, in bytes (the file gives kB).
fn resident_bytes(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix("VmRSS:")?.trim();
        let kb: u64 = value.strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// The soft limit of `Max open files` in `/proc/self/limits`; `None` when unlimited.
fn max_open_files(limits: &str) -> Option<u64> {
    limits.lines().find_map(|line| {
        let rest = line.strip_prefix("Max open files")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The start time in seconds since the epoch: boot time (`btime` in `/proc/stat`) plus
/// the start in ticks after boot. Read once: neither changes.
fn start_time(stat: Option<Stat>) -> Option<f64> {
    static BOOT_TIME: OnceLock<Option<u64>> = OnceLock::new();
    let boot = BOOT_TIME.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        boot_time(&text)
    });
    let secs = (*boot)? as f64 + stat?.starttime as f64 / clock_ticks() as f64;
    // To 10 ms, the tick of mainstream Linux: no more digits than the source has.
    Some((secs * 100.0).round() / 100.0)
}

/// `btime` of `/proc/stat`: when the system booted, in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
}

/// Clock ticks per second, the unit of the CPU and start times in `/proc/self/stat`:
/// `AT_CLKTCK` of the process's auxiliary vector (what `sysconf(_SC_CLK_TCK)` returns,
/// read without unsafe code), else 100, the `USER_HZ` of every mainstream Linux
/// architecture.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|auxv| auxv_value(&auxv, AT_CLKTCK))
            .filter(|&ticks| ticks > 0)
            .unwrap_or(100)
    })
}

/// The auxiliary vector's entry type for clock ticks per second (elf.h).
const AT_CLKTCK: u64 = 17;

/// The value of entry `key` in an auxiliary vector: pairs of native words, type then
/// value, ending with type 0 (`AT_NULL`).
fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |bytes: &[u8]| -> u64 {
        let mut buf = [0u8; WORD];
        buf.copy_from_slice(bytes);
        usize::from_ne_bytes(buf) as u64
    };
    auxv.chunks_exact(2 * WORD)
        .map(|pair| (word(&pair[..WORD]), word(&pair[WORD..])))
        .take_while(|&(kind, _)| kind != 0)
        .find_map(|(kind, value)| (kind == key).then_some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis in it.
        let text = "4242 (my (proxy) x) S 1 4242 4242 0 -1 4194560 2331 0 0 0 \
                    150 37 0 0 20 0 9 0 123456 987654144 3010 18446744073709551615 1 1 0 0 0\n";
        assert_eq!(
            Stat::parse(text),
            Some(Stat {
                utime: 150,
                stime: 37,
                threads: 9,
                starttime: 123456,
                vsize: 987654144,
            })
        );
        assert_eq!(Stat::parse("4242 (cut short) S 1 2"), None);
        assert_eq!(Stat::parse("no parenthesis"), None);
    }

    #[test]
    fn status_limits_and_boot_time_are_read_by_their_names() {
        let status = "Name:\tloadgate\nVmPeak:\t  20000 kB\nVmRSS:\t    1928 kB\nThreads:\t5\n";
        assert_eq!(resident_bytes(status), Some(1928 * 1024));
        assert_eq!(resident_bytes("Name:\tkthread\n"), None);

        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             96365                96365                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_open_files(unlimited), None);

        let proc_stat =
            "cpu  1 2 3 4\ncpu0 1 2 3 4\nintr 5\nctxt 6\nbtime 1700000000\nprocesses 7\n";
        assert_eq!(boot_time(proc_stat), Some(1_700_000_000));
    }

    #[test]
    fn auxv_entries_are_native_word_pairs_up_to_at_null() {
        let words = |pairs: &[(usize, usize)]| -> Vec<u8> {
            pairs
                .iter()
                .flat_map(|&(k, v)| [k.to_ne_bytes(), v.to_ne_bytes()])
                .flatten()
                .collect()
        };
        let auxv = words(&[(6, 4096), (17, 250), (0, 0), (17, 999)]);
        assert_eq!(auxv_value(&auxv, AT_CLKTCK), Some(250));
        assert_eq!(auxv_value(&auxv, 6), Some(4096));
        let ended = words(&[(6, 4096), (0, 0), (17, 999)]);
        assert_eq!(auxv_value(&ended, AT_CLKTCK), None, "nothing after AT_NULL");
    }

    #[test]
    fn a_sample_renders_what_was_read_with_help_and_type() {
        let sample = Sample {
            resident_memory_bytes: Some(1_048_576),
            cpu_seconds: Some(1.25),
            ..Sample::default()
        };
        let mut out = String::from("loadgate_shed_total 0");
        sample.render(&mut out);
        assert_eq!(
            out,
            "loadgate_shed_total 0\n\
             # HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds_total counter\n\
             process_cpu_seconds_total 1.25\n\
             # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\n\
             process_resident_memory_bytes 1048576\n"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_plausibly() {
        let s = sample();
        assert!(s.resident_memory_bytes.unwrap() > 0, "{s:?}");
        assert!(s.virtual_memory_bytes.unwrap() >= s.resident_memory_bytes.unwrap());
        assert!(s.open_fds.unwrap() >= 3, "{s:?}");
        assert!(s.max_fds.unwrap() >= s.open_fds.unwrap(), "{s:?}");
        assert!(s.threads.unwrap() >= 1, "{s:?}");
        assert!(s.cpu_seconds.unwrap() >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = s.start_time_seconds.unwrap();
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "{started} vs {now}"
        );
    }
}
