//! `stral bench`: flags → [`benches::bench::BenchConfig`], then run and print the summary.

use std::path::PathBuf;
use std::time::Duration;

use benches::bench::client::Endpoint;
use benches::bench::metrics::Slo;
use benches::bench::workload::{ChatConfig, EditConfig, FixedConfig, KeystrokeConfig, Workload};
use benches::bench::{BenchConfig, Load, PlotFormats};
use clap::{Args, ValueEnum};

/// `stral bench --help` text above the options.
pub const LONG_ABOUT: &str = "Load-test a Mistral- or OpenAI-compatible server (stral, vLLM, ...) over plain HTTP \
with streaming requests, and report TTFT, TPOT, ITL and E2E latency (mean, p50/p90/p95/p99), \
request and token throughput, goodput under an SLO, and cancelled/failed counts.\n\n\
Metrics follow vLLM's `bench serve`: TTFT = send -> first content chunk; TPOT = (E2E - TTFT) / \
(output tokens - 1) per request; ITL = gaps between successive content chunks; E2E = send -> end \
of stream. Output tokens come from the server's usage (else counted chunks; the JSON says which).\n\n\
Examples:\n  stral bench --workload keystroke --concurrency 8 --duration 60\n  \
stral bench --workload edit --concurrency 1 --num-requests 20   # predicted outputs: speculative decoding\n  \
stral bench --workload fixed --input-tokens 512 --output-tokens 128 --rate 4 --num-requests 200 --json-out r.json\n  \
stral bench --url http://gpu-box:8000 --endpoint completions --model codestral --workload chat \
--sweep-concurrency 1,4,16,64 --duration 60 --plot-dir plots";

#[derive(Args)]
pub struct BenchArgs {
    /// Server base URL (plain http; the API paths are appended).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "STRAL_BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// API to call: `fim` = POST /v1/fim/completions (Mistral), `chat` =
    /// /v1/chat/completions, `completions` = /v1/completions (OpenAI legacy; FIM via
    /// `suffix`). Default: `chat` for the edit workload, `fim` otherwise.
    #[arg(long, value_enum)]
    endpoint: Option<EndpointArg>,
    /// Model name to send. Default: the first model the server's /v1/models lists.
    #[arg(long)]
    model: Option<String>,
    /// What to send: `keystroke` = simulated developers typing through code files, a
    /// FIM request every few keystrokes, the stale request cancelled when the next
    /// fires; `chat` = lognormal prompt/output lengths (synthetic, ShareGPT-like);
    /// `fixed` = --input-tokens in, exactly --output-tokens out; `edit` = chat requests
    /// asking for an edit of whole lines of a corpus code file, the original lines sent
    /// as `prediction` (predicted outputs, for speculative decoding; the report counts
    /// the accepted and rejected prediction tokens the server's usage reports).
    #[arg(long, value_enum, default_value_t = WorkloadArg::Keystroke)]
    workload: WorkloadArg,

    /// Closed loop: requests in flight at once (for `keystroke`: the number of
    /// developers). Default 4 unless --rate is given.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second, regardless of how
    /// fast the server answers (not for `keystroke`).
    #[arg(long)]
    rate: Option<f64>,
    /// Run once per closed-loop concurrency level, e.g. 1,4,16,64, and plot throughput
    /// and latency against concurrency.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["rate", "concurrency"])]
    sweep_concurrency: Vec<usize>,
    /// Stop sending after this many seconds (per level); requests in flight finish.
    /// Default 30 when --num-requests is not given.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop sending after this many requests (per level).
    #[arg(long)]
    num_requests: Option<u64>,
    /// Seed for prompts, lengths, arrivals and typing; the same seed sends the same
    /// requests.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature sent with every request.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Give up on a request after this many seconds (counted as failed).
    #[arg(long, default_value_t = 300.0)]
    request_timeout: f64,

    /// SLO on time to first token, ms (enables goodput).
    #[arg(long)]
    slo_ttft_ms: Option<f64>,
    /// SLO on time per output token, ms (enables goodput).
    #[arg(long)]
    slo_tpot_ms: Option<f64>,
    /// SLO on end-to-end latency, ms (enables goodput).
    #[arg(long)]
    slo_e2e_ms: Option<f64>,

    /// keystroke: a FIM request every this many keystrokes.
    #[arg(long, default_value_t = 3)]
    keystrokes_per_request: u32,
    /// keystroke: mean time between keystrokes, ms (uniform in 0.5x..1.5x).
    #[arg(long, default_value_t = 150.0)]
    keystroke_ms: f64,
    /// keystroke: mean pause after each line typed, ms (exponential; 0 = none).
    #[arg(long, default_value_t = 1000.0)]
    think_ms: f64,
    /// keystroke: keep at most this many characters of prefix before the cursor.
    #[arg(long, default_value_t = 6000)]
    max_prefix_chars: usize,
    /// keystroke: keep at most this many characters of suffix after the cursor.
    #[arg(long, default_value_t = 2000)]
    max_suffix_chars: usize,
    /// keystroke: max_tokens of each completion.
    #[arg(long, default_value_t = 64)]
    fim_max_tokens: u32,

