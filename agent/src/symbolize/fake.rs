//! A [`Symbolize`] that needs no process, file or kernel: addresses map to
//! names from a table. For tests of the pipeline and exporters.

use std::collections::HashMap;
use std::sync::Arc;

use crate::incarnation::{Capture, ProcessKey};
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
    /// Per image name (a captured process's name): addresses that mean
    /// something else in that image.
    images: HashMap<(String, u64), Arc<str>>,
    /// Captured images adopted, by process key: their names.
    adopted: HashMap<ProcessKey, String>,
    /// Process keys stacks were asked for, in order.
    pub asked: Vec<ProcessKey>,
    /// Images forgotten.
    pub forgotten: Vec<ProcessKey>,
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

    /// Adds a name valid in processes whose capture is named `image`.
    pub fn with_image(mut self, image: &str, addr: u64, name: &str) -> Self {
        self.images
            .insert((image.to_string(), addr), Arc::from(name));
        self
    }

    pub fn insert(&mut self, addr: u64, name: &str) {
        self.names.insert(addr, Arc::from(name));
    }

    fn stack(
        &mut self,
        image: Option<&str>,
        kind: FrameKind,
        ips: &[u64],
        builder: &mut ProfileBuilder,
        out: &mut Vec<FrameId>,
    ) {
        for &ip in ips {
            let in_image = image.and_then(|i| self.images.get(&(i.to_string(), ip)));
            let function = match in_image.or_else(|| self.names.get(&ip)) {
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
        process: ProcessKey,
        ips: &[u64],
        builder: &mut ProfileBuilder,
        out: &mut Vec<FrameId>,
    ) {
        self.asked.push(process);
        let image = self.adopted.get(&process).cloned();
        self.stack(image.as_deref(), FrameKind::Native, ips, builder, out);
    }

    fn adopt(&mut self, capture: &Arc<Capture>) {
        self.adopted.insert(capture.key(), capture.name.clone());
    }

    fn forget(&mut self, process: ProcessKey) {
        self.adopted.remove(&process);
        self.forgotten.push(process);
    }

    fn kernel_stack(&mut self, ips: &[u64], builder: &mut ProfileBuilder, out: &mut Vec<FrameId>) {
        self.stack(None, FrameKind::Kernel, ips, builder, out);
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
    use crate::incarnation::Image;
    use crate::profile::tests::meta;

    #[test]
    fn known_and_unknown_addresses() {
        let mut s = MapSymbolizer::new().with(0x10, "main").with(0x20, "leaf");
        let mut b = ProfileBuilder::new(meta());
        let mut out = Vec::new();
        s.user_stack(
            ProcessKey::new(1, Image::Unknown),
            &[0x20, 0x99, 0x10],
            &mut b,
            &mut out,
        );
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
