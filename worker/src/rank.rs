//! [`Rank`]: one tensor-parallel rank's per-step state over a [`Backend`] — the
//! mirror of every live sequence (block table, cached-token count, sampler), the
//! plan checks, and rank 0's sampling. There is one step path for every backend.
//!
//! Invariants:
//! - A plan is checked completely ([`check_plan`]: ids, positions, block ranges and
//!   coverage, vocabulary, sampling parameters, and the step sizes `Init` set up)
//!   before anything runs; a rejected plan changes nothing. The checks depend only
//!   on the plan, the mirrored state and the model, which are the same on every
//!   rank, so all ranks reject the same plans without talking to each other.
//! - A failure after the checks (a dead or hung peer, a panic) marks the rank
//!   failed: it refuses every plan until the next `Init`.
//! - Speculative entries (`num_drafts > 0`): the forward pass returns logits at all
//!   `1 + num_drafts` positions and rank 0 verifies the drafts
//!   ([`SeqSampler::verify`]); only rank 0 learns how many were accepted, so every
//!   rank keeps `cached` at the committed tokens and accepts a next `position_start`
//!   up to `num_drafts` beyond it, and applies the plan's table cuts (`truncated`)
//!   after `freed`.
//!
//! Costs per step besides the forward pass: O(Σ block-table lengths) to check and
//! (for backends that compute) build the attention metadata, O(vocab) per sampled
//! sequence on rank 0 (rows sampled in parallel).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use proto::v1::{SampledToken, ScheduledSeq, StepPlan, TokenLogprob};
use rayon::prelude::*;

use crate::backend::{Backend, Logits, Step};
use crate::model::SeqChunk;
use crate::sampler::{SamplingParams, SeqSampler};
use crate::{sim, WorkerError};

/// What a rank was set up for: the model's limits and the step sizes of `Init` (not
/// the coordinator's request limits).
#[derive(Clone, Copy, Debug)]
pub struct RankLimits {
    /// KV blocks the coordinator may use (ids below this).
    pub num_blocks: usize,
    pub block_size: usize,
    pub vocab: usize,
    /// The model's context length (tokens per sequence).
    pub max_context: usize,
    pub sliding_window: Option<u32>,
    /// Most new tokens in one step (`InitRequest.max_num_batched_tokens`).
    pub max_tokens: usize,
    /// Most sequences in one step (`InitRequest.max_num_seqs`).
    pub max_seqs: usize,
}

/// One rank: its backend and mirrored sequences.
pub struct Rank {
    backend: Box<dyn Backend>,
    rank: u32,
    limits: RankLimits,
    seqs: HashMap<u64, SeqState>,
    /// Why this rank can no longer run steps (the group is out of step).
    failed: Option<String>,
    /// Let the backend answer a step whose sampled rows are all greedy with their
    /// argmax only ([`Step::argmax_only`]); `STRAL_BACKEND_ARGMAX=0` turns it off.
    backend_argmax: bool,
}

/// Whether greedy steps may take the backend's argmax instead of logit rows: on
/// unless `STRAL_BACKEND_ARGMAX=0` (read once per `Init`; every rank of a group must
/// see the same value, as they share the collective's message sizes).
pub fn backend_argmax_enabled() -> bool {
    std::env::var("STRAL_BACKEND_ARGMAX").map_or(true, |v| v.trim() != "0")
}

/// What a worker mirrors of one sequence.
struct SeqState {
    block_table: Vec<u32>,
    /// Tokens in the KV cache (committed ones: drafts not counted).
    cached: usize,
    /// Drafts of its last step: the next position may be up to this many past
    /// `cached` (the accepted ones, which only rank 0 saw).
    draft_slack: usize,
    sampler: SeqSampler,
}

/// One scheduled sequence after its checks: what the step will run.
struct Checked<'a, 'p> {
    seq: &'p ScheduledSeq,
    /// The block table including this step's new blocks.
    block_table: Cow<'a, [u32]>,
    cached: usize,
    /// Set when the sequence starts (first appearance, reset, or freed and reused).
    fresh: Option<SeqSampler>,
}

