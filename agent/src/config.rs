//! `hearth run` configuration: command-line flags, a TOML file and
//! `HEARTH_*` environment variables, merged in that precedence (flags win,
//! then the file, then the environment, then defaults) into one [`Config`].
//!
//! One struct, [`RunOptions`], is both the clap argument set and the TOML
//! schema, so a flag `--otlp-endpoint` is the key `otlp-endpoint` in the
//! file and `HEARTH_OTLP_ENDPOINT` in the environment, and the three can
//! never drift apart. Unknown keys and bad values fail at start-up with the
//! key's name in the message.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::{Deserialize, Serialize};

use crate::filter::{FilterRules, FilterSpec};
use crate::unwind::UnwindMode;

/// Default directory of the local store.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/hearth/profiles";
/// Default directory where undelivered OTLP requests wait.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/hearth/spool";

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid {source_name} for `{key}`: {message}")]
    Invalid {
        key: &'static str,
        source_name: &'static str,
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key,
            source_name: "value",
            message: message.into(),
        }
    }
}

/// `hearth run` arguments: where to read more configuration, plus every
/// option.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// TOML file with any of the options below (keys as the long flags,
    /// without the dashes in front).
    #[arg(long, env = "HEARTH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,

    #[command(flatten)]
    pub options: RunOptions,
}

