//! What a process says about itself (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES` in its environment), host tags
//! (`--tag key=value`), and the precedence that turns those, the
//! Kubernetes pod and the executable into `service.name`,
//! `service.version` and `deployment.environment.name`.
//!
//! From `OTEL_RESOURCE_ATTRIBUTES` only keys under `service.` and
//! `deployment.` are taken: hearth profiles every process on the host, so
//! a process is trusted to name itself, not to set the attributes hearth
//! derives (`k8s.*`, `container.*`, `process.*`, `host.*`), and each
//! further key would multiply the backend's series. The value is parsed
//! as the OpenTelemetry SDKs do: comma-separated `key=value` pairs,
//! percent-encoded; a malformed value is discarded whole (the spec's
//! rule), logged at debug level.

use std::collections::HashMap;
use std::io::Read;

/// Resource attributes taken from a process's environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceEnv {
    /// `OTEL_SERVICE_NAME`, which wins over `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`.
    pub service_name: Option<String>,
    /// The `service.*` and `deployment.*` pairs of
    /// `OTEL_RESOURCE_ATTRIBUTES`, in order.
    pub attributes: Vec<(String, String)>,
}

/// Most of an environment read: variables past it are not seen. Real
/// environments are a few KiB; this bounds a hostile one.
const ENVIRON_LIMIT: u64 = 256 << 10;
/// Most pass-through attributes taken from one process.
const MAX_ENV_ATTRIBUTES: usize = 16;
/// Longest attribute value taken from a process (bytes); longer ones are
/// cut at a character boundary.
pub const MAX_VALUE_LEN: usize = 1024;

/// Reads the service attributes of `pid` from `/proc/<pid>/environ` (the
/// environment it started with). Empty when it cannot be read.
pub fn read_env(pid: u32) -> ServiceEnv {
    let mut bytes = Vec::new();
    let read = std::fs::File::open(format!("/proc/{pid}/environ"))
        .and_then(|f| f.take(ENVIRON_LIMIT).read_to_end(&mut bytes));
    match read {
        Ok(_) => parse_environ(&bytes),
        Err(_) => ServiceEnv::default(),
    }
}

/// Parses a NUL-separated environment block.
pub fn parse_environ(environ: &[u8]) -> ServiceEnv {
    let mut env = ServiceEnv::default();
    for var in environ.split(|&b| b == 0) {
        if let Some(value) = var.strip_prefix(b"OTEL_SERVICE_NAME=") {
            let name = String::from_utf8_lossy(value);
            let name = name.trim();
            if !name.is_empty() {
                env.service_name = Some(truncate(name).to_string());
            }
        } else if let Some(value) = var.strip_prefix(b"OTEL_RESOURCE_ATTRIBUTES=") {
            let Ok(text) = std::str::from_utf8(value) else {
                continue;
            };
            match parse_resource_attributes(text) {
                Ok(pairs) => {
                    env.attributes = pairs
                        .into_iter()
                        .filter(|(k, _)| is_passed_through(k))
                        .take(MAX_ENV_ATTRIBUTES)
                        .map(|(k, v)| (k, truncate(&v).to_string()))
                        .collect();
                }
                Err(e) => tracing::debug!(error = %e, "ignoring OTEL_RESOURCE_ATTRIBUTES"),
            }
        }
    }
    env
}