/// What a checked sequence changes in the mirror once its step ran (owned, so the
/// mirror can be updated).
struct Commit<'p> {
    seq: &'p ScheduledSeq,
    /// The new block table, when it changed.
    table: Option<Vec<u32>>,
    /// Tokens cached after the step.
    cached: usize,
    fresh: Option<SeqSampler>,
}

impl<'p> Commit<'p> {
    fn from_checked(checked: Vec<Checked<'_, 'p>>) -> Vec<Self> {
        checked
            .into_iter()
            .map(|c| Commit {
                table: match (c.block_table, &c.fresh) {
                    (Cow::Owned(t), _) => Some(t),
                    (Cow::Borrowed(t), Some(_)) => Some(t.to_vec()),
                    (Cow::Borrowed(_), None) => None,
                },
                cached: c.cached + c.seq.tokens.len() - c.seq.num_drafts as usize,
                seq: c.seq,
                fresh: c.fresh,
            })
            .collect()
    }
}

impl Rank {
    pub fn new(backend: Box<dyn Backend>, rank: u32, limits: RankLimits) -> Self {
        Self {
            backend,
            rank,
            limits,
            seqs: HashMap::new(),
            failed: None,
            backend_argmax: backend_argmax_enabled(),
        }
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The `Health` detail of a ready rank.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Why the rank refuses steps, once it failed.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub fn fail(&mut self, why: String) {
        tracing::error!(rank = self.rank, error = %why, "worker group broken");
        self.failed.get_or_insert(why);
    }

    /// Checks, runs and commits one plan; rank 0 returns a token per sampled sequence.
    pub fn step(&mut self, plan: &StepPlan) -> Result<Vec<SampledToken>, WorkerError> {
        self.run(plan, true)
    }

    /// [`Rank::step`] for a start-up profiling plan ([`crate::profile`]): the same
    /// path, without the test-only crash hook (its tokens are not a request's).
    pub(crate) fn scratch_step(&mut self, plan: &StepPlan) -> Result<(), WorkerError> {
        self.run(plan, false).map(drop)
    }

    /// Forgets every mirrored sequence, as if no plan had run (after profiling: the
    /// coordinator has not handed out a block yet, so none is in use).
    pub(crate) fn forget_sequences(&mut self) {
        self.seqs.clear();
    }

    /// What `Init` set this rank up for.
    pub fn limits(&self) -> RankLimits {
        self.limits
    }

    /// The backend's own step time for `work` in ms, when it models one instead of
    /// being measured ([`Backend::modelled_step_ms`]).
    pub(crate) fn modelled_step_ms(&self, work: &[sim::SeqWork]) -> Option<f64> {
        self.backend.modelled_step_ms(work)
    }

    fn run(&mut self, plan: &StepPlan, fault_hook: bool) -> Result<Vec<SampledToken>, WorkerError> {
        if let Some(why) = &self.failed {
            return Err(WorkerError::Collective(format!(
                "the worker group is broken ({why}); re-Init it"
            )));
        }
        let started = std::time::Instant::now();
        let lim = self.limits;
        let freed: HashSet<u64> = plan.freed.iter().copied().collect();
        let checked = check_plan(&self.seqs, &freed, lim, plan)?;
        if fault_hook {
            crate::fault::crash_if_fed(checked.iter().map(|c| c.seq.tokens.as_slice()));
        }
        let step = Step::new(
            checked
                .iter()
                .map(|c| SeqChunk {
                    block_table: &c.block_table,
                    cached: c.cached,
                    tokens: &c.seq.tokens,
                    sample: c.seq.sample,
                })
                .collect(),
            lim.block_size,
            lim.sliding_window,
            started,
        );
        let drafts: Vec<usize> = checked.iter().map(|c| c.seq.num_drafts as usize).collect();
        let step = if drafts.iter().any(|&k| k > 0) {
            step.with_drafts(drafts)
        } else {
            step
        };
        // From the sampling parameters alone, which every rank holds alike.
        let argmax_only = self.backend_argmax
            && checked.iter().filter(|c| c.seq.sample).all(|c| {
                c.fresh
                    .as_ref()
                    .unwrap_or_else(|| &self.seqs[&c.seq.seq_id].sampler)
                    .argmax_suffices()
            });
        let step = step.with_argmax_only(argmax_only);
        self.backend.validate(&step)?;
        let logits = match self.backend.forward(&step) {
            Ok(l) => l,
            Err(e) => {
                drop(step);
                drop(checked);
                self.fail(e.to_string());
                return Err(e);
            }
        };
        drop(step);
        let sampled = self.commit(Commit::from_checked(checked), &freed, plan);
        let tokens = match logits {
            Some(logits) => sample_rows(&self.seqs, &sampled, &logits, lim.vocab)?,
            None if self.rank == 0 => sampled
                .iter()
                .map(|&(id, _)| SampledToken {
                    seq_id: id,
                    token_id: sim::pseudo_token(id, self.seqs[&id].cached),
                    logprob: None,
                    top_logprobs: Vec::new(),
                    accepted: 0,
                })
                .collect(),
            None => Vec::new(),
        };
        // Rank 0 counts every token it returned; the other ranks never sample, and
        // count one per step.
        let counts = tokens.iter().map(|t| (t.seq_id, 1 + t.accepted));
        let counts: Vec<(u64, u32)> = if self.rank == 0 {
            counts.collect()
        } else {
            sampled.iter().map(|&(id, _)| (id, 1)).collect()
        };
        for (id, n) in counts {
            if let Some(st) = self.seqs.get_mut(&id) {
                for _ in 0..n {
                    st.sampler.advance();
                }
            }
        }
        Ok(tokens)
    }

    /// The plan ran, so its diffs become the mirrored state; returns the sampled ids
    /// in plan order, each with its draft tokens.
    fn commit<'p>(
        &mut self,
        commits: Vec<Commit<'p>>,
        freed: &HashSet<u64>,
        plan: &StepPlan,
    ) -> Vec<(u64, &'p [u32])> {
        for id in freed {
            self.seqs.remove(id);
        }
        for cut in &plan.truncated {
            if let Some(st) = self.seqs.get_mut(&cut.seq_id) {
                st.block_table.truncate(cut.table_len as usize);
            }
        }
        let mut sampled = Vec::new();
        for Commit {
            seq,
            table,
            cached,
            fresh,
        } in commits
        {
            match fresh {
                Some(sampler) => {
                    self.seqs.insert(
                        seq.seq_id,
                        SeqState {
                            block_table: table.unwrap_or_default(),
                            cached,
                            draft_slack: seq.num_drafts as usize,
                            sampler,
                        },
                    );
                }
                None => {
                    let st = self.seqs.get_mut(&seq.seq_id).expect("checked: known");
                    if let Some(t) = table {
                        st.block_table = t;
                    }
                    st.cached = cached;
                    st.draft_slack = seq.num_drafts as usize;
                }
            }
            if seq.sample {
                let drafts = &seq.tokens[seq.tokens.len() - seq.num_drafts as usize..];
                sampled.push((seq.seq_id, drafts));
            }
        }
        sampled
    }
}

