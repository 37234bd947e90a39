//! hearth's kernel programs, built for `bpfel-unknown-none` by
//! `cargo xtask` with the nightly toolchain and embedded in the agent.
//! One file per program; maps shared between programs live in `maps`.
//! On the host this binary is an empty stub so workspace builds work.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// `core::intrinsics::atomic_xadd`: the BPF target has no atomic types.
#![cfg_attr(
    target_arch = "bpf",
    feature(core_intrinsics),
    allow(internal_features)
)]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod off_cpu;
#[cfg(target_arch = "bpf")]
mod on_cpu;
#[cfg(target_arch = "bpf")]
mod process_events;
#[cfg(target_arch = "bpf")]
mod stack;
#[cfg(target_arch = "bpf")]
mod unwind;

/// GPL-compatible licence string: the frame walker needs GPL-only helpers
/// (`bpf_probe_read_user`, `bpf_get_current_task_btf`).
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it exists only to
    // satisfy `no_std`.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "hearth-ebpf is built for bpfel-unknown-none by `cargo xtask`; it does not run on the host"
    );
}