/// Keys of `OTEL_RESOURCE_ATTRIBUTES` (and pod annotations) hearth
/// passes on.
pub fn is_passed_through(key: &str) -> bool {
    (key.starts_with("service.") || key.starts_with("deployment.")) && key.len() <= 128
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_VALUE_LEN {
        return s;
    }
    let mut end = MAX_VALUE_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why an `OTEL_RESOURCE_ATTRIBUTES` value was discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceAttributesError {
    #[error("`{0}` is not key=value")]
    NotAPair(String),
    #[error("empty key in `{0}`")]
    EmptyKey(String),
    #[error("bad percent-encoding in `{0}`")]
    BadEncoding(String),
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES`: `key=value` pairs separated by
/// commas, keys and values percent-encoded, spaces around them ignored,
/// empty entries skipped. A later duplicate key wins, as in the SDKs.
pub fn parse_resource_attributes(
    text: &str,
) -> Result<Vec<(String, String)>, ResourceAttributesError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for entry in text.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| ResourceAttributesError::NotAPair(entry.to_string()))?;
        let decode = |s: &str| {
            percent_decode(s.trim())
                .ok_or_else(|| ResourceAttributesError::BadEncoding(entry.to_string()))
        };
        let (key, value) = (decode(key)?, decode(value)?);
        if key.is_empty() {
            return Err(ResourceAttributesError::EmptyKey(entry.to_string()));
        }
        out.retain(|(k, _)| *k != key);
        out.push((key, value));
    }
    Ok(out)
}

/// `%XX` escapes to bytes; the result must be UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses a host tag `key=value`: key and value non-empty, the key made of
/// letters, digits and `._-/`.
pub fn parse_tag(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("tag {text:?} is not key=value"))?;
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() {
        return Err(format!("tag {text:?} has an empty key"));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        return Err(format!(
            "tag key {key:?} contains {c:?} (letters, digits and . _ - / only)"
        ));
    }
    if value.is_empty() {
        return Err(format!("tag {text:?} has an empty value"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Checks a list of tags; a key given twice is an error (which one was
/// meant?).
pub fn parse_tags(tags: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for tag in tags {
        let (key, value) = parse_tag(tag)?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("tag key {key:?} is given twice"));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// An image reference split into name and tag:
/// `registry:5000/team/app:1.2@sha256:…` → (`registry:5000/team/app`,
/// `1.2`). No tag for digest-only references.
pub fn split_image(image: &str) -> (&str, Option<&str>) {
    let image = image.split_once('@').map_or(image, |(name, _)| name);
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(colon) => {
            let colon = last_slash + colon;
            let tag = &image[colon + 1..];
            (&image[..colon], (!tag.is_empty()).then_some(tag))
        }
        None => (image, None),
    }
}

/// The first candidate that is set and not empty.
pub fn first<'a>(candidates: impl IntoIterator<Item = Option<&'a str>>) -> Option<&'a str> {
    candidates.into_iter().flatten().find(|s| !s.is_empty())
}

/// `service.*`/`deployment.*` attributes of the environment as a map.
pub fn env_map(env: &ServiceEnv) -> HashMap<&str, &str> {
    env.attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn resource_attributes_parse_like_the_sdks() {
        assert_eq!(parse_resource_attributes("").unwrap(), []);
        assert_eq!(parse_resource_attributes(" , ,").unwrap(), []);
        assert_eq!(
            parse_resource_attributes("service.name=cart,service.version=1.4.2").unwrap(),
            pairs(&[("service.name", "cart"), ("service.version", "1.4.2")])
        );
        // Spaces around keys and values, empty values, '=' in values.
        assert_eq!(
            parse_resource_attributes(" a = b , empty= ,eq=x=y").unwrap(),
            pairs(&[("a", "b"), ("empty", ""), ("eq", "x=y")])
        );
        // Percent-encoding of both sides, UTF-8 included.
        assert_eq!(
            parse_resource_attributes("service.name=my%20app%2Cv2,k%3Dx=caf%C3%A9%25").unwrap(),
            pairs(&[("service.name", "my app,v2"), ("k=x", "café%")])
        );
        // A later duplicate wins.
        assert_eq!(
            parse_resource_attributes("a=1,b=2,a=3").unwrap(),
            pairs(&[("b", "2"), ("a", "3")])
        );
    }

    #[test]
    fn malformed_resource_attributes_are_errors() {
        for bad in [
            "service.name",
            "a=1,novalue",
            "=x",
            " =x",
            "a=%",
            "a=%4",
            "a=%zz",
            "a=%FF",
            "%G1=x",
        ] {
            assert!(parse_resource_attributes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn environment_gives_service_attributes_only() {
        let environ = b"PATH=/bin\0OTEL_RESOURCE_ATTRIBUTES=service.name=from-attrs,\
service.version=2.0,deployment.environment.name=prod,k8s.pod.name=spoofed,team=x\0\
OTEL_SERVICE_NAME=checkout\0HOME=/root\0";
        let env = parse_environ(environ);
        assert_eq!(env.service_name.as_deref(), Some("checkout"));
        assert_eq!(
            env.attributes,
            pairs(&[
                ("service.name", "from-attrs"),
                ("service.version", "2.0"),
                ("deployment.environment.name", "prod"),
            ])
        );
        // A malformed value is discarded whole; other variables still count.
        let env = parse_environ(
            b"OTEL_RESOURCE_ATTRIBUTES=service.version=1,broken\0OTEL_SERVICE_NAME= x \0",
        );
        assert_eq!(env.attributes, []);
        assert_eq!(env.service_name.as_deref(), Some("x"));
        // Empty, absent, binary garbage.
        assert_eq!(parse_environ(b""), ServiceEnv::default());
        assert_eq!(
            parse_environ(b"OTEL_SERVICE_NAME=\0OTEL_RESOURCE_ATTRIBUTES=\xff\xfe\0\0\0"),
            ServiceEnv::default()
        );
        // Long values are cut, many attributes capped.
        let long = format!("OTEL_SERVICE_NAME={}", "é".repeat(1000));
        let env = parse_environ(long.as_bytes());
        assert!(env.service_name.unwrap().len() <= MAX_VALUE_LEN);
        let many: Vec<String> = (0..40).map(|i| format!("service.k{i}=v")).collect();
        let env = parse_environ(format!("OTEL_RESOURCE_ATTRIBUTES={}", many.join(",")).as_bytes());
        assert_eq!(env.attributes.len(), MAX_ENV_ATTRIBUTES);
    }

    #[test]
    fn own_environment_reads() {
        // The test binary's environment has no OTEL variables unless the
        // runner set some; either way reading it works.
        let env = read_env(std::process::id());
        assert!(env.attributes.len() <= MAX_ENV_ATTRIBUTES);
        assert_eq!(read_env(u32::MAX - 1), ServiceEnv::default());
    }

    #[test]
    fn tags() {
        assert_eq!(
            parse_tag("region=eu-1").unwrap(),
            ("region".into(), "eu-1".into())
        );
        assert_eq!(
            parse_tag(" deployment.environment.name = prod ").unwrap(),
            ("deployment.environment.name".into(), "prod".into())
        );
        assert_eq!(parse_tag("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(
            parse_tag("team/owner=x").unwrap(),
            ("team/owner".into(), "x".into())
        );
        for bad in ["region", "=eu", "region=", "re gion=x", "région=x", "a,b=c"] {
            assert!(parse_tag(bad).is_err(), "{bad:?}");
        }
        assert!(parse_tag("region").unwrap_err().contains("key=value"));
        let list = |v: &[&str]| parse_tags(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(list(&["a=1", "b=2"]).unwrap().len(), 2);
        assert!(list(&["a=1", "a=2"]).unwrap_err().contains("twice"));
        assert!(list(&[]).unwrap().is_empty());
    }

    #[test]
    fn image_references() {
        assert_eq!(split_image("nginx:1.25.3"), ("nginx", Some("1.25.3")));
        assert_eq!(split_image("nginx"), ("nginx", None));
        assert_eq!(
            split_image("registry.example:5000/team/app:v2@sha256:abcd"),
            ("registry.example:5000/team/app", Some("v2"))
        );
        assert_eq!(
            split_image("registry.example:5000/team/app"),
            ("registry.example:5000/team/app", None)
        );
        assert_eq!(split_image("app@sha256:abcd"), ("app", None));
        assert_eq!(split_image("app:"), ("app", None));
        assert_eq!(split_image(""), ("", None));
    }

    #[test]
    fn first_set_candidate_wins() {
        assert_eq!(first([None, Some(""), Some("b"), Some("c")]), Some("b"));
        assert_eq!(first([None, None]), None);
    }
}