/// Every `hearth run` option, all optional so the three sources can be
/// layered. Field names are the TOML keys (kebab-case) and, upper-cased
/// with `HEARTH_`, the environment variables.
#[derive(Debug, Clone, Default, PartialEq, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunOptions {
    /// Samples per second per CPU [default: 19].
    #[arg(short = 'F', long, env = "HEARTH_FREQUENCY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency: Option<u64>,

    /// How often the kernel maps are drained into a profile, ±10% jitter
    /// [default: 10s].
    #[arg(long, env = "HEARTH_INTERVAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,

    /// OTLP gRPC endpoint (http://host:4317 or https://host:4317). Without
    /// it, windows go to the local store.
    #[arg(long, env = "HEARTH_OTLP_ENDPOINT", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,

    /// Extra gRPC header `name=value` on every export (repeatable).
    #[arg(
        long = "otlp-header",
        env = "HEARTH_OTLP_HEADERS",
        value_name = "NAME=VALUE",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub otlp_headers: Vec<String>,

    /// File with one `name=value` header per line, so secrets stay out of
    /// the process list.
    #[arg(long, env = "HEARTH_OTLP_HEADERS_FILE", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_headers_file: Option<PathBuf>,

    /// CA certificate(s) (PEM) to verify the endpoint with, instead of the
    /// system roots.
    #[arg(long, env = "HEARTH_OTLP_CA", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS; needs --otlp-client-key.
    #[arg(long, env = "HEARTH_OTLP_CLIENT_CERT", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_client_cert: Option<PathBuf>,

    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "HEARTH_OTLP_CLIENT_KEY", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_client_key: Option<PathBuf>,

    /// Accept any server certificate. Only for testing.
    #[arg(long, env = "HEARTH_OTLP_INSECURE_SKIP_VERIFY", num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_insecure_skip_verify: Option<bool>,

    /// Deadline of one export request [default: 10s].
    #[arg(long, env = "HEARTH_OTLP_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_timeout: Option<HumanDuration>,

    /// Largest export request; bigger windows are split [default: 4MiB].
    #[arg(long, env = "HEARTH_OTLP_MAX_REQUEST_SIZE", value_name = "SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_max_request_size: Option<ByteSize>,

    /// Undelivered requests kept in memory before spilling to the spool
    /// [default: 16MiB].
    #[arg(long, env = "HEARTH_QUEUE_MEMORY", value_name = "SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_memory: Option<ByteSize>,

    /// Directory where undelivered requests wait across outages and
    /// restarts [default: /var/lib/hearth/spool].
    #[arg(long, env = "HEARTH_SPOOL_DIR", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,

    /// Spool size cap; past it the oldest requests are dropped (counted)
    /// [default: 256MiB].
    #[arg(long, env = "HEARTH_SPOOL_MAX_SIZE", value_name = "SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_max_size: Option<ByteSize>,

    /// Local store directory, used when there is no --otlp-endpoint (or
    /// given explicitly, in addition to it) [default: /var/lib/hearth/profiles].
    #[arg(long, env = "HEARTH_STORE", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<PathBuf>,

    /// Remove stored windows older than this [default: 7d].
    #[arg(long, env = "HEARTH_STORE_MAX_AGE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_max_age: Option<HumanDuration>,

    /// Remove the oldest stored windows past this total size [default: 1GiB].
    #[arg(long, env = "HEARTH_STORE_MAX_SIZE", value_name = "SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_max_size: Option<ByteSize>,

    /// Serve /metrics, /healthz and /readyz here; `off` disables
    /// [default: 127.0.0.1:9464].
    #[arg(long, env = "HEARTH_METRICS_ADDR", value_name = "ADDR|off")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,

    /// CPU budget of the agent, % of one core; above it the frequency is
    /// lowered step by step [default: 1].
    #[arg(long, env = "HEARTH_MAX_CPU_PERCENT", value_name = "PERCENT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cpu_percent: Option<f64>,

    /// Host busy % (all CPUs) above which the frequency is lowered
    /// [default: 90].
    #[arg(long, env = "HEARTH_MAX_HOST_LOAD_PERCENT", value_name = "PERCENT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_host_load_percent: Option<f64>,

    /// Lowest frequency the governor may go down to [default: 1].
    #[arg(long, env = "HEARTH_MIN_FREQUENCY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_frequency: Option<u64>,

    /// On SIGTERM/SIGINT, time allowed to deliver what is queued before the
    /// rest is written to the spool [default: 5s].
    #[arg(long, env = "HEARTH_SHUTDOWN_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<HumanDuration>,

    /// Symbolize with DWARF too (inlined frames, source lines), at the cost
    /// of memory [default: false].
    #[arg(long, env = "HEARTH_DEBUGINFO", num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debuginfo: Option<bool>,

    /// Also record off-CPU time (where threads wait) and export it as its
    /// own profile type [default: false].
    #[arg(long, env = "HEARTH_OFF_CPU", num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_cpu: Option<bool>,

    /// Also export a wall-clock profile per thread (on-CPU samples as time
    /// plus off-CPU time); implies --off-cpu [default: false].
    #[arg(long, env = "HEARTH_WALL", num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall: Option<bool>,

    /// Off-CPU waits shorter than this are counted but not recorded
    /// [default: 1ms].
    #[arg(long, env = "HEARTH_OFF_CPU_MIN", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_cpu_min: Option<HumanDuration>,

    /// Share of context switches followed for off-CPU time, in (0, 1];
    /// times are scaled up by its inverse [default: 1].
    #[arg(long, env = "HEARTH_OFF_CPU_SAMPLE", value_name = "PROBABILITY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_cpu_sample: Option<f64>,

    /// On a CPU switching more often than this per second, fewer context
    /// switches are followed, at random, and off-CPU times are scaled up
    /// for the others; 0: no cap [default: 10000].
    #[arg(long, env = "HEARTH_OFF_CPU_MAX_RATE", value_name = "PER_SECOND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_cpu_max_rate: Option<u64>,

    /// How user stacks are unwound: `auto` (unwind tables for files built
    /// without frame pointers), `dwarf` (tables wherever there is call
    /// frame information) or `fp` (frame pointers only) [default: auto].
    #[arg(long, env = "HEARTH_UNWIND", value_name = "MODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unwind: Option<UnwindMode>,

    /// Cap on the kernel memory unwind tables take; tables of files no
    /// live process maps are evicted to stay under it [default: 16MiB].
    #[arg(long, env = "HEARTH_UNWIND_MEMORY", value_name = "SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unwind_memory: Option<ByteSize>,

    /// Profile only these processes (repeatable; comma-separated in the
    /// environment). Includes add up: pids, names, cgroups.
    #[arg(
        long = "include-pid",
        env = "HEARTH_INCLUDE_PID",
        value_name = "PID",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_pid: Vec<u32>,

    /// Leave these processes out (repeatable); excludes win over includes.
    #[arg(
        long = "exclude-pid",
        env = "HEARTH_EXCLUDE_PID",
        value_name = "PID",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_pid: Vec<u32>,

    /// Profile processes whose name or executable file name matches this
    /// regular expression (repeatable; one expression in the environment,
    /// use `a|b`).
    #[arg(
        long = "include-name",
        env = "HEARTH_INCLUDE_NAME",
        value_name = "REGEX"
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_name: Vec<String>,

    /// Leave out processes whose name or executable file name matches.
    #[arg(
        long = "exclude-name",
        env = "HEARTH_EXCLUDE_NAME",
        value_name = "REGEX"
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_name: Vec<String>,

    /// Profile processes in this cgroup v2 subtree (a directory of the
    /// unified hierarchy, or a path relative to it; comma-separated in the
    /// environment).
    #[arg(
        long = "include-cgroup",
        env = "HEARTH_INCLUDE_CGROUP",
        value_name = "PATH",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_cgroup: Vec<String>,

    /// Leave out processes in this cgroup v2 subtree.
    #[arg(
        long = "exclude-cgroup",
        env = "HEARTH_EXCLUDE_CGROUP",
        value_name = "PATH",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_cgroup: Vec<String>,

    /// Profile the pods of this Kubernetes namespace (repeatable;
    /// comma-separated in the environment). Needs Kubernetes metadata.
    #[arg(
        long = "include-namespace",
        env = "HEARTH_INCLUDE_NAMESPACE",
        value_name = "NAMESPACE",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_namespace: Vec<String>,

    /// Leave out the pods of this Kubernetes namespace.
    #[arg(
        long = "exclude-namespace",
        env = "HEARTH_EXCLUDE_NAMESPACE",
        value_name = "NAMESPACE",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_namespace: Vec<String>,

    /// Profile the pods a Kubernetes label selector picks
    /// (`app=web,tier!=db`, `env in (prod,staging)`; repeatable, one
    /// selector in the environment).
    #[arg(
        long = "include-pod-selector",
        env = "HEARTH_INCLUDE_POD_SELECTOR",
        value_name = "SELECTOR"
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_pod_selector: Vec<String>,

    /// Leave out the pods a label selector picks.
    #[arg(
        long = "exclude-pod-selector",
        env = "HEARTH_EXCLUDE_POD_SELECTOR",
        value_name = "SELECTOR"
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_pod_selector: Vec<String>,
    /// Tag profiles with Kubernetes metadata from a watch on this node's
    /// pods (NODE_NAME) [default: true when KUBERNETES_SERVICE_HOST is set].
    #[arg(long, env = "HEARTH_KUBERNETES", num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<bool>,

    /// Kubernetes API server URL, plain and without authentication (tests,
    /// `kubectl proxy`) [default: in-cluster, with the service account].
    #[arg(long, env = "HEARTH_KUBERNETES_API", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes_api: Option<String>,

    /// Pod label copied to the attribute `k8s.pod.label.<KEY>` (repeatable).
    #[arg(
        long = "pod-label",
        env = "HEARTH_POD_LABELS",
        value_name = "KEY",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_labels: Vec<String>,

    /// Resource attribute `key=value` on every profile, for host facts like
    /// the region or environment (repeatable; in the file a list or a table).
    #[arg(
        long = "tag",
        env = "HEARTH_TAGS",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "tags_list_or_table"
    )]
    pub tags: Vec<String>,

    /// Tag profiles with each process's command line
    /// (`process.command_line`). Off by default: command lines can hold
    /// secrets [default: false].
    #[arg(long, env = "HEARTH_COMMAND_LINE", num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_line: Option<bool>,
}

