//! The committed table of GPU coefficients behind the step-time model, with the
//! source of every number.
//!
//! Three kinds of numbers ([`Provenance`]):
//! - **datasheet**: NVIDIA's published peak figures (dense bf16 tensor TFLOP/s without
//!   sparsity, HBM/GDDR bandwidth, interconnect) and `nvidia-smi`'s `memory.total`;
//! - **calibrated**: fitted to our own measurements on a lent H100 80GB HBM3, recorded
//!   in `benches/RESULTS.md` § "CUDA kernels" (device copy 3024 GB/s, a bf16 GEMM at
//!   798 TFLOP/s, the paged decode-attention and prefill-attention tables, the
//!   elementwise and sampling kernels);
//! - **estimate**: neither — published NCCL figures of other people's machines or an
//!   engineering guess; on GPUs other than the H100 the calibrated *fractions* are
//!   carried over unchanged (an assumption, labelled as such).
//!
//! Invariant: every coefficient of every GPU has exactly one [`Coefficient`] row in
//! [`GpuSpec::provenance`] (a test checks it). Nothing here is a measurement of the
//! machine the sim runs on: the sim never reads a CPU clock as a GPU figure.

use std::fmt;
use std::str::FromStr;

use crate::WorkerError;

/// The GPU types the sim models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuKind {
    H100,
    H200,
    A100,
    L40s,
}

impl GpuKind {
    pub const ALL: [GpuKind; 4] = [GpuKind::H100, GpuKind::H200, GpuKind::A100, GpuKind::L40s];

    /// Whether its tensor cores run fp8 (Hopper and Ada do, Ampere does not).
    pub fn has_fp8(self) -> bool {
        !matches!(self, GpuKind::A100)
    }

    /// The CLI name (`h100`, `h200`, `a100`, `l40s`).
    pub fn name(self) -> &'static str {
        match self {
            GpuKind::H100 => "h100",
            GpuKind::H200 => "h200",
            GpuKind::A100 => "a100",
            GpuKind::L40s => "l40s",
        }
    }

    /// This GPU's coefficients.
    pub fn spec(self) -> GpuSpec {
        match self {
            GpuKind::H100 => H100,
            GpuKind::H200 => H200,
            GpuKind::A100 => A100,
            GpuKind::L40s => L40S,
        }
    }
}

impl fmt::Display for GpuKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GpuKind {
    type Err = WorkerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "h100" => Ok(GpuKind::H100),
            "h200" => Ok(GpuKind::H200),
            "a100" => Ok(GpuKind::A100),
            "l40s" => Ok(GpuKind::L40s),
            "cpu" => Err(WorkerError::Config(
                "the sim models GPUs only (h100, h200, a100, l40s); CPU timings are measured with the cpu backend, never modelled".into(),
            )),
            other => Err(WorkerError::Config(format!(
                "unknown GPU '{other}' (the sim models h100, h200, a100, l40s)"
            ))),
        }
    }
}

/// Where a coefficient comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// NVIDIA's published specification.
    Datasheet,
    /// Fitted to our own GPU measurements (`benches/RESULTS.md`).
    Calibrated,
    /// Published figures of other setups, an assumption carried over from another GPU,
    /// or an engineering guess; not measured by us.
    Estimate,
}

impl Provenance {
    pub fn name(self) -> &'static str {
        match self {
            Provenance::Datasheet => "datasheet",
            Provenance::Calibrated => "calibrated",
            Provenance::Estimate => "estimate",
        }
    }
}

/// One coefficient's origin.
#[derive(Clone, Copy, Debug)]
pub struct Coefficient {
    pub field: &'static str,
    pub provenance: Provenance,
    pub source: &'static str,
}

/// How the ranks of one TP group all-reduce.
#[derive(Clone, Copy, Debug)]
pub struct Interconnect {
    pub name: &'static str,
    /// Achievable all-reduce bus bandwidth (NCCL's `busbw`), GB/s.
    pub allreduce_bus_gbps: f64,
    /// Latency of one small all-reduce, µs.
    pub allreduce_latency_us: f64,
}

