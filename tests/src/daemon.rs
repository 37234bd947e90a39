//! Running `hearth run` in tests: start it with arguments and environment,
//! scrape its metrics endpoint, stop it with a signal and collect its exit
//! status and log.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::hearth_bin;

/// Options that keep the governor out of tests that need a steady
/// frequency (the test machine is small and shared).
pub const NO_GOVERNOR: &[&str] = &["--max-cpu-percent", "100", "--max-host-load-percent", "100"];

/// `hearth run` arguments: export to the OTLP receiver at `endpoint`
/// every second at 99 Hz, spooling in `spool`, without the governor, then
/// `extra`.
pub fn otlp_args<'a>(endpoint: &'a str, spool: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--otlp-endpoint",
        endpoint,
        "--spool-dir",
        spool.to_str().unwrap(),
        "--interval",
        "1s",
        "-F",
        "99",
    ];
    args.extend_from_slice(NO_GOVERNOR);
    args.extend_from_slice(extra);
    args
}

/// A running `hearth run`, killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    pub metrics_addr: SocketAddr,
}

/// How a daemon ended.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    /// Everything it logged.
    pub log: String,
    /// Time from the signal to the exit.
    pub took: Duration,
}

impl Daemon {
    /// Starts `hearth run <args>` with its metrics on a free local port,
    /// logging to `<dir>/hearth-<n>.log`.
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let metrics_addr = free_local_addr();
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let log = dir.join(format!("hearth-{n}.log"));
        let log_file = std::fs::File::create(&log).expect("creating the daemon log");
        let child = Command::new(hearth_bin())
            .arg("run")
            .args(["--metrics-addr", &metrics_addr.to_string()])
            .args(args)
            .envs(env.iter().copied())
            .env("HEARTH_LOG", "info,hearth=debug")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("starting hearth run");
        Daemon {
            child: Some(child),
            log,
            metrics_addr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200 (the first window was drained).
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("hearth run exited early ({status}):\n{}", self.log());
            }
            if let Ok((200, _)) = http_get(self.metrics_addr, "/readyz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hearth run not ready after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The current value of a metric series (`name` or `name{labels}`, as
    /// it appears in the exposition), or `None` when absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = http_get(self.metrics_addr, "/metrics").ok()?;
        metric_value(&body, series)
    }

    /// Waits until `check` holds for a metric, returning its value.
    pub fn wait_metric(&self, series: &str, timeout: Duration, check: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.metric(series) {
                if check(v) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{series} = {:?} did not reach the expected value within {timeout:?}:\n{}",
                self.metric(series),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends `signal` and waits up to `timeout` for the exit.
    pub fn stop_with(mut self, signal: i32, timeout: Duration) -> Stopped {
        let mut child = self.child.take().expect("daemon running");
        let started = Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        loop {
            if let Some(status) = child.try_wait().expect("waiting for hearth") {
                return Stopped {
                    status,
                    log: self.log(),
                    took: started.elapsed(),
                };
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hearth run did not exit within {timeout:?} of signal {signal}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, as systemd and Kubernetes stop it.
    pub fn stop(self) -> Stopped {
        self.stop_with(libc::SIGTERM, Duration::from_secs(30))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A local address nothing listens on right now.
pub fn free_local_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address")
}

/// A minimal HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of `series` in Prometheus text.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        // `name` must not match `name_total` or `name{…}`.
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::metric_value;

    #[test]
    fn metric_lines() {
        let text =
            "# HELP a_total x\n# TYPE a_total counter\na_total 3\na_total_x 9\nb{k=\"v\"} 2.5\n";
        assert_eq!(metric_value(text, "a_total"), Some(3.0));
        assert_eq!(metric_value(text, "b{k=\"v\"}"), Some(2.5));
        assert_eq!(metric_value(text, "b"), None);
        assert_eq!(metric_value(text, "c"), None);
    }
}