/// `tags` in the file: `["region=eu-1"]` or a table `{ region = "eu-1" }`.
fn tags_list_or_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Tags {
        List(Vec<String>),
        Table(std::collections::BTreeMap<String, String>),
    }
    match Tags::deserialize(d) {
        Ok(Tags::List(list)) => Ok(list),
        Ok(Tags::Table(table)) => Ok(table.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
        Err(_) => Err(serde::de::Error::custom(
            "tags must be a list of \"key=value\" strings or a table of strings",
        )),
    }
}

/// A duration written like `10s`, `500ms`, `7d` (a bare number is seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        crate::cli::parse_duration(text).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A bare integer in TOML means seconds, like on the command line.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) if s > 0 => Ok(HumanDuration(Duration::from_secs(s))),
            Raw::Secs(_) => Err(serde::de::Error::custom(
                "duration must be greater than zero",
            )),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A size written like `4MiB`, `512KiB`, `1GB`, or plain bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("invalid size {text:?}; use e.g. 4MiB, 512KiB, 1GiB"))?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {text:?}; use B, KiB, MiB, GiB, KB, MB, GB"
                ))
            }
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (factor, unit) in UNITS {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(ByteSize(b)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Where and how to send OTLP.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    pub endpoint: String,
    /// (name, value) pairs, from the flags and the headers file.
    pub headers: Vec<(String, String)>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub timeout: Duration,
    pub max_request_bytes: u64,
    pub queue_memory_bytes: u64,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
}

/// Where to keep windows locally.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub dir: PathBuf,
    pub max_age: Duration,
    pub max_bytes: u64,
}

/// How off-CPU time is recorded and exported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OffCpuConfig {
    /// Waits shorter than this are counted, not recorded.
    pub min: Duration,
    /// Share of context switches followed, in (0, 1].
    pub sample_probability: f64,
    /// Cap on followed switch-outs per second per CPU; 0: none.
    pub max_rate: u64,
    /// Also export the wall-clock profile.
    pub wall: bool,
}

/// Followed context switches per second per CPU before the rate cap
/// samples them. Following one costs about 0.2 µs more than skipping it
/// (measured on the benchmark VM), so the cap bounds that part of the cost
/// to about 0.2% of each CPU; a busy service switches less often than this
/// and is followed completely.
pub const DEFAULT_OFF_CPU_MAX_RATE: u64 = 10_000;
/// The highest cap accepted (the kernel's arithmetic assumes it).
pub const MAX_OFF_CPU_MAX_RATE: u64 = 10_000_000;

impl Default for OffCpuConfig {
    fn default() -> Self {
        OffCpuConfig {
            min: Duration::from_millis(1),
            sample_probability: 1.0,
            max_rate: DEFAULT_OFF_CPU_MAX_RATE,
            wall: false,
        }
    }
}

impl OffCpuConfig {
    /// How the profiles it records describe themselves.
    pub fn settings(&self) -> crate::profile::OffCpuSettings {
        crate::profile::OffCpuSettings::new(self.min, self.sample_probability, self.max_rate)
    }
}

/// The effective `hearth run` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub frequency_hz: u64,
    pub interval: Duration,
    /// `None`: no backend; windows go to [`Config::store`].
    pub otlp: Option<OtlpConfig>,
    /// `None` only when exporting to OTLP without an explicit `--store`.
    pub store: Option<StoreConfig>,
    pub metrics_addr: Option<SocketAddr>,
    pub max_cpu_percent: f64,
    pub max_host_load_percent: f64,
    pub min_frequency_hz: u64,
    pub shutdown_timeout: Duration,
    pub debuginfo: bool,
    /// `None`: on-CPU sampling only.
    pub off_cpu: Option<OffCpuConfig>,
    pub unwind: UnwindMode,
    /// Cap on unwind table memory, bytes.
    pub unwind_memory: u64,
    /// Include/exclude rules (checked by [`Config::resolve`]).
    pub filter: FilterRules,
    pub metadata: MetadataConfig,
}

/// What profiles are tagged with beyond what /proc says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetadataConfig {
    /// Watch this node's pods.
    pub kubernetes: bool,
    /// Plain API URL instead of the in-cluster configuration.
    pub kubernetes_api: Option<String>,
    /// Pod labels copied to `k8s.pod.label.<key>`.
    pub pod_labels: Vec<String>,
    /// Host tags `(key, value)`.
    pub tags: Vec<(String, String)>,
    /// Read `process.command_line`.
    pub command_line: bool,
}

impl MetadataConfig {
    /// Checks and applies defaults; `None` of `kubernetes` means: on in a
    /// cluster (`KUBERNETES_SERVICE_HOST` set) or with an API URL.
    pub fn resolve(
        kubernetes: Option<bool>,
        kubernetes_api: Option<String>,
        pod_labels: &[String],
        tags: &[String],
        command_line: bool,
    ) -> Result<MetadataConfig, ConfigError> {
        let tags = crate::metadata::service::parse_tags(tags)
            .map_err(|message| ConfigError::invalid("tags", message))?;
        for key in pod_labels {
            check_label_key(key).map_err(|message| ConfigError::invalid("pod-labels", message))?;
        }
        let kubernetes = kubernetes.unwrap_or_else(|| {
            kubernetes_api.is_some() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        });
        Ok(MetadataConfig {
            kubernetes,
            kubernetes_api,
            pod_labels: pod_labels.to_vec(),
            tags,
            command_line,
        })
    }
}

