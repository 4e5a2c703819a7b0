//! What `stral bench` sends: the four workloads and the seeded generators behind them.
//!
//! - [`KeystrokeSession`]: one simulated developer typing through a file of the committed
//!   corpus (`benches/corpus/`, embedded in the binary), one character per keystroke,
//!   with a FIM request every few keystrokes, and a think pause after each line. The
//!   runner cancels the previous request when the next one fires. The developer writes
//!   the current line anew at the end of it, so the prefix is the text before the cursor
//!   and the suffix the file after the current line (the line's untyped rest does not
//!   exist yet), both cut to a character budget. Within a line the suffix stays the same
//!   and the prefix only grows — which matters: Mistral's FIM prompt puts the suffix
//!   first, so a suffix that changed on every keystroke would defeat prefix caching.
//! - [`ChatLengths`]: prompt and output lengths drawn from lognormal distributions — a
//!   synthetic ShareGPT-like shape (long right tail; defaults: median prompt 128 tokens,
//!   median output 128 tokens), not ShareGPT data.
//! - Fixed: the same prompt and output length for every request.
//! - [`EditConfig`] (`edit`): chat requests asking for an edit of a window of whole
//!   lines of a corpus file (rename, comment, reformat…) quoted in a fenced code block,
//!   that block itself sent as `prediction` (predicted outputs): an edit rewrites most
//!   of its input unchanged, so a server that speculates from the prediction accepts
//!   most of it.
//!
//! Prompts of a given token length are made of common English words that are one token
//! each in the Codestral v3 vocabulary (with their leading space), so `n` words ≈ `n`
//! tokens; the report carries the server's own `usage.prompt_tokens` where it sends it.
//! Output lengths are enforced with `max_tokens` and `min_tokens` (servers that honour
//! `min_tokens`, as stral and vLLM do, then return exactly that many tokens).
//!
//! Invariants: everything is a pure function of the seed — request `i` of a chat/fixed
//! run and the `k`-th request of developer `d` are the same on every run with the same
//! flags, whatever the timing. Cost: O(prompt length) per request.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal};
use serde::{Deserialize, Serialize};

/// One file of the keystroke corpus.
#[derive(Debug, Clone, Copy)]
pub struct CorpusFile {
    pub name: &'static str,
    pub text: &'static str,
}

/// The committed corpus (`benches/corpus/`, Apache-2.0, written for this project).
pub const CORPUS: &[CorpusFile] = &[
    CorpusFile {
        name: "lru_cache.rs",
        text: include_str!("../../corpus/lru_cache.rs"),
    },
    CorpusFile {
        name: "rate_limiter.py",
        text: include_str!("../../corpus/rate_limiter.py"),
    },
    CorpusFile {
        name: "event_bus.ts",
        text: include_str!("../../corpus/event_bus.ts"),
    },
    CorpusFile {
        name: "worker_pool.go",
        text: include_str!("../../corpus/worker_pool.go"),
    },
    CorpusFile {
        name: "ring_buffer.c",
        text: include_str!("../../corpus/ring_buffer.c"),
    },
];

/// A request before it is shaped for an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    pub prompt: String,
    /// FIM suffix (keystroke workload only).
    pub suffix: Option<String>,
    pub max_tokens: u32,
    /// Sent when set, to make the output length exact.
    pub min_tokens: Option<u32>,
    /// The predicted output, sent as `prediction` (edit workload only).
    pub prediction: Option<String>,
}

/// Keystroke workload settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeystrokeConfig {
    /// A FIM request fires every this many keystrokes.
    pub keystrokes_per_request: u32,
    /// Mean gap between keystrokes (uniform in [0.5, 1.5] × this).
    pub keystroke_ms: f64,
    /// Mean pause after typing a newline (exponential).
    pub think_ms: f64,
    /// The prefix keeps at most this many characters before the cursor.
    pub max_prefix_chars: usize,
    /// The suffix keeps at most this many characters after the cursor.
    pub max_suffix_chars: usize,
    /// Completion length cap (no `min_tokens`: completions stop where the model stops).
    pub max_tokens: u32,
}

impl Default for KeystrokeConfig {
    fn default() -> Self {
        KeystrokeConfig {
            keystrokes_per_request: 3,
            keystroke_ms: 150.0,
            think_ms: 1000.0,
            max_prefix_chars: 6000,
            max_suffix_chars: 2000,
            max_tokens: 64,
        }
    }
}