/// Rank 0: one token per sampled sequence (rows of `logits`: `1 + drafts` per
/// sequence, in `ids` order), after verifying its drafts, in parallel; the samplers
/// are not advanced.
fn sample_rows(
    seqs: &HashMap<u64, SeqState>,
    ids: &[(u64, &[u32])],
    logits: &Logits,
    vocab: usize,
) -> Result<Vec<SampledToken>, WorkerError> {
    let rows: usize = ids.iter().map(|(_, d)| 1 + d.len()).sum();
    let logits = match logits {
        Logits::Rows(l) => l,
        Logits::Argmax(a) => return greedy_tokens(ids, a, rows),
    };
    if logits.len() != rows * vocab {
        return Err(WorkerError::Step(format!(
            "internal: {} logits for {} sampled sequences ({rows} rows)",
            logits.len(),
            ids.len()
        )));
    }
    let mut spans = Vec::with_capacity(ids.len());
    let mut at = 0;
    for (_, d) in ids {
        spans.push(&logits[at * vocab..(at + 1 + d.len()) * vocab]);
        at += 1 + d.len();
    }
    Ok(ids
        .par_iter()
        .zip(spans.par_iter())
        .map(|(&(id, drafts), rows)| {
            let sampler = &seqs[&id].sampler;
            let mut out = if drafts.is_empty() {
                vec![sampler.peek(rows)]
            } else {
                sampler.clone().verify(rows, drafts)
            };
            let s = out.pop().expect("verification returns a token");
            SampledToken {
                seq_id: id,
                token_id: s.token,
                logprob: s.logprob,
                top_logprobs: s
                    .top_logprobs
                    .into_iter()
                    .map(|(token_id, logprob)| TokenLogprob { token_id, logprob })
                    .collect(),
                accepted: out.len() as u32,
            }
        })
        .collect())
}