/// A Kubernetes label key: `[prefix/]name`, letters, digits and `-_.`.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let valid = !key.is_empty()
        && key.len() <= 317
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        && key.matches('/').count() <= 1
        && !key.starts_with('/')
        && !key.ends_with('/')
        // The name (after any prefix) starts and ends alphanumeric.
        && key.rsplit('/').next().is_some_and(|name| {
            name.len() <= 63
                && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        });
    if valid {
        Ok(())
    } else {
        Err(format!("{key:?} is not a Kubernetes label key"))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            frequency_hz: 19,
            interval: Duration::from_secs(10),
            otlp: None,
            store: Some(StoreConfig {
                dir: PathBuf::from(DEFAULT_STORE_DIR),
                max_age: Duration::from_secs(7 * 24 * 3600),
                max_bytes: 1 << 30,
            }),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            max_cpu_percent: 1.0,
            max_host_load_percent: 90.0,
            min_frequency_hz: 1,
            shutdown_timeout: Duration::from_secs(5),
            debuginfo: false,
            off_cpu: None,
            unwind: UnwindMode::default(),
            unwind_memory: crate::unwind::DEFAULT_TABLE_MEMORY,
            filter: FilterRules::default(),
            metadata: MetadataConfig::default(),
        }
    }
}

/// Highest frequency accepted; beyond it sampling itself becomes the load.
const MAX_FREQUENCY_HZ: u64 = 1000;

impl Config {
    /// Builds the configuration from parsed arguments. `matches` are the
    /// `run` subcommand's matches, which say whether each option came from
    /// a flag or from the environment.
    pub fn load(args: &RunArgs, matches: &ArgMatches) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => RunOptions::default(),
        };
        let (flags, env) = split_by_source(&args.options, matches)?;
        let merged = layer(&[&env, &file, &flags])?;
        Config::resolve(&merged)
    }

    /// Applies defaults and checks every value.
    pub fn resolve(opts: &RunOptions) -> Result<Config, ConfigError> {
        let defaults = Config::default();
        let frequency_hz = opts.frequency.unwrap_or(defaults.frequency_hz);
        if !(1..=MAX_FREQUENCY_HZ).contains(&frequency_hz) {
            return Err(ConfigError::invalid(
                "frequency",
                format!("{frequency_hz} Hz is outside 1..={MAX_FREQUENCY_HZ}"),
            ));
        }
        let min_frequency_hz = opts.min_frequency.unwrap_or(defaults.min_frequency_hz);
        if min_frequency_hz == 0 || min_frequency_hz > frequency_hz {
            return Err(ConfigError::invalid(
                "min-frequency",
                format!(
                    "{min_frequency_hz} Hz must be between 1 and the frequency ({frequency_hz} Hz)"
                ),
            ));
        }
        let interval = opts.interval.map_or(defaults.interval, |d| d.0);
        if interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "interval",
                "must be at least 1s (each drain costs a map sweep)",
            ));
        }
        let percent = |key: &'static str, value: Option<f64>, default: f64, max: f64| match value {
            None => Ok(default),
            Some(v) if v > 0.0 && v <= max => Ok(v),
            Some(v) => Err(ConfigError::invalid(
                key,
                format!("{v} is outside (0, {max}]"),
            )),
        };
        let max_cpu_percent = percent(
            "max-cpu-percent",
            opts.max_cpu_percent,
            defaults.max_cpu_percent,
            100.0,
        )?;
        let max_host_load_percent = percent(
            "max-host-load-percent",
            opts.max_host_load_percent,
            defaults.max_host_load_percent,
            100.0,
        )?;
        let metrics_addr = match opts.metrics_addr.as_deref().map(str::trim) {
            None => defaults.metrics_addr,
            Some("off" | "none" | "") => None,
            Some(text) => Some(text.parse().map_err(|_| {
                ConfigError::invalid(
                    "metrics-addr",
                    format!("{text:?} is not an address like 127.0.0.1:9464 (or `off`)"),
                )
            })?),
        };
        let otlp = match &opts.otlp_endpoint {
            None => {
                let otlp_only = [
                    ("otlp-ca", opts.otlp_ca.is_some()),
                    ("otlp-client-cert", opts.otlp_client_cert.is_some()),
                    ("otlp-client-key", opts.otlp_client_key.is_some()),
                    ("otlp-header", !opts.otlp_headers.is_empty()),
                    ("otlp-headers-file", opts.otlp_headers_file.is_some()),
                ];
                if let Some((key, _)) = otlp_only.iter().find(|(_, set)| *set) {
                    return Err(ConfigError::invalid(
                        key,
                        "only applies with --otlp-endpoint",
                    ));
                }
                None
            }
            Some(endpoint) => Some(otlp_config(endpoint, opts)?),
        };
        let default_store = defaults.store.expect("the default config has a store");
        let store = if otlp.is_none() || opts.store.is_some() {
            Some(StoreConfig {
                dir: opts.store.clone().unwrap_or(default_store.dir),
                max_age: opts.store_max_age.map_or(default_store.max_age, |d| d.0),
                max_bytes: opts.store_max_size.map_or(default_store.max_bytes, |s| s.0),
            })
        } else {
            None
        };
        let filter = FilterRules {
            include_pids: opts.include_pid.clone(),
            exclude_pids: opts.exclude_pid.clone(),
            include_names: opts.include_name.clone(),
            exclude_names: opts.exclude_name.clone(),
            include_cgroups: opts.include_cgroup.clone(),
            exclude_cgroups: opts.exclude_cgroup.clone(),
            include_namespaces: opts.include_namespace.clone(),
            exclude_namespaces: opts.exclude_namespace.clone(),
            include_pod_selectors: opts.include_pod_selector.clone(),
            exclude_pod_selectors: opts.exclude_pod_selector.clone(),
        };
        FilterSpec::new(&filter).map_err(|e| ConfigError::invalid(e.flag(), e.to_string()))?;
        let metadata = MetadataConfig::resolve(
            opts.kubernetes,
            opts.kubernetes_api.clone(),
            &opts.pod_labels,
            &opts.tags,
            opts.command_line.unwrap_or(false),
        )?;
        filter
            .check_kubernetes(metadata.kubernetes)
            .map_err(|e| ConfigError::invalid(e.flag(), e.to_string()))?;
        Ok(Config {
            filter,
            metadata,
            frequency_hz,
            interval,
            otlp,
            store,
            metrics_addr,
            max_cpu_percent,
            max_host_load_percent,
            min_frequency_hz,
            shutdown_timeout: opts
                .shutdown_timeout
                .map_or(defaults.shutdown_timeout, |d| d.0),
            debuginfo: opts.debuginfo.unwrap_or(defaults.debuginfo),
            off_cpu: off_cpu_config(opts)?,
            unwind: opts.unwind.unwrap_or(defaults.unwind),
            unwind_memory: match opts.unwind_memory {
                None => defaults.unwind_memory,
                Some(size) => crate::unwind::check_table_memory(size.0)
                    .map_err(|message| ConfigError::invalid("unwind-memory", message))?,
            },
        })
    }

    /// The configuration as TOML that `--config` would read back, with
    /// header values redacted.
    pub fn to_toml(&self) -> String {
        let otlp = self.otlp.as_ref();
        let opts = RunOptions {
            frequency: Some(self.frequency_hz),
            interval: Some(HumanDuration(self.interval)),
            otlp_endpoint: otlp.map(|o| o.endpoint.clone()),
            otlp_headers: otlp
                .map(|o| {
                    o.headers
                        .iter()
                        .map(|(name, _)| format!("{name}=<redacted>"))
                        .collect()
                })
                .unwrap_or_default(),
            otlp_headers_file: None,
            otlp_ca: otlp.and_then(|o| o.ca.clone()),
            otlp_client_cert: otlp.and_then(|o| o.client_cert.clone()),
            otlp_client_key: otlp.and_then(|o| o.client_key.clone()),
            otlp_insecure_skip_verify: otlp.map(|o| o.insecure_skip_verify),
            otlp_timeout: otlp.map(|o| HumanDuration(o.timeout)),
            otlp_max_request_size: otlp.map(|o| ByteSize(o.max_request_bytes)),
            queue_memory: otlp.map(|o| ByteSize(o.queue_memory_bytes)),
            spool_dir: otlp.map(|o| o.spool_dir.clone()),
            spool_max_size: otlp.map(|o| ByteSize(o.spool_max_bytes)),
            store: self.store.as_ref().map(|s| s.dir.clone()),
            store_max_age: self.store.as_ref().map(|s| HumanDuration(s.max_age)),
            store_max_size: self.store.as_ref().map(|s| ByteSize(s.max_bytes)),
            metrics_addr: Some(
                self.metrics_addr
                    .map_or_else(|| "off".to_string(), |a| a.to_string()),
            ),
            max_cpu_percent: Some(self.max_cpu_percent),
            max_host_load_percent: Some(self.max_host_load_percent),
            min_frequency: Some(self.min_frequency_hz),
            shutdown_timeout: Some(HumanDuration(self.shutdown_timeout)),
            debuginfo: Some(self.debuginfo),
            off_cpu: Some(self.off_cpu.is_some()),
            wall: Some(self.off_cpu.is_some_and(|o| o.wall)),
            off_cpu_min: self.off_cpu.map(|o| HumanDuration(o.min)),
            off_cpu_sample: self.off_cpu.map(|o| o.sample_probability),
            off_cpu_max_rate: self.off_cpu.map(|o| o.max_rate),
            unwind: Some(self.unwind),
            unwind_memory: Some(ByteSize(self.unwind_memory)),
            include_pid: self.filter.include_pids.clone(),
            exclude_pid: self.filter.exclude_pids.clone(),
            include_name: self.filter.include_names.clone(),
            exclude_name: self.filter.exclude_names.clone(),
            include_cgroup: self.filter.include_cgroups.clone(),
            exclude_cgroup: self.filter.exclude_cgroups.clone(),
            include_namespace: self.filter.include_namespaces.clone(),
            exclude_namespace: self.filter.exclude_namespaces.clone(),
            include_pod_selector: self.filter.include_pod_selectors.clone(),
            exclude_pod_selector: self.filter.exclude_pod_selectors.clone(),
            kubernetes: Some(self.metadata.kubernetes),
            kubernetes_api: self.metadata.kubernetes_api.clone(),
            pod_labels: self.metadata.pod_labels.clone(),
            tags: self
                .metadata
                .tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            command_line: Some(self.metadata.command_line),
        };
        toml::to_string(&opts).unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
    }
}

