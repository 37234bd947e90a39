//! Kernel function (kfunc) calls in the kernel object, which aya 0.14
//! cannot relocate: the kernel crate calls a placeholder helper id, and
//! this module rewrites those instructions into kfunc calls to the BTF id
//! of the running kernel's function before the object is loaded.

use hearth_ebpf::TASK_WORK_RESUME_PLACEHOLDER;

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// `src_reg` of a kfunc call (`BPF_PSEUDO_KFUNC_CALL`), in the high nibble
/// of the registers byte.
const PSEUDO_KFUNC_CALL: u8 = 2 << 4;

/// The kernel object, copied to 8-byte-aligned memory (the ELF parser
/// reads it in place) so its instructions can be rewritten.
pub struct Object {
    words: Vec<u64>,
    len: usize,
}

impl Object {
    pub fn new(bytes: &[u8]) -> Self {
        let mut object = Self {
            words: vec![0; bytes.len().div_ceil(8)],
            len: bytes.len(),
        };
        object.bytes_mut().copy_from_slice(bytes);
        object
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }

    /// Rewrites every call of the task-work placeholder into a call of the
    /// kfunc with vmlinux BTF id `btf_id`; returns how many it rewrote.
    /// Instructions are 8-byte aligned in the object, as its sections are.
    pub fn link_task_work(&mut self, btf_id: u32) -> usize {
        let placeholder = call_instruction(0, TASK_WORK_RESUME_PLACEHOLDER);
        let kfunc = call_instruction(PSEUDO_KFUNC_CALL, btf_id);
        let mut linked = 0;
        for instruction in self.bytes_mut().chunks_exact_mut(8) {
            if *instruction == placeholder {
                instruction.copy_from_slice(&kfunc);
                linked += 1;
            }
        }
        linked
    }
}

fn call_instruction(registers: u8, imm: u32) -> [u8; 8] {
    let imm = imm.to_le_bytes();
    [CALL, registers, 0, 0, imm[0], imm[1], imm[2], imm[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_calls_become_kfunc_calls_and_nothing_else_changes() {
        let placeholder = call_instruction(0, TASK_WORK_RESUME_PLACEHOLDER);
        let helper = call_instruction(0, 141);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&helper);
        bytes.extend_from_slice(&placeholder);
        // Not on an instruction boundary: data, left alone.
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&placeholder);
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&placeholder);
        let mut object = Object::new(&bytes);
        assert_eq!(object.link_task_work(65932), 2);
        let out = object.as_bytes();
        assert_eq!(out.len(), bytes.len());
        assert_eq!(&out[..8], &helper);
        assert_eq!(&out[8..16], &call_instruction(PSEUDO_KFUNC_CALL, 65932));
        assert_eq!(&out[16..32], &bytes[16..32]);
        assert_eq!(&out[32..40], &call_instruction(PSEUDO_KFUNC_CALL, 65932));
        assert_eq!(Object::new(&helper).link_task_work(1), 0);
    }
}