/// [`sample_rows`] of an `argmax_only` step from each row's argmax: drafts are
/// accepted while each equals its row's argmax, then the next row's argmax follows
/// (what [`SeqSampler::verify`] does for a greedy sequence).
fn greedy_tokens(
    ids: &[(u64, &[u32])],
    argmax: &[u32],
    rows: usize,
) -> Result<Vec<SampledToken>, WorkerError> {
    if argmax.len() != rows {
        return Err(WorkerError::Step(format!(
            "internal: {} argmax ids for {} sampled sequences ({rows} rows)",
            argmax.len(),
            ids.len()
        )));
    }
    let mut at = 0;
    Ok(ids
        .iter()
        .map(|&(id, drafts)| {
            let row = &argmax[at..at + 1 + drafts.len()];
            at += row.len();
            let accepted = drafts.iter().zip(row).take_while(|(d, a)| d == a).count();
            SampledToken {
                seq_id: id,
                token_id: row[accepted],
                logprob: None,
                top_logprobs: Vec::new(),
                accepted: accepted as u32,
            }
        })
        .collect())
}

/// Checks every scheduled sequence against the mirrored state and the step sizes
/// `Init` set up, without changing anything.
fn check_plan<'a, 'p: 'a>(
    seqs: &'a HashMap<u64, SeqState>,
    freed: &HashSet<u64>,
    lim: RankLimits,
    plan: &'p StepPlan,
) -> Result<Vec<Checked<'a, 'p>>, WorkerError> {
    if plan.seqs.len() > lim.max_seqs {
        return Err(WorkerError::Step(format!(
            "{} sequences exceed this worker's max_num_seqs of {} (set at Init)",
            plan.seqs.len(),
            lim.max_seqs
        )));
    }
    let total: usize = plan.seqs.iter().map(|s| s.tokens.len()).sum();
    if total > lim.max_tokens {
        return Err(WorkerError::Step(format!(
            "{total} new tokens exceed this worker's max_num_batched_tokens of {} (set at Init)",
            lim.max_tokens
        )));
    }
    let mut seen = HashSet::with_capacity(plan.seqs.len());
    let mut out = Vec::with_capacity(plan.seqs.len());
    for s in &plan.seqs {
        let id = s.seq_id;
        let err = |m: String| WorkerError::Step(format!("seq {id}: {m}"));
        if !seen.insert(id) {
            return Err(err("scheduled twice in one step".into()));
        }
        if s.tokens.is_empty() {
            return Err(err("no new tokens".into()));
        }
        if s.num_drafts > 0 && !(s.sample && s.num_drafts as usize + 1 == s.tokens.len()) {
            return Err(err(format!(
                "{} drafts need one committed token before them and sample set",
                s.num_drafts
            )));
        }
        if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= lim.vocab) {
            return Err(err(format!(
                "token id {t} is outside the vocabulary of {}",
                lim.vocab
            )));
        }
        if let Some(b) = s.new_blocks.iter().find(|&&b| b as usize >= lim.num_blocks) {
            return Err(err(format!(
                "block {b} is outside the KV cache of {} blocks",
                lim.num_blocks
            )));
        }
        let known = if s.reset || freed.contains(&id) {
            None
        } else {
            seqs.get(&id)
        };
        let checked = match known {
            Some(st) => {
                let position = s.position_start as usize;
                if position < st.cached || position > st.cached + st.draft_slack {
                    return Err(err(format!(
                        "position_start {} but the worker has {} tokens cached (+{} drafts)",
                        s.position_start, st.cached, st.draft_slack
                    )));
                }
                let cut = plan
                    .truncated
                    .iter()
                    .find(|c| c.seq_id == id)
                    .map(|c| c.table_len as usize);
                if let Some(len) = cut.filter(|&len| len > st.block_table.len()) {
                    return Err(err(format!(
                        "a cut to {len} blocks of a table of {}",
                        st.block_table.len()
                    )));
                }
                let kept = &st.block_table[..cut.unwrap_or(st.block_table.len())];
                let block_table = if s.new_blocks.is_empty() && cut.is_none() {
                    Cow::Borrowed(kept)
                } else {
                    Cow::Owned([kept, &s.new_blocks[..]].concat())
                };
                Checked {
                    seq: s,
                    block_table,
                    cached: position,
                    fresh: None,
                }
            }
            None => {
                let params = s.sampling.as_ref().ok_or_else(|| {
                    err("no sampling params (required on a sequence's first appearance and with reset)".into())
                })?;
                let sampler = SeqSampler::new(SamplingParams::from(params), lim.vocab)
                    .map_err(|e| err(e.to_string()))?;
                Checked {
                    seq: s,
                    block_table: Cow::Borrowed(&s.new_blocks[..]),
                    cached: s.position_start as usize,
                    fresh: Some(sampler),
                }
            }
        };
        let ctx = checked.cached + s.tokens.len();
        if ctx > lim.max_context {
            return Err(err(format!(
                "context {ctx} exceeds the model's {}",
                lim.max_context
            )));
        }
        let blocks = checked.block_table.len();
        if blocks * lim.block_size < ctx {
            return Err(err(format!(
                "its {blocks} blocks hold {} tokens but the step needs {ctx}",
                blocks * lim.block_size
            )));
        }
        if blocks > ctx.div_ceil(lim.block_size) {
            return Err(err(format!(
                "its block table has {blocks} blocks but a context of {ctx} tokens needs only {}",
                ctx.div_ceil(lim.block_size)
            )));
        }
        out.push(checked);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greedy verification from argmax ids gives what the sampler gives from the rows.
    #[test]
    fn greedy_tokens_from_argmax_equal_the_samplers_verification_of_the_rows() {
        let vocab = 64;
        let sampler = SeqSampler::new(SamplingParams::default(), vocab).unwrap();
        assert!(sampler.argmax_suffices());
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for case in 0..200 {
            let k = (case % 6) as usize;
            let rows: Vec<f32> = (0..(k + 1) * vocab).map(|_| (next() % 97) as f32).collect();
            let argmax = kernels::reference::argmax_rows(&rows, vocab);
            // Drafts: the argmax for a random prefix, then (maybe) a wrong token.
            let agree = next() as usize % (k + 1);
            let drafts: Vec<u32> = (0..k)
                .map(|i| match i < agree {
                    true => argmax[i],
                    false => (argmax[i] + 1 + next() % (vocab as u32 - 1)) % vocab as u32,
                })
                .collect();
            let want = sampler.clone().verify(&rows, &drafts);
            let got = greedy_tokens(&[(1, &drafts)], &argmax, k + 1).unwrap();
            assert_eq!(got[0].accepted as usize, want.len() - 1, "case {case}");
            assert_eq!(got[0].token_id, want.last().unwrap().token, "case {case}");
        }
        assert!(greedy_tokens(&[(1, &[])], &[1, 2], 1).is_err());
    }

    #[test]
    fn only_plain_greedy_sequences_may_take_the_argmax() {
        let p = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            SeqSampler::new(p, 64).unwrap().argmax_suffices()
        };
        assert!(p(|_| {}));
        assert!(p(|p| (p.temperature, p.top_k) = (0.8, 1)));
        assert!(!p(|p| p.temperature = 0.8));
        assert!(!p(|p| p.logprobs = Some(0)));
        assert!(!p(|p| p.min_tokens = 3));
        assert!(p(|p| (p.min_tokens, p.generated_before) = (3, 3)));
    }
}