fn off_cpu_config(opts: &RunOptions) -> Result<Option<OffCpuConfig>, ConfigError> {
    let wall = opts.wall.unwrap_or(false);
    if !(opts.off_cpu.unwrap_or(false) || wall) {
        for (key, set) in [
            ("off-cpu-min", opts.off_cpu_min.is_some()),
            ("off-cpu-sample", opts.off_cpu_sample.is_some()),
            ("off-cpu-max-rate", opts.off_cpu_max_rate.is_some()),
        ] {
            if set {
                return Err(ConfigError::invalid(
                    key,
                    "only applies with --off-cpu or --wall",
                ));
            }
        }
        return Ok(None);
    }
    let defaults = OffCpuConfig::default();
    let sample_probability = match opts.off_cpu_sample {
        None => defaults.sample_probability,
        Some(p) => crate::cli::parse_probability(&p.to_string())
            .map_err(|message| ConfigError::invalid("off-cpu-sample", message))?,
    };
    let max_rate = match opts.off_cpu_max_rate {
        None => defaults.max_rate,
        Some(rate) => crate::cli::parse_off_cpu_max_rate(&rate.to_string())
            .map_err(|message| ConfigError::invalid("off-cpu-max-rate", message))?,
    };
    Ok(Some(OffCpuConfig {
        min: opts.off_cpu_min.map_or(defaults.min, |d| d.0),
        sample_probability,
        max_rate,
        wall,
    }))
}

