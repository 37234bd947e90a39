//! A [`Symbolize`] that needs no process, file or kernel: addresses map to
//! names from a table. For tests of the pipeline and exporters.

use std::collections::HashMap;
use std::sync::Arc;

use crate::profile::{Frame, FrameId, FrameKind, ProfileBuilder};

use super::{Symbolize, SymbolizerStats, UNKNOWN};

/// Maps exact addresses to function names.
///
/// Unlike [`BlazeSymbolizer`](super::BlazeSymbolizer) it does not subtract
/// one from return addresses: a test says exactly which address means
/// what. Addresses not in the table give an `[unknown]` frame. Every frame
/// has no mapping and keeps its address; user and kernel share the table
/// (the frame kind follows the method called).
#[derive(Debug, Clone, Default)]
pub struct MapSymbolizer {
    names: HashMap<u64, Arc<str>>,
    stats: SymbolizerStats,
    /// Number of `end_window` calls.
    pub windows: u64,
}

impl MapSymbolizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a name; builder style.
    pub fn with(mut self, addr: u64, name: &str) -> Self {
        self.insert(addr, name);
        self
    }

    pub fn insert(&mut self, addr: u64, name: &str) {
        self.names.insert(addr, Arc::from(name));
    }

    fn stack(
        &mut self,
        kind: FrameKind,
        ips: &[u64],
        builder: &mut ProfileBuilder,
        out: &mut Vec<FrameId>,
    ) {
        for &ip in ips {
            let function = match self.names.get(&ip) {
                Some(name) => {
                    self.stats.cache_hits += 1;
                    name.clone()
                }
                None => {
                    self.stats.cache_misses += 1;
                    self.stats.unknown_frames += 1;
                    Arc::from(UNKNOWN)
                }
            };
            out.push(builder.intern_frame(&Frame {
                function,
                file: None,
                line: None,
                kind,
                mapping: None,
                address: ip,
                inlined: false,
            }));
        }
    }
}

impl Symbolize for MapSymbolizer {
    fn user_stack(
        &mut self,
        _pid: u32,
        ips: &[u64],
        builder: &mut ProfileBuilder,
        out: &mut Vec<FrameId>,
    ) {
        self.stack(FrameKind::Native, ips, builder, out);
    }

    fn kernel_stack(&mut self, ips: &[u64], builder: &mut ProfileBuilder, out: &mut Vec<FrameId>) {
        self.stack(FrameKind::Kernel, ips, builder, out);
    }

    fn end_window(&mut self) {
        self.windows += 1;
    }

    fn stats(&self) -> SymbolizerStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::meta;

    #[test]
    fn known_and_unknown_addresses() {
        let mut s = MapSymbolizer::new().with(0x10, "main").with(0x20, "leaf");
        let mut b = ProfileBuilder::new(meta());
        let mut out = Vec::new();
        s.user_stack(1, &[0x20, 0x99, 0x10], &mut b, &mut out);
        s.kernel_stack(&[0x10], &mut b, &mut out);
        s.end_window();
        let p = b.build();
        let names: Vec<&str> = out.iter().map(|&f| &*p.frame(f).function).collect();
        assert_eq!(names, ["leaf", "[unknown]", "main", "main"]);
        assert_eq!(p.frame(out[1]).address, 0x99);
        assert_eq!(p.frame(out[3]).kind, FrameKind::Kernel);
        assert_eq!(s.stats().unknown_frames, 1);
        assert_eq!(s.windows, 1);
    }
}
