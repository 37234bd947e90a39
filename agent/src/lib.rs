//! hearth: a host-wide continuous profiling agent.
//!
//! Data flows one way: kernel maps → [`bpf`] (load, attach, drain) →
//! [`pipeline`] ([`symbolize`], [`process`] and [`metadata`]) → [`profile`] (the
//! one internal model) → [`export`] (folded, flame graph, pprof). [`record`]
//! drives that flow for one-shot recordings. See `docs/ARCHITECTURE.md`.

pub mod analysis;
pub mod bpf;
pub mod caps;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod export;
pub mod filter;
pub mod incarnation;
pub mod metadata;
pub mod metrics;
pub mod pipeline;
pub mod process;
pub mod profile;
pub mod record;
pub mod report;
pub mod symbolize;
pub mod unwind;