/// Chat workload settings: lognormal lengths, `median · exp(σ·N(0,1))`, clamped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatConfig {
    pub input_median: f64,
    pub input_sigma: f64,
    pub output_median: f64,
    pub output_sigma: f64,
    pub max_input_tokens: u32,
    pub max_output_tokens: u32,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            input_median: 128.0,
            input_sigma: 1.0,
            output_median: 128.0,
            output_sigma: 0.8,
            max_input_tokens: 4096,
            max_output_tokens: 1024,
        }
    }
}

/// Fixed workload settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FixedConfig {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

impl Default for FixedConfig {
    fn default() -> Self {
        FixedConfig {
            input_tokens: 128,
            output_tokens: 128,
        }
    }
}

/// Edit workload settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EditConfig {
    /// The code to edit: whole lines of a corpus file, at most this many characters
    /// (at least one line).
    pub max_code_chars: usize,
    /// Completion length cap (no `min_tokens`: an edit ends where the model ends it).
    pub max_tokens: u32,
}

impl Default for EditConfig {
    fn default() -> Self {
        EditConfig {
            max_code_chars: 1200,
            max_tokens: 512,
        }
    }
}

/// What an edit request asks for; the code follows.
const EDIT_INSTRUCTIONS: &[&str] = &[
    "Rename the variables in this code to longer, more descriptive names. Reply with the whole edited code only.",
    "Add a short comment above each function in this code. Reply with the whole edited code only.",
    "Fix any typos in the comments of this code and keep everything else as it is. Reply with the whole code only.",
    "Reformat this code to the usual style of its language. Reply with the whole edited code only.",
    "Make the error handling in this code more explicit. Reply with the whole edited code only.",
];

/// Which workload a run sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    Keystroke(KeystrokeConfig),
    Chat(ChatConfig),
    Fixed(FixedConfig),
    Edit(EditConfig),
}

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Keystroke(_) => "keystroke",
            Workload::Chat(_) => "chat",
            Workload::Fixed(_) => "fixed",
            Workload::Edit(_) => "edit",
        }
    }

    /// Request `index` of a chat or fixed run (keystroke requests come from sessions).
    pub fn request(&self, seed: u64, index: u64) -> RequestSpec {
        let mut rng = rng_for(seed, index);
        match self {
            Workload::Fixed(f) => RequestSpec {
                prompt: words(&mut rng, f.input_tokens as usize),
                suffix: None,
                max_tokens: f.output_tokens,
                min_tokens: Some(f.output_tokens),
                prediction: None,
            },
            Workload::Chat(c) => {
                let (input, output) = ChatLengths::new(c).sample(&mut rng);
                RequestSpec {
                    prompt: words(&mut rng, input as usize),
                    suffix: None,
                    max_tokens: output,
                    min_tokens: Some(output),
                    prediction: None,
                }
            }
            Workload::Edit(e) => edit_request(e, &mut rng),
            // Keystroke runs draw from one session per developer; request `index` on
            // its own is developer `index`'s first request.
            Workload::Keystroke(k) => {
                KeystrokeSession::new(k.clone(), seed, index)
                    .next_request()
                    .1
            }
        }
    }
}