/// Coefficients of one GPU type (one TP rank).
#[derive(Clone, Copy, Debug)]
pub struct GpuSpec {
    pub kind: GpuKind,
    pub product: &'static str,
    /// Dense bf16 tensor-core peak, TFLOP/s.
    pub peak_bf16_tflops: f64,
    /// Memory bandwidth, GB/s (10⁹ bytes).
    pub mem_gbps: f64,
    /// Achievable fraction of `mem_gbps` for streaming kernels (weights, KV, activations).
    pub mem_efficiency: f64,
    /// Achievable fraction of `peak_bf16_tflops` for the large GEMMs.
    pub gemm_efficiency: f64,
    /// Achievable fraction of `peak_bf16_tflops` for prefill attention.
    pub prefill_attention_efficiency: f64,
    /// Fixed device time of one attention launch (decode or prefill), µs.
    pub attention_floor_us: f64,
    /// Fixed device time of one small kernel (GEMM at small batch, norm, RoPE, KV
    /// write, SwiGLU), µs.
    pub kernel_floor_us: f64,
    /// Sampling on rank 0: fixed µs plus µs per sampled row.
    pub sampling_us: f64,
    pub sampling_us_per_row: f64,
    /// Per-step host-side cost of the worker (metadata copies, launch gaps), µs.
    pub step_overhead_us: f64,
    /// Device memory, bytes (`nvidia-smi` `memory.total`).
    pub memory_bytes: u64,
    pub interconnect: Interconnect,
    pub provenance: &'static [Coefficient],
}

const MIB: u64 = 1 << 20;

/// The 3024 GB/s device-to-device copy measured on our H100 (RESULTS.md) over the
/// 3350 GB/s datasheet figure.
const H100_COPY_FRACTION: f64 = 3024.0 / 3350.0;
/// The 798 TFLOP/s bf16 GEMM measured on our H100 (RESULTS.md) over 989.4 peak.
const H100_GEMM_FRACTION: f64 = 798.0 / 989.4;
/// Our prefill attention kernel: 239 TFLOP/s at 8192 causal tokens (RESULTS.md).
const H100_PREFILL_ATTN_FRACTION: f64 = 239.0 / 989.4;

const NVLINK4: Interconnect = Interconnect {
    name: "NVLink 4 (900 GB/s per GPU, NVSwitch)",
    allreduce_bus_gbps: 360.0,
    allreduce_latency_us: 8.0,
};

/// Rows shared by every GPU: the kernel-level fits from the H100 tables.
macro_rules! kernel_rows {
    ($carried:expr) => {
        [
            Coefficient {
                field: "attention_floor_us",
                provenance: if $carried { Provenance::Estimate } else { Provenance::Calibrated },
                source: "24 µs: median of (measured − KV bytes / 3024 GB/s) over the paged decode-attention table of the H100 (RESULTS.md, 48/8 and 24/4 heads); carried over unchanged to other GPUs",
            },
            Coefficient {
                field: "kernel_floor_us",
                provenance: if $carried { Provenance::Estimate } else { Provenance::Calibrated },
                source: "5 µs: (measured − bytes / 3024 GB/s) of the H100 elementwise kernels at 4096 tokens was 4.5–9.6 µs (RESULTS.md); carried over unchanged to other GPUs",
            },
            Coefficient {
                field: "sampling_us",
                provenance: if $carried { Provenance::Estimate } else { Provenance::Calibrated },
                source: "argmax_rows on the H100: 16.7 µs at 1 row, 27.3 µs at 256 rows (RESULTS.md), a line through both; carried over unchanged to other GPUs",
            },
            Coefficient {
                field: "step_overhead_us",
                provenance: Provenance::Estimate,
                source: "100 µs per step for metadata copies and launch gaps: a guess, no CUDA engine exists yet to measure it",
            },
        ]
    };
}

const H100_ROWS: [Coefficient; 12] = {
    let k = kernel_rows!(false);
    [
        Coefficient { field: "peak_bf16_tflops", provenance: Provenance::Datasheet, source: "NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense bf16 (1979 with sparsity)" },
        Coefficient { field: "mem_gbps", provenance: Provenance::Datasheet, source: "NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3" },
        Coefficient { field: "mem_efficiency", provenance: Provenance::Calibrated, source: "3024 GB/s device-to-device copy measured on our H100 (RESULTS.md) ÷ 3350" },
        Coefficient { field: "gemm_efficiency", provenance: Provenance::Calibrated, source: "798 TFLOP/s bf16 GEMM measured on the H100 (RESULTS.md, prefill-attention goal line) ÷ 989.4" },
        Coefficient { field: "prefill_attention_efficiency", provenance: Provenance::Calibrated, source: "our prefill attention kernel: 239 TFLOP/s at 8192 causal tokens on the H100 (RESULTS.md) ÷ 989.4" },
        k[0], k[1], k[2], k[3],
        Coefficient { field: "memory_bytes", provenance: Provenance::Datasheet, source: "80 GB HBM3; nvidia-smi memory.total 81559 MiB" },
        Coefficient { field: "allreduce_bus_gbps", provenance: Provenance::Estimate, source: "360 GB/s: NCCL all-reduce busbw published for NVLink-4 H100 systems (nccl-tests, large messages, no NVLS); not measured by us (one GPU lent)" },
        Coefficient { field: "allreduce_latency_us", provenance: Provenance::Estimate, source: "8 µs per small all-reduce (NCCL LL protocol, NVLink): an estimate, not measured" },
    ]
};

