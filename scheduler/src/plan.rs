//! What one step asks of the workers ([`StepPlan`]), and why a sequence ended
//! ([`FinishReason`]).
//!
//! A plan carries exactly what workers need to mirror block tables and run the
//! forward pass (ARCHITECTURE §6), nothing more: sampling parameters are the
//! coordinator's to attach to entries with `reset` set.
//!
//! Invariants of every plan: at most `max_num_batched_tokens` tokens in all (draft
//! tokens included) and at most `max_num_seqs` entries; one entry per sequence; an id
//! in `freed` is not scheduled again in the same plan unless its entry has `reset`
//! set; an entry with drafts is a decode (one committed token, `sample` set) whose
//! drafts fit its `max_tokens` and the token limit even if all are accepted.
//!
//! Speculative entries: the forward pass computes the committed token and then the
//! draft tokens at the following positions (blocks for all of them are in the table);
//! the caller reports the accepted drafts plus one token (ARCHITECTURE §4), and the
//! scheduler rolls the rest back in the same `update`. Workers learn the rollback from
//! the next plan's [`StepPlan::truncated`].
//!
//! Costs: token ids and block ids of all entries live in two flat vectors, so a plan
//! of any size is four allocations.

use crate::{BlockId, SeqId};

/// One sequence's part of a step. Its token ids and new block ids are read through
/// [`StepPlan::tokens`] and [`StepPlan::new_blocks`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    /// Position of the first token of this step, i.e. the tokens of this sequence
    /// already in the KV cache. On a `reset` entry these were served by the prefix
    /// cache.
    pub position: usize,
    /// Sample one token after this chunk: it reaches the last known token (always
    /// true for a decode, true for the prompt's final chunk).
    pub sample: bool,
    /// The sequence is new to the workers: its first appearance, or its re-admission
    /// after preemption. Workers forget any state of this id and start a fresh table;
    /// the coordinator attaches the request's sampling parameters.
    pub reset: bool,
    pub(crate) tokens: (u32, u32),
    /// Draft token ids, right after `tokens` in the plan's flat vector.
    pub(crate) drafts: (u32, u32),
    pub(crate) new_blocks: (u32, u32),
    /// Where the scheduler keeps this sequence (checked against `seq_id` before use).
    pub(crate) slot: u32,
}

impl ScheduledSeq {
    /// Tokens this step computes for the sequence: committed tokens and drafts.
    pub fn num_tokens(&self) -> usize {
        (self.tokens.1 - self.tokens.0 + self.drafts.1 - self.drafts.0) as usize
    }

    /// Draft tokens this step verifies (0 for a plain entry).
    pub fn num_drafts(&self) -> usize {
        (self.drafts.1 - self.drafts.0) as usize
    }
}

/// One engine step, the same for every worker rank. Workers apply `freed` first,
/// then `seqs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Sequences to run: running decodes first, then prefill chunks of running
    /// sequences, then newly admitted ones.
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences whose worker state (mirrored block table) must be dropped: finished,
    /// aborted or preempted since the previous plan. Workers ignore ids they do not
    /// hold (a sequence whose only plan was dropped).
    pub freed: Vec<SeqId>,
    /// Block tables cut back since the previous plan (rejected draft positions), as
    /// `(seq, table length)`: applied after `freed`, before `seqs`. Workers ignore
    /// ids they do not hold.
    pub truncated: Vec<(SeqId, usize)>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) blocks: Vec<BlockId>,
}

impl StepPlan {
    /// Token ids whose KV this step computes for `seq`, at positions `seq.position..`:
    /// a prompt chunk (after preemption, a chunk of prompt and generated tokens), or
    /// the last sampled token of a decode.
    pub fn tokens(&self, seq: &ScheduledSeq) -> &[u32] {
        &self.tokens[seq.tokens.0 as usize..seq.tokens.1 as usize]
    }

    /// Draft tokens of `seq`, at positions after its committed tokens: what the step
    /// verifies. Empty for a plain entry.
    pub fn drafts(&self, seq: &ScheduledSeq) -> &[u32] {
        &self.tokens[seq.drafts.0 as usize..seq.drafts.1 as usize]
    }

    /// Block ids appended to `seq`'s block table this step, in table order; on a
    /// `reset` entry, the whole table. [`crate::NULL_BLOCK`] stands where a block lies
    /// wholly outside the sliding window: workers never read it.
    pub fn new_blocks(&self, seq: &ScheduledSeq) -> &[BlockId] {
        &self.blocks[seq.new_blocks.0 as usize..seq.new_blocks.1 as usize]
    }

    /// Nothing to run and nothing to drop.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty() && self.freed.is_empty() && self.truncated.is_empty()
    }

    /// Tokens computed by this step (what the budget counts).
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(ScheduledSeq::num_tokens).sum()
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The caller reported a stop condition (stop token or stop string).
    Stopped,
    /// `max_tokens` generated, or the sequence reached the longest that fits
    /// (`max_model_len`, or the whole KV cache).
    Length,
}