    /// chat: median prompt length, tokens.
    #[arg(long, default_value_t = 128.0)]
    chat_input_median: f64,
    /// chat: lognormal sigma of the prompt length.
    #[arg(long, default_value_t = 1.0)]
    chat_input_sigma: f64,
    /// chat: median output length, tokens.
    #[arg(long, default_value_t = 128.0)]
    chat_output_median: f64,
    /// chat: lognormal sigma of the output length.
    #[arg(long, default_value_t = 0.8)]
    chat_output_sigma: f64,
    /// chat: longest prompt, tokens.
    #[arg(long, default_value_t = 4096)]
    chat_max_input: u32,
    /// chat: longest output, tokens.
    #[arg(long, default_value_t = 1024)]
    chat_max_output: u32,

    /// edit: the code to edit, at most this many characters of whole lines.
    #[arg(long, default_value_t = 1200)]
    edit_max_code_chars: usize,
    /// edit: max_tokens of each edit.
    #[arg(long, default_value_t = 512)]
    edit_max_tokens: u32,

    /// fixed: prompt length, tokens (approximate: one common word per token; the JSON
    /// has the server's own count).
    #[arg(long, default_value_t = 128)]
    input_tokens: u32,
    /// fixed: output length, tokens (sent as max_tokens and min_tokens).
    #[arg(long, default_value_t = 128)]
    output_tokens: u32,

    /// Write the results as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Write plots (latency CDFs; with --sweep-concurrency, throughput and latency vs
    /// concurrency) into this directory.
    #[arg(long)]
    plot_dir: Option<PathBuf>,
    /// Plot file format.
    #[arg(long, value_enum, default_value_t = PlotFormatArg::Both)]
    plot_format: PlotFormatArg,
    /// No progress bar (it is drawn on stderr, and only on a terminal).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum EndpointArg {
    Fim,
    Chat,
    Completions,
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkloadArg {
    Keystroke,
    Chat,
    Fixed,
    Edit,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlotFormatArg {
    Svg,
    Png,
    Both,
}

impl BenchArgs {
    pub fn into_config(self) -> anyhow::Result<BenchConfig> {
        let positive = |name: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(anyhow::anyhow!(
                    "--{name} must be a positive number, got {v}"
                ))
            }
        };
        let duration = match (self.duration, self.num_requests) {
            (Some(d), _) => Some(Duration::from_secs_f64(positive("duration", d)?)),
            (None, None) => Some(Duration::from_secs(30)),
            (None, Some(_)) => None,
        };
        let load = match (self.rate, self.concurrency) {
            (Some(r), _) => Load::Open {
                rate: positive("rate", r)?,
            },
            (None, c) => Load::Closed {
                concurrency: c.unwrap_or(4),
            },
        };
        let workload = match self.workload {
            WorkloadArg::Keystroke => Workload::Keystroke(KeystrokeConfig {
                keystrokes_per_request: self.keystrokes_per_request,
                keystroke_ms: positive("keystroke-ms", self.keystroke_ms)?,
                think_ms: self.think_ms.max(0.0),
                max_prefix_chars: self.max_prefix_chars,
                max_suffix_chars: self.max_suffix_chars,
                max_tokens: self.fim_max_tokens,
            }),
            WorkloadArg::Chat => Workload::Chat(ChatConfig {
                input_median: positive("chat-input-median", self.chat_input_median)?,
                input_sigma: self.chat_input_sigma.max(0.0),
                output_median: positive("chat-output-median", self.chat_output_median)?,
                output_sigma: self.chat_output_sigma.max(0.0),
                max_input_tokens: self.chat_max_input,
                max_output_tokens: self.chat_max_output,
            }),
            WorkloadArg::Fixed => Workload::Fixed(FixedConfig {
                input_tokens: self.input_tokens,
                output_tokens: self.output_tokens,
            }),
            WorkloadArg::Edit => Workload::Edit(EditConfig {
                max_code_chars: self.edit_max_code_chars,
                max_tokens: self.edit_max_tokens,
            }),
        };
        let endpoint = match (self.endpoint, self.workload) {
            (Some(e), _) => e,
            (None, WorkloadArg::Edit) => EndpointArg::Chat,
            (None, _) => EndpointArg::Fim,
        };
        Ok(BenchConfig {
            url: self.url,
            api_key: self.api_key,
            endpoint: match endpoint {
                EndpointArg::Fim => Endpoint::Fim,
                EndpointArg::Chat => Endpoint::Chat,
                EndpointArg::Completions => Endpoint::Completions,
            },
            model: self.model,
            workload,
            load,
            sweep_concurrency: self.sweep_concurrency,
            duration,
            num_requests: self.num_requests,
            seed: self.seed,
            temperature: self.temperature,
            slo: Slo {
                ttft_ms: self.slo_ttft_ms,
                tpot_ms: self.slo_tpot_ms,
                e2e_ms: self.slo_e2e_ms,
            },
            request_timeout: Duration::from_secs_f64(positive(
                "request-timeout",
                self.request_timeout,
            )?),
            progress: !self.no_progress,
            json_out: self.json_out,
            plot_dir: self.plot_dir,
            plot_formats: match self.plot_format {
                PlotFormatArg::Svg => PlotFormats {
                    svg: true,
                    png: false,
                },
                PlotFormatArg::Png => PlotFormats {
                    svg: false,
                    png: true,
                },
                PlotFormatArg::Both => PlotFormats {
                    svg: true,
                    png: true,
                },
            },
        })
    }
}

/// Runs the benchmark and prints the summary on stdout.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(benches::bench::run(&config))?;
    print!("{}", report.summary());
    Ok(())
}