/// H100 SXM5 80GB: the one GPU with our own measurements.
pub const H100: GpuSpec = GpuSpec {
    kind: GpuKind::H100,
    product: "NVIDIA H100 SXM5 80GB HBM3",
    peak_bf16_tflops: 989.4,
    mem_gbps: 3350.0,
    mem_efficiency: H100_COPY_FRACTION,
    gemm_efficiency: H100_GEMM_FRACTION,
    prefill_attention_efficiency: H100_PREFILL_ATTN_FRACTION,
    attention_floor_us: 24.0,
    kernel_floor_us: 5.0,
    sampling_us: 16.7,
    sampling_us_per_row: (27.3 - 16.7) / 255.0,
    step_overhead_us: 100.0,
    memory_bytes: 81559 * MIB,
    interconnect: NVLINK4,
    provenance: &H100_ROWS,
};

/// The efficiency rows of a GPU other than the H100: the H100's fractions, assumed.
macro_rules! carried_rows {
    ($tflops:expr, $mem:expr, $memsize:expr, $bus:expr, $lat:expr) => {{
        let k = kernel_rows!(true);
        [
            Coefficient { field: "peak_bf16_tflops", provenance: Provenance::Datasheet, source: $tflops },
            Coefficient { field: "mem_gbps", provenance: Provenance::Datasheet, source: $mem },
            Coefficient { field: "mem_efficiency", provenance: Provenance::Estimate, source: "the H100's calibrated copy fraction (0.90), assumed to carry over" },
            Coefficient { field: "gemm_efficiency", provenance: Provenance::Estimate, source: "the H100's calibrated GEMM fraction (0.81), assumed to carry over" },
            Coefficient { field: "prefill_attention_efficiency", provenance: Provenance::Estimate, source: "the H100's calibrated prefill-attention fraction (0.24), assumed to carry over" },
            k[0], k[1], k[2], k[3],
            Coefficient { field: "memory_bytes", provenance: Provenance::Datasheet, source: $memsize },
            Coefficient { field: "allreduce_bus_gbps", provenance: Provenance::Estimate, source: $bus },
            Coefficient { field: "allreduce_latency_us", provenance: Provenance::Estimate, source: $lat },
        ]
    }};
}

const H200_ROWS: [Coefficient; 12] = carried_rows!(
    "NVIDIA H200 SXM datasheet: 989.4 TFLOP/s dense bf16",
    "NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e",
    "141 GB HBM3e; nvidia-smi memory.total 143771 MiB",
    "360 GB/s: as the H100 (same NVLink 4); not measured",
    "8 µs: as the H100; not measured"
);

/// H200 SXM 141GB.
pub const H200: GpuSpec = GpuSpec {
    kind: GpuKind::H200,
    product: "NVIDIA H200 SXM 141GB HBM3e",
    peak_bf16_tflops: 989.4,
    mem_gbps: 4800.0,
    memory_bytes: 143771 * MIB,
    provenance: &H200_ROWS,
    ..H100
};

const A100_ROWS: [Coefficient; 12] = carried_rows!(
    "NVIDIA A100 datasheet: 312 TFLOP/s dense bf16 (624 with sparsity)",
    "NVIDIA A100 80GB SXM4 datasheet: 2039 GB/s HBM2e",
    "80 GB HBM2e; nvidia-smi memory.total 81920 MiB",
    "230 GB/s: NCCL all-reduce busbw published for DGX A100 (NVLink 3, 600 GB/s per GPU); not measured",
    "8 µs: as NVLink 4; not measured"
);

