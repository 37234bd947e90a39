//! Writers that turn a [`crate::profile::Profile`] into files people and
//! other tools read.
//!
//! Three formats, each a module with a `write` function from the one
//! profile model: [`folded`] stacks (which can also be parsed back),
//! interactive [`flamegraph`] SVGs (rendered by inferno from the folded
//! lines), and gzipped [`pprof`] (which can also be decoded back). The
//! output format is chosen by file extension ([`OutputFormat::from_path`]).

pub mod delivery;
pub mod flamegraph;
pub mod folded;
pub mod otlp;
pub mod pprof;
pub mod store;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::profile::Profile;

/// The extensions [`OutputFormat::from_path`] accepts, for error messages.
const SUPPORTED: &str =
    ".svg (flame graph), .folded (folded stacks), .pb.gz or .pprof (gzipped pprof)";

/// A file format a profile can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// Interactive flame graph SVG.
    FlameGraph,
    /// Brendan Gregg's folded stacks, one `stack count` line per stack.
    Folded,
    /// Gzipped pprof protobuf.
    Pprof,
}

impl OutputFormat {
    /// The format for `path`, by extension: `.svg`, `.folded`, `.pb.gz` or
    /// `.pprof` (case-insensitive).
    pub fn from_path(path: &Path) -> Result<OutputFormat, ExportError> {
        let name = lower_file_name(path);
        if name.ends_with(".svg") {
            Ok(OutputFormat::FlameGraph)
        } else if name.ends_with(".folded") {
            Ok(OutputFormat::Folded)
        } else if name.ends_with(".pb.gz") || name.ends_with(".pprof") {
            Ok(OutputFormat::Pprof)
        } else {
            Err(ExportError::UnknownFormat {
                path: path.to_path_buf(),
            })
        }
    }
}

/// Why a profile could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Creating, writing or renaming the named file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to a caller's stream failed.
    #[error("I/O error: {0}")]
    Stream(#[from] io::Error),
    #[error("{}: unknown output format; supported extensions: {SUPPORTED}", path.display())]
    UnknownFormat { path: PathBuf },
    /// Input that is not a valid file of the format.
    #[error("invalid {format} input: {message}")]
    Decode {
        format: &'static str,
        message: String,
    },
    /// inferno failed to render a non-empty profile.
    #[error("rendering the flame graph: {0}")]
    FlameGraph(#[source] io::Error),
}

/// Writes `profile` to `out` in `format`. `out` should be buffered: the
/// folded writer issues one small write per line.
pub fn write_profile(
    profile: &Profile,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), ExportError> {
    match format {
        OutputFormat::FlameGraph => {
            flamegraph::write(profile, &flamegraph::default_title(&profile.meta), out)
        }
        OutputFormat::Folded => folded::write(profile, out),
        OutputFormat::Pprof => pprof::write(profile, out),
    }
}

/// The file name of `path` in lower case, for telling formats apart by
/// extension (`Path::extension` cannot see double ones like `.pb.gz`).
pub fn lower_file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Proves that `path` can be created, leaving nothing behind, so a command
/// can refuse a bad output before spending time on sampling or reading.
pub fn check_writable(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Err(io::Error::other("is a directory"));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let probe = path.with_file_name(format!(".{name}.hearth-probe-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|_| fs::remove_file(&probe))
}

/// Puts `bytes` at `path` through a synced temporary file and a rename, so
/// readers never see half a file and a failure leaves any old one intact.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        // Best effort: the write error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Writes `profile` to `path` in the format its extension names.
///
/// The file is written under a temporary name in the same directory and
/// renamed into place, so readers never see a half-written profile and a
/// failed write leaves any previous file intact.
pub fn write_profile_to_path(profile: &Profile, path: &Path) -> Result<(), ExportError> {
    let format = OutputFormat::from_path(path)?;
    let io_err = |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = temp_path(path);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err)?;
    let written = write_and_sync(profile, format, file)
        .map_err(|e| match e {
            ExportError::Stream(source) => io_err(source),
            e => e,
        })
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err));
    if written.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn write_and_sync(profile: &Profile, format: OutputFormat, file: File) -> Result<(), ExportError> {
    let mut out = BufWriter::new(file);
    write_profile(profile, format, &mut out)?;
    let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    // Without this a crash soon after the rename can leave an empty file
    // under the final name on some file systems.
    file.sync_all()?;
    Ok(())
}

/// A name next to `path` that no other writer (in this or another
/// process) uses at the same time.
fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::sample_profile;

    #[test]
    fn format_from_extension() {
        let cases = [
            ("out.svg", OutputFormat::FlameGraph),
            ("dir/OUT.SVG", OutputFormat::FlameGraph),
            ("x.folded", OutputFormat::Folded),
            ("x.pb.gz", OutputFormat::Pprof),
            ("x.pprof", OutputFormat::Pprof),
        ];
        for (path, want) in cases {
            assert_eq!(
                OutputFormat::from_path(Path::new(path)).unwrap(),
                want,
                "{path}"
            );
        }
    }

    #[test]
    fn unknown_extension_names_the_supported_ones() {
        for path in ["out.png", "out.gz", "out", "/"] {
            let err = OutputFormat::from_path(Path::new(path)).unwrap_err();
            assert!(matches!(err, ExportError::UnknownFormat { .. }), "{path}");
            let msg = err.to_string();
            for ext in [".svg", ".folded", ".pb.gz", ".pprof"] {
                assert!(msg.contains(ext), "{msg}");
            }
        }
        let msg = OutputFormat::from_path(Path::new("out.png"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("out.png"), "{msg}");
    }

    #[test]
    fn write_to_path_is_atomic_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("hearth-export-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let profile = sample_profile();
        for name in ["p.folded", "p.svg", "p.pb.gz"] {
            let path = dir.join(name);
            fs::write(&path, "old").unwrap();
            write_profile_to_path(&profile, &path).unwrap();
            let bytes = fs::read(&path).unwrap();
            assert_ne!(bytes, b"old", "{name}");
            let mut direct = Vec::new();
            write_profile(
                &profile,
                OutputFormat::from_path(&path).unwrap(),
                &mut direct,
            )
            .unwrap();
            assert_eq!(bytes, direct, "{name}");
        }
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_to_missing_directory_names_the_path() {
        let path = Path::new("/nonexistent-hearth-dir/p.folded");
        let err = write_profile_to_path(&sample_profile(), path).unwrap_err();
        assert!(matches!(err, ExportError::Io { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent-hearth-dir/p.folded"),
            "{err}"
        );
    }
}
