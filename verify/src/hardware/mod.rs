//! Hardware counters: per-range figures read from Nsight Compute (`ncu`) exports.
//!
//! [`ncu_csv`] reads `ncu --csv --page raw` text. Running layers under `ncu`
//! (`verify-decoder --hardware-counters`) is not built yet; the parser is tested on real
//! per-kernel exports from an H200 (`fixtures/ncu-h200/`).

pub mod ncu_csv;