/// A100 SXM4 80GB.
pub const A100: GpuSpec = GpuSpec {
    kind: GpuKind::A100,
    product: "NVIDIA A100 SXM4 80GB HBM2e",
    peak_bf16_tflops: 312.0,
    mem_gbps: 2039.0,
    memory_bytes: 81920 * MIB,
    interconnect: Interconnect {
        name: "NVLink 3 (600 GB/s per GPU, NVSwitch)",
        allreduce_bus_gbps: 230.0,
        allreduce_latency_us: 8.0,
    },
    provenance: &A100_ROWS,
    ..H100
};

const L40S_ROWS: [Coefficient; 12] = carried_rows!(
    "NVIDIA L40S datasheet: 362.05 TFLOP/s dense bf16 (733 with sparsity)",
    "NVIDIA L40S datasheet: 864 GB/s GDDR6",
    "48 GB GDDR6; nvidia-smi memory.total 46068 MiB",
    "20 GB/s: PCIe Gen4 x16 (32 GB/s per direction) through the host, no NVLink; an estimate",
    "20 µs per small all-reduce over PCIe: an estimate"
);

/// L40S 48GB (PCIe card, no NVLink).
pub const L40S: GpuSpec = GpuSpec {
    kind: GpuKind::L40s,
    product: "NVIDIA L40S 48GB GDDR6 (PCIe)",
    peak_bf16_tflops: 362.05,
    mem_gbps: 864.0,
    memory_bytes: 46068 * MIB,
    interconnect: Interconnect {
        name: "PCIe Gen4 x16 (no NVLink)",
        allreduce_bus_gbps: 20.0,
        allreduce_latency_us: 20.0,
    },
    provenance: &L40S_ROWS,
    ..H100
};

impl GpuSpec {
    /// Streaming bandwidth the model uses, bytes/µs.
    pub fn effective_bytes_per_us(&self) -> f64 {
        self.mem_gbps * self.mem_efficiency * 1e3
    }

    /// GEMM throughput the model uses, FLOP/µs.
    pub fn effective_gemm_flops_per_us(&self) -> f64 {
        self.peak_bf16_tflops * self.gemm_efficiency * 1e6
    }

    /// The fields whose provenance is `p`.
    pub fn fields_with(&self, p: Provenance) -> Vec<&'static str> {
        self.provenance
            .iter()
            .filter(|c| c.provenance == p)
            .map(|c| c.field)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: [&str; 12] = [
        "peak_bf16_tflops",
        "mem_gbps",
        "mem_efficiency",
        "gemm_efficiency",
        "prefill_attention_efficiency",
        "attention_floor_us",
        "kernel_floor_us",
        "sampling_us",
        "step_overhead_us",
        "memory_bytes",
        "allreduce_bus_gbps",
        "allreduce_latency_us",
    ];

    #[test]
    fn every_coefficient_of_every_gpu_names_its_source_once() {
        for g in GpuKind::ALL {
            let spec = g.spec();
            assert_eq!(spec.kind, g);
            for f in FIELDS {
                let rows: Vec<_> = spec.provenance.iter().filter(|c| c.field == f).collect();
                assert_eq!(rows.len(), 1, "{g}: {f}");
                assert!(!rows[0].source.is_empty());
            }
            assert_eq!(spec.provenance.len(), FIELDS.len(), "{g}");
        }
    }

    #[test]
    fn only_the_h100_has_calibrated_coefficients() {
        assert!(H100.fields_with(Provenance::Calibrated).len() >= 5);
        for g in [GpuKind::H200, GpuKind::A100, GpuKind::L40s] {
            assert!(
                g.spec().fields_with(Provenance::Calibrated).is_empty(),
                "{g}"
            );
        }
    }

    #[test]
    fn the_h100_fractions_come_from_the_recorded_measurements() {
        assert!((H100.effective_bytes_per_us() - 3024e3).abs() < 1.0);
        assert!((H100.effective_gemm_flops_per_us() - 798e6).abs() < 1.0);
    }

    #[test]
    fn names_parse_and_cpu_is_refused_with_a_reason() {
        for g in GpuKind::ALL {
            assert_eq!(g.name().parse::<GpuKind>().unwrap(), g);
        }
        let e = "cpu".parse::<GpuKind>().unwrap_err().to_string();
        assert!(e.contains("never modelled"), "{e}");
        assert!("v100".parse::<GpuKind>().is_err());
    }
}