fn otlp_config(endpoint: &str, opts: &RunOptions) -> Result<OtlpConfig, ConfigError> {
    let endpoint = endpoint.trim();
    let uri: http::Uri = endpoint.parse().map_err(|e| {
        ConfigError::invalid("otlp-endpoint", format!("{endpoint:?} is not a URL: {e}"))
    })?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => {}
        _ => {
            return Err(ConfigError::invalid(
                "otlp-endpoint",
                format!("{endpoint:?} must look like http://host:4317 or https://host:4317"),
            ))
        }
    }
    let insecure_skip_verify = opts.otlp_insecure_skip_verify.unwrap_or(false);
    let tls_only = [
        ("otlp-ca", opts.otlp_ca.is_some()),
        ("otlp-client-cert", opts.otlp_client_cert.is_some()),
        ("otlp-client-key", opts.otlp_client_key.is_some()),
        ("otlp-insecure-skip-verify", insecure_skip_verify),
    ];
    if uri.scheme_str() == Some("http") {
        if let Some((key, _)) = tls_only.iter().find(|(_, set)| *set) {
            return Err(ConfigError::invalid(
                key,
                "needs an https:// endpoint (the endpoint is plain http)",
            ));
        }
    }
    if opts.otlp_client_cert.is_some() != opts.otlp_client_key.is_some() {
        return Err(ConfigError::invalid(
            "otlp-client-cert",
            "mutual TLS needs both --otlp-client-cert and --otlp-client-key",
        ));
    }
    let mut headers = Vec::new();
    for header in &opts.otlp_headers {
        headers.push(parse_header(header).map_err(|m| ConfigError::invalid("otlp-header", m))?);
    }
    if let Some(path) = &opts.otlp_headers_file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            headers.push(parse_header(line).map_err(|m| ConfigError::Parse {
                path: path.clone(),
                message: format!("line {}: {m}", n + 1),
            })?);
        }
    }
    let max_request_bytes = opts.otlp_max_request_size.map_or(4 << 20, |s| s.0);
    if max_request_bytes < 64 << 10 {
        return Err(ConfigError::invalid(
            "otlp-max-request-size",
            "must be at least 64KiB",
        ));
    }
    Ok(OtlpConfig {
        endpoint: endpoint.to_string(),
        headers,
        ca: opts.otlp_ca.clone(),
        client_cert: opts.otlp_client_cert.clone(),
        client_key: opts.otlp_client_key.clone(),
        insecure_skip_verify,
        timeout: opts.otlp_timeout.map_or(Duration::from_secs(10), |d| d.0),
        max_request_bytes,
        queue_memory_bytes: opts.queue_memory.map_or(16 << 20, |s| s.0),
        spool_dir: opts
            .spool_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR)),
        spool_max_bytes: opts.spool_max_size.map_or(256 << 20, |s| s.0),
    })
}

/// `name=value` (or `name: value`) → a lower-case gRPC metadata name and
/// its value.
fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .or_else(|| text.split_once(':'))
        .ok_or_else(|| "expected name=value".to_string())?;
    let name = name.trim().to_ascii_lowercase();
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid_name {
        return Err(format!("{name:?} is not a valid header name"));
    }
    Ok((name, value.trim().to_string()))
}

fn read_file(path: &Path) -> Result<RunOptions, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Splits what clap parsed into the options given as flags and those that
/// came from `HEARTH_*` variables.
fn split_by_source(
    parsed: &RunOptions,
    matches: &ArgMatches,
) -> Result<(RunOptions, RunOptions), ConfigError> {
    let table = to_table(parsed)?;
    let (mut flags, mut env) = (toml::Table::new(), toml::Table::new());
    for (key, value) in table {
        match matches.value_source(&key.replace('-', "_")) {
            Some(ValueSource::EnvVariable) => env.insert(key, value),
            _ => flags.insert(key, value),
        };
    }
    Ok((
        from_table(flags, "environment")?,
        from_table(env, "environment")?,
    ))
}

/// Later layers override earlier ones, key by key.
fn layer(layers: &[&RunOptions]) -> Result<RunOptions, ConfigError> {
    let mut merged = toml::Table::new();
    for options in layers {
        merged.extend(to_table(options)?);
    }
    from_table(merged, "configuration")
}

fn to_table(options: &RunOptions) -> Result<toml::Table, ConfigError> {
    toml::Table::try_from(options).map_err(|e| ConfigError::Invalid {
        key: "options",
        source_name: "configuration",
        message: e.to_string(),
    })
}