/// Independent, reproducible stream `index` of a run seeded with `seed`.
pub fn rng_for(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// The lognormal length distributions of the chat workload.
pub struct ChatLengths {
    input: LogNormal<f64>,
    output: LogNormal<f64>,
    max_input: u32,
    max_output: u32,
}

impl ChatLengths {
    pub fn new(c: &ChatConfig) -> ChatLengths {
        let ln = |median: f64, sigma: f64| {
            LogNormal::new(median.max(1.0).ln(), sigma.max(0.0)).expect("finite lognormal")
        };
        ChatLengths {
            input: ln(c.input_median, c.input_sigma),
            output: ln(c.output_median, c.output_sigma),
            max_input: c.max_input_tokens.max(1),
            max_output: c.max_output_tokens.max(1),
        }
    }

    /// `(prompt tokens, output tokens)`, each at least 1.
    pub fn sample(&self, rng: &mut impl Rng) -> (u32, u32) {
        let clamp = |x: f64, max: u32| (x.round() as u32).clamp(1, max);
        (
            clamp(self.input.sample(rng), self.max_input),
            clamp(self.output.sample(rng), self.max_output),
        )
    }
}

/// Common English words that are one token each (with their leading space) in the
/// Codestral v3 vocabulary.
const WORDS: &[&str] = &[
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " with", " was",
    " on", " be", " at", " by", " this", " had", " not", " are", " but", " from", " or", " have",
    " an", " they", " which", " one", " you", " were", " all", " we", " her", " she", " there",
    " would", " their", " will", " when", " who", " him", " been", " has", " more", " if", " no",
    " out", " so", " said", " what", " up", " its", " about", " into", " than", " them", " can",
    " only", " other", " new", " some", " could", " time", " these", " two", " may", " then",
    " do", " first", " any", " my", " now", " such", " like", " our", " over", " me", " even",
    " most", " made", " after", " also", " did", " many", " before", " must", " through", " back",
    " where", " much", " your", " way", " well", " down", " should", " because", " each", " just",
    " those", " people", " how", " too", " little", " good", " very", " make", " world", " still",
    " own", " see", " work", " long", " get", " here", " between",
];

/// About `n` tokens of text: `n` random words.
pub fn words(rng: &mut impl Rng, n: usize) -> String {
    let mut s = String::with_capacity(n * 5);
    for _ in 0..n {
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

/// Gaps of a Poisson arrival process with `rate` requests per second.
pub struct PoissonArrivals {
    rng: ChaCha8Rng,
    gap: Exp<f64>,
}

impl PoissonArrivals {
    /// `rate` must be positive and finite.
    pub fn new(rate: f64, seed: u64) -> PoissonArrivals {
        PoissonArrivals {
            rng: rng_for(seed, u64::MAX),
            gap: Exp::new(rate).expect("positive finite rate"),
        }
    }

    /// The time from the previous arrival to the next one.
    pub fn next_gap(&mut self) -> Duration {
        Duration::from_secs_f64(self.gap.sample(&mut self.rng))
    }
}

/// One simulated developer typing through corpus files, one character per keystroke.
pub struct KeystrokeSession {
    config: KeystrokeConfig,
    rng: ChaCha8Rng,
    file: usize,
    /// Byte offset of the cursor (always a char boundary).
    cursor: usize,
    think: Option<Exp<f64>>,
}

impl KeystrokeSession {
    /// Developer `developer` of a run seeded with `seed`: starts at the beginning of a
    /// random line of a random file.
    pub fn new(config: KeystrokeConfig, seed: u64, developer: u64) -> KeystrokeSession {
        let mut rng = rng_for(seed, developer);
        let file = rng.random_range(0..CORPUS.len());
        let text = CORPUS[file].text;
        let line_starts: Vec<usize> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .filter(|&i| i < text.len())
            .collect();
        let cursor = line_starts[rng.random_range(0..line_starts.len())];
        let think = (config.think_ms > 0.0).then(|| Exp::new(1.0 / config.think_ms).unwrap());
        KeystrokeSession {
            config,
            rng,
            file,
            cursor,
            think,
        }
    }

    /// Types the next few keystrokes; returns how long that took (keystroke gaps and
    /// think pauses) and the FIM request to fire at the new cursor.
    pub fn next_request(&mut self) -> (Duration, RequestSpec) {
        let mut ms = 0.0;
        for _ in 0..self.config.keystrokes_per_request.max(1) {
            ms += self.config.keystroke_ms * self.rng.random_range(0.5..1.5);
            let text = CORPUS[self.file].text;
            let Some(c) = text[self.cursor..].chars().next() else {
                self.file = (self.file + 1) % CORPUS.len();
                self.cursor = 0;
                continue;
            };
            self.cursor += c.len_utf8();
            if c == '\n' {
                if let Some(think) = &self.think {
                    ms += think.sample(&mut self.rng);
                }
            }
        }
        (Duration::from_secs_f64(ms / 1e3), self.request_at_cursor())
    }

    /// The corpus file being typed and the cursor's byte offset in it.
    pub fn position(&self) -> (&'static str, usize) {
        (CORPUS[self.file].name, self.cursor)
    }

    fn request_at_cursor(&self) -> RequestSpec {
        let text = CORPUS[self.file].text;
        let before = &text[..self.cursor];
        let line_end = text[self.cursor..]
            .find('\n')
            .map_or(text.len(), |i| self.cursor + i);
        let after = &text[line_end..];
        RequestSpec {
            prompt: last_chars(before, self.config.max_prefix_chars).to_string(),
            suffix: Some(first_chars(after, self.config.max_suffix_chars).to_string()),
            max_tokens: self.config.max_tokens,
            min_tokens: None,
            prediction: None,
        }
    }
}

/// An edit request: an instruction, then whole lines of a random corpus file from a
/// random line on (up to `max_code_chars`, at least one line) in a fenced block; the
/// block, as the answer would start and end, is the prediction.
fn edit_request(config: &EditConfig, rng: &mut impl Rng) -> RequestSpec {
    let file = CORPUS[rng.random_range(0..CORPUS.len())];
    let lines: Vec<&str> = file.text.split_inclusive('\n').collect();
    let first = rng.random_range(0..lines.len());
    let mut code = String::new();
    for line in &lines[first..] {
        if !code.is_empty() && code.len() + line.len() > config.max_code_chars {
            break;
        }
        code.push_str(line);
    }
    let instruction = EDIT_INSTRUCTIONS[rng.random_range(0..EDIT_INSTRUCTIONS.len())];
    let block = format!("```{}\n{code}```", file.name);
    RequestSpec {
        prompt: format!("{instruction}\n\n{block}"),
        suffix: None,
        max_tokens: config.max_tokens,
        min_tokens: None,
        prediction: Some(block),
    }
}

fn last_chars(s: &str, n: usize) -> &str {
    match s.char_indices().rev().nth(n.saturating_sub(1)) {
        Some((i, _)) if n > 0 => &s[i..],
        _ if n == 0 => "",
        _ => s,
    }
}

fn first_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_have_the_requested_mean_rate() {
        for rate in [0.5, 8.0, 200.0] {
            let mut a = PoissonArrivals::new(rate, 42);
            let n = 20_000;
            let total: f64 = (0..n).map(|_| a.next_gap().as_secs_f64()).sum();
            let measured = n as f64 / total;
            // The mean of 20k exponential gaps has a relative sd of 1/sqrt(20k) ≈ 0.7 %.
            assert!(
                (measured / rate - 1.0).abs() < 0.03,
                "rate {rate}: measured {measured}"
            );
        }
    }

    #[test]
    fn poisson_gaps_are_memoryless_not_evenly_spaced() {
        // Exponential gaps: about 1 − e^{-1} ≈ 63 % are shorter than the mean.
        let mut a = PoissonArrivals::new(10.0, 7);
        let short = (0..10_000)
            .filter(|_| a.next_gap().as_secs_f64() < 0.1)
            .count();
        assert!((6000..6650).contains(&short), "{short}");
    }

    #[test]
    fn requests_are_a_pure_function_of_seed_and_index() {
        let w = Workload::Chat(ChatConfig::default());
        assert_eq!(w.request(1, 5), w.request(1, 5));
        assert_ne!(w.request(1, 5), w.request(1, 6));
        assert_ne!(w.request(1, 5), w.request(2, 5));
    }

    #[test]
    fn fixed_requests_ask_for_exact_lengths() {
        let w = Workload::Fixed(FixedConfig {
            input_tokens: 50,
            output_tokens: 7,
        });
        let r = w.request(0, 0);
        assert_eq!(r.prompt.split(' ').filter(|w| !w.is_empty()).count(), 50);
        assert_eq!((r.max_tokens, r.min_tokens), (7, Some(7)));
        assert_eq!(r.suffix, None);
    }

    #[test]
    fn chat_lengths_follow_the_configured_medians() {
        let c = ChatConfig::default();
        let lengths = ChatLengths::new(&c);
        let mut rng = rng_for(3, 0);
        let mut inputs: Vec<u32> = Vec::new();
        let mut outputs: Vec<u32> = Vec::new();
        for _ in 0..4000 {
            let (i, o) = lengths.sample(&mut rng);
            assert!(
                (1..=c.max_input_tokens).contains(&i) && (1..=c.max_output_tokens).contains(&o)
            );
            inputs.push(i);
            outputs.push(o);
        }
        inputs.sort();
        outputs.sort();
        let (mi, mo) = (inputs[2000] as f64, outputs[2000] as f64);
        assert!((mi / 128.0 - 1.0).abs() < 0.1, "input median {mi}");
        assert!((mo / 128.0 - 1.0).abs() < 0.1, "output median {mo}");
        // A long right tail: the 99th percentile is several times the median.
        assert!(inputs[3960] as f64 > 5.0 * mi);
    }

    #[test]
    fn keystroke_session_grows_the_prefix_and_keeps_the_suffix_within_a_line() {
        let cfg = KeystrokeConfig {
            max_prefix_chars: usize::MAX,
            max_suffix_chars: usize::MAX,
            ..KeystrokeConfig::default()
        };
        let mut s = KeystrokeSession::new(cfg.clone(), 9, 0);
        let (file, _) = s.position();
        let text = CORPUS.iter().find(|f| f.name == file).unwrap().text;
        let mut last = 0;
        let mut previous: Option<(String, String)> = None;
        let mut same_line = 0;
        for _ in 0..20 {
            let (wait, r) = s.next_request();
            if s.position().0 != file {
                break;
            }
            // Three keystrokes at 75–225 ms each, plus any think pauses.
            assert!(wait >= Duration::from_millis(225), "{wait:?}");
            let suffix = r.suffix.unwrap();
            // prefix + the untyped rest of the current line + suffix = the file.
            let rest_of_line = &text[r.prompt.len()..text.len() - suffix.len()];
            assert_eq!(format!("{}{rest_of_line}{suffix}", r.prompt), text);
            assert!(!rest_of_line.contains('\n'), "{rest_of_line:?}");
            assert!(suffix.is_empty() || suffix.starts_with('\n'));
            if let Some((prev_prompt, prev_suffix)) = &previous {
                // Typed since the last request without finishing the line: same suffix.
                let typed = &r.prompt[prev_prompt.len()..];
                assert!(r.prompt.starts_with(prev_prompt.as_str()));
                if !typed.contains('\n') {
                    assert_eq!(prev_suffix, &suffix, "suffix changed within a line");
                    same_line += 1;
                }
            }
            previous = Some((r.prompt.clone(), suffix));
            assert!(r.prompt.chars().count() > last);
            last = r.prompt.chars().count();
            assert_eq!(r.min_tokens, None);
        }
        assert!(same_line >= 5, "only {same_line} same-line pairs seen");
    }

    #[test]
    fn keystroke_prompts_respect_the_character_budget() {
        let cfg = KeystrokeConfig {
            max_prefix_chars: 40,
            max_suffix_chars: 10,
            ..KeystrokeConfig::default()
        };
        let mut s = KeystrokeSession::new(cfg, 1, 3);
        for _ in 0..200 {
            let (_, r) = s.next_request();
            assert!(r.prompt.chars().count() <= 40);
            assert!(r.suffix.unwrap().chars().count() <= 10);
        }
    }

    #[test]
    fn edit_requests_predict_the_whole_lines_of_corpus_code_they_quote() {
        let w = Workload::Edit(EditConfig::default());
        for i in 0..50 {
            let r = w.request(4, i);
            assert_eq!(r, w.request(4, i));
            let block = r.prediction.clone().unwrap();
            assert!(r.prompt.ends_with(&format!("\n\n{block}")), "{}", r.prompt);
            let (name, code) = block[3..].split_once('\n').unwrap();
            let code = code.strip_suffix("```").unwrap();
            assert!(!code.is_empty() && code.ends_with('\n'), "{code:?}");
            assert!(
                code.len() <= 1200 || code.lines().count() == 1,
                "{} chars",
                code.len()
            );
            let file = CORPUS.iter().find(|f| f.name == name).unwrap();
            assert!(file.text.contains(code));
            assert_eq!((r.max_tokens, r.min_tokens, r.suffix), (512, None, None));
        }
        assert_ne!(w.request(4, 0), w.request(4, 1));
    }

    #[test]
    fn char_budget_helpers_cut_at_character_boundaries() {
        assert_eq!(last_chars("héllo", 3), "llo");
        assert_eq!(last_chars("héllo", 4), "éllo");
        assert_eq!(last_chars("hi", 5), "hi");
        assert_eq!(last_chars("hi", 0), "");
        assert_eq!(first_chars("héllo", 2), "hé");
        assert_eq!(first_chars("hi", 5), "hi");
    }
}