fn from_table(table: toml::Table, source_name: &'static str) -> Result<RunOptions, ConfigError> {
    RunOptions::deserialize(table).map_err(|e| ConfigError::Invalid {
        key: "options",
        source_name,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(flatten)]
        run: RunArgs,
    }

    /// Parses `args` with exactly the `HEARTH_*` variables in `env` set.
    /// Environment variables are process-wide, so every test that sets them
    /// holds this lock.
    fn load_with(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<String> = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("HEARTH_"))
            .collect();
        for k in keys {
            // SAFETY: tests touching the environment hold ENV_LOCK.
            unsafe { std::env::remove_var(k) };
        }
        for (k, v) in env {
            // SAFETY: as above.
            unsafe { std::env::set_var(k, v) };
        }
        let argv: Vec<&str> = std::iter::once("hearth")
            .chain(args.iter().copied())
            .collect();
        let result = TestCli::command()
            .try_get_matches_from(argv)
            .map_err(|e| e.to_string())
            .and_then(|matches| {
                let cli = TestCli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
                Config::load(&cli.run, &matches).map_err(|e| e.to_string())
            });
        for (k, _) in env {
            // SAFETY: as above.
            unsafe { std::env::remove_var(k) };
        }
        result
    }

    fn write_toml(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hearth-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn unwind_options_resolve_print_and_check() {
        let defaults = Config::resolve(&RunOptions::default()).unwrap();
        assert_eq!(defaults.unwind, UnwindMode::Auto);
        assert_eq!(defaults.unwind_memory, 16 << 20);
        let set = Config::resolve(&RunOptions {
            unwind: Some(UnwindMode::Dwarf),
            unwind_memory: Some(ByteSize(64 << 20)),
            ..RunOptions::default()
        })
        .unwrap();
        assert_eq!(
            (set.unwind, set.unwind_memory),
            (UnwindMode::Dwarf, 64 << 20)
        );
        let text = set.to_toml();
        assert!(text.contains("unwind = \"dwarf\""), "{text}");
        let printed: RunOptions = toml::from_str(&text).unwrap();
        assert_eq!(Config::resolve(&printed).unwrap(), set);
        let err = Config::resolve(&RunOptions {
            unwind_memory: Some(ByteSize(1 << 30)),
            ..RunOptions::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("unwind-memory"), "{err}");
        assert!(toml::from_str::<RunOptions>("unwind = \"frames\"").is_err());
    }

    #[test]
    fn off_cpu_options_resolve_and_check() {
        let off = Config::resolve(&RunOptions::default()).unwrap();
        assert_eq!(off.off_cpu, None);
        let on = Config::resolve(&RunOptions {
            wall: Some(true),
            off_cpu_min: Some(HumanDuration(Duration::from_millis(5))),
            off_cpu_sample: Some(0.25),
            off_cpu_max_rate: Some(2_500),
            ..RunOptions::default()
        })
        .unwrap();
        assert_eq!(
            on.off_cpu,
            Some(OffCpuConfig {
                min: Duration::from_millis(5),
                sample_probability: 0.25,
                max_rate: 2_500,
                wall: true,
            })
        );
        let capped = Config::resolve(&RunOptions {
            off_cpu: Some(true),
            ..RunOptions::default()
        })
        .unwrap();
        assert_eq!(
            capped.off_cpu.map(|o| o.max_rate),
            Some(DEFAULT_OFF_CPU_MAX_RATE)
        );
        // Printed and read back, it is the same configuration.
        let printed: RunOptions = toml::from_str(&on.to_toml()).unwrap();
        assert_eq!(Config::resolve(&printed).unwrap().off_cpu, on.off_cpu);
        let err = Config::resolve(&RunOptions {
            off_cpu_min: Some(HumanDuration(Duration::from_millis(5))),
            ..RunOptions::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("off-cpu-min"), "{err}");
        let err = Config::resolve(&RunOptions {
            off_cpu: Some(true),
            off_cpu_sample: Some(1.5),
            ..RunOptions::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("off-cpu-sample"), "{err}");
        for (rate, off_cpu) in [(MAX_OFF_CPU_MAX_RATE + 1, Some(true)), (100, None)] {
            let err = Config::resolve(&RunOptions {
                off_cpu,
                off_cpu_max_rate: Some(rate),
                ..RunOptions::default()
            })
            .unwrap_err();
            assert!(err.to_string().contains("off-cpu-max-rate"), "{err}");
        }
    }

    #[test]
    fn metadata_options_from_flags_file_and_environment() {
        let config = load_with(&[], &[]).unwrap();
        assert!(config.metadata.tags.is_empty());
        assert!(!config.metadata.command_line);
        let config = load_with(
            &[
                "--tag",
                "region=eu-1",
                "--tag",
                "deployment.environment.name=prod",
                "--pod-label",
                "app.kubernetes.io/team",
                "--command-line",
                "--kubernetes-api",
                "http://127.0.0.1:1",
            ],
            &[],
        )
        .unwrap();
        let m = &config.metadata;
        assert_eq!(
            m.tags,
            [
                ("region".to_string(), "eu-1".to_string()),
                ("deployment.environment.name".into(), "prod".into())
            ]
        );
        assert_eq!(m.pod_labels, ["app.kubernetes.io/team"]);
        assert!(m.command_line);
        assert!(m.kubernetes, "an API URL turns it on");
        // Explicitly off stays off.
        let off = load_with(
            &[
                "--kubernetes=false",
                "--kubernetes-api",
                "http://127.0.0.1:1",
            ],
            &[],
        )
        .unwrap();
        assert!(!off.metadata.kubernetes);
        // Printed and read back.
        let printed: RunOptions = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(Config::resolve(&printed).unwrap().metadata, config.metadata);
        // The file: a list or a table.
        let list = write_toml("tags-list.toml", "tags = [\"region=eu-1\", \"zone=b\"]\n");
        let config = load_with(&["--config", list.to_str().unwrap()], &[]).unwrap();
        assert_eq!(config.metadata.tags.len(), 2);
        let table = write_toml(
            "tags-table.toml",
            "kubernetes = false\n[tags]\nregion = \"eu-1\"\n\"deployment.environment.name\" = \"prod\"\n",
        );
        let config = load_with(&["--config", table.to_str().unwrap()], &[]).unwrap();
        assert!(config
            .metadata
            .tags
            .contains(&("deployment.environment.name".into(), "prod".into())));
        assert!(!config.metadata.kubernetes);
        // The environment.
        let config = load_with(
            &[],
            &[
                ("HEARTH_TAGS", "region=eu-1,zone=b"),
                ("HEARTH_POD_LABELS", "team"),
            ],
        )
        .unwrap();
        assert_eq!(config.metadata.tags.len(), 2);
        assert_eq!(config.metadata.pod_labels, ["team"]);
    }

    #[test]
    fn malformed_tags_and_labels_are_config_errors() {
        for bad in ["region", "=x", "region=", "a b=c"] {
            let err = load_with(&["--tag", bad], &[]).unwrap_err();
            assert!(err.contains("`tags`"), "{bad}: {err}");
        }
        let err = load_with(&["--tag", "a=1", "--tag", "a=2"], &[]).unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err = load_with(&[], &[("HEARTH_TAGS", "region")]).unwrap_err();
        assert!(err.contains("`tags`"), "{err}");
        let file = write_toml("tags-bad.toml", "tags = 3\n");
        let err = load_with(&["--config", file.to_str().unwrap()], &[]).unwrap_err();
        assert!(err.contains("tags"), "{err}");
        let file = write_toml("tags-bad-table.toml", "[tags]\nregion = 1\n");
        assert!(load_with(&["--config", file.to_str().unwrap()], &[]).is_err());
        let err = load_with(&["--pod-label", "a b"], &[]).unwrap_err();
        assert!(err.contains("`pod-labels`"), "{err}");
        assert!(check_label_key("app.kubernetes.io/name").is_ok());
        assert!(check_label_key("a/b/c").is_err());
        assert!(check_label_key("").is_err());
    }

    #[test]
    fn defaults_go_to_the_local_store() {
        let config = load_with(&[], &[]).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.store.unwrap().dir, Path::new(DEFAULT_STORE_DIR));
    }

    #[test]
    fn flags_beat_the_file_which_beats_the_environment() {
        let file = write_toml(
            "precedence.toml",
            "frequency = 50\ninterval = \"20s\"\nmax-cpu-percent = 2.5\n",
        );
        let config = load_with(
            &["--config", file.to_str().unwrap(), "--frequency", "29"],
            &[
                ("HEARTH_FREQUENCY", "7"),
                ("HEARTH_INTERVAL", "3s"),
                ("HEARTH_MIN_FREQUENCY", "3"),
                ("HEARTH_MAX_CPU_PERCENT", "0.5"),
            ],
        )
        .unwrap();
        assert_eq!(config.frequency_hz, 29, "flag wins");
        assert_eq!(config.interval, Duration::from_secs(20), "file beats env");
        assert_eq!(config.max_cpu_percent, 2.5, "file beats env");
        assert_eq!(config.min_frequency_hz, 3, "env beats default");
    }

    #[test]
    fn config_file_from_the_environment() {
        let file = write_toml("via-env.toml", "frequency = 11\n");
        let config = load_with(&[], &[("HEARTH_CONFIG", file.to_str().unwrap())]).unwrap();
        assert_eq!(config.frequency_hz, 11);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let file = write_toml("unknown.toml", "frequncy = 19\n");
        let err = load_with(&["--config", file.to_str().unwrap()], &[]).unwrap_err();
        assert!(err.contains("frequncy"), "{err}");
        assert!(err.contains("unknown.toml"), "{err}");

        let file = write_toml("badvalue.toml", "interval = \"soon\"\n");
        let err = load_with(&["--config", file.to_str().unwrap()], &[]).unwrap_err();
        assert!(err.contains("interval"), "{err}");

        let err = load_with(&["--frequency", "0"], &[]).unwrap_err();
        assert!(err.contains("`frequency`"), "{err}");
        let err = load_with(&["--interval", "200ms"], &[]).unwrap_err();
        assert!(err.contains("`interval`"), "{err}");
        let err = load_with(&["--metrics-addr", "localhost"], &[]).unwrap_err();
        assert!(err.contains("`metrics-addr`"), "{err}");
        let err = load_with(&["--otlp-endpoint", "collector:4317"], &[]).unwrap_err();
        assert!(err.contains("`otlp-endpoint`"), "{err}");
        let err = load_with(&["--otlp-ca", "/x.pem"], &[]).unwrap_err();
        assert!(err.contains("--otlp-endpoint"), "{err}");
        let err = load_with(
            &["--otlp-endpoint", "http://c:4317", "--otlp-ca", "/x.pem"],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("https"), "{err}");
    }

    #[test]
    fn bad_environment_values_are_errors() {
        let err = load_with(&[], &[("HEARTH_FREQUENCY", "fast")]).unwrap_err();
        assert!(err.contains("fast") && err.contains("frequency"), "{err}");
        let err = load_with(&[], &[("HEARTH_MAX_CPU_PERCENT", "0")]).unwrap_err();
        assert!(err.contains("`max-cpu-percent`"), "{err}");
    }

    #[test]
    fn otlp_options_and_headers() {
        let headers = write_toml(
            "headers.txt",
            "# secrets\nauthorization=Bearer s3cret\nx-tenant: team-a\n",
        );
        let config = load_with(
            &[
                "--otlp-endpoint",
                "https://collector:4317",
                "--otlp-header",
                "x-scope=prod",
                "--otlp-headers-file",
                headers.to_str().unwrap(),
                "--otlp-insecure-skip-verify",
            ],
            &[],
        )
        .unwrap();
        let otlp = config.otlp.as_ref().unwrap();
        assert!(otlp.insecure_skip_verify);
        assert_eq!(
            otlp.headers,
            [
                ("x-scope".to_string(), "prod".to_string()),
                ("authorization".to_string(), "Bearer s3cret".to_string()),
                ("x-tenant".to_string(), "team-a".to_string()),
            ]
        );
        assert!(config.store.is_none(), "OTLP replaces the default store");
        let printed = config.to_toml();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("authorization=<redacted>"), "{printed}");
    }

    #[test]
    fn printed_config_reads_back() {
        let config = load_with(
            &[
                "--otlp-endpoint",
                "http://c:4317",
                "--store",
                "/tmp/s",
                "--frequency",
                "49",
            ],
            &[],
        )
        .unwrap();
        let file = write_toml("printed.toml", &config.to_toml());
        let again = load_with(&["--config", file.to_str().unwrap()], &[]).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!("4MiB".parse::<ByteSize>().unwrap(), ByteSize(4 << 20));
        assert_eq!("10 KB".parse::<ByteSize>().unwrap(), ByteSize(10_000));
        assert_eq!("123".parse::<ByteSize>().unwrap(), ByteSize(123));
        assert!("4 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(4 << 20).to_string(), "4MiB");
        assert_eq!(
            "7d".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(7 * 86400)
        );
    }
}
