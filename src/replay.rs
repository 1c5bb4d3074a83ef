//! `replay`: the processor over a JSON-lines file or stdin, with no broker.
//!
//! Reads events, applies them through the same [`Processor`] the Kafka service uses, and writes
//! stage changes as JSON lines. Bad lines are reported with their line number and reason,
//! counted, and skipped: a replay never stops on bad input. The caller owns the clock (for the
//! elapsed-time figure) and the files.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::sync::Arc;

use serde::Serialize;

use crate::codec::format_timestamp;
use crate::codec::json::{decode_input, StageChangeRecord};
use crate::config::Processing;
use crate::domain::Input;
use crate::domain::{ContactKey, ContactState, StageChange, Timestamp};
use crate::lifecycle::{Engine, StageModel};
use crate::partition::partition_for;
use crate::processor::Feeder;
use crate::processor::Processor;
use crate::reorder::ReorderBuffer;
use crate::state::new_shard;
use std::collections::VecDeque;

/// Options of a replay run.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplayOptions {
    /// Advance every timer to this time at the end (`--as-of`).
    pub as_of: Option<Timestamp>,
    /// How many bad lines to describe individually on the error stream (all are counted).
    pub max_errors_shown: usize,
    /// Expected number of contacts, to size the state map up front.
    pub capacity: usize,
    /// Process as the service would with this many input partitions: events are split by the
    /// Java clients' partitioner on their key, and each partition has its own processor
    /// (clock, timers) and reorder buffer. 0 or 1: one partition.
    pub partitions: u32,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReplaySummary {
    /// Non-empty input lines read.
    pub lines: u64,
    /// Lines decoded into events.
    pub events: u64,
    /// Bad lines by reason code.
    pub errors: BTreeMap<&'static str, u64>,
    /// Events dropped as duplicates.
    pub duplicates: u64,
    /// Events too late to change a stage.
    pub too_late: u64,
    /// Stage changes written.
    pub stage_changes: u64,
    /// Of which fired by timers.
    pub timer_changes: u64,
    /// Contacts in the final state.
    pub contacts: u64,
    /// Contacts per current stage.
    pub contacts_per_stage: BTreeMap<String, u64>,
    /// The time the state was scored at: `--as-of`, else the latest event time.
    pub as_of: Option<String>,
}

/// Replays `input`, writing stage changes to `changes` and bad-line reports to `errors`.
/// Returns the summary and a processor whose shard holds the final state of every contact (the
/// partitions' processors share one shard; their key sets are disjoint) and whose clock is the
/// latest of theirs.
pub fn replay(
    engine: Arc<Engine>,
    processing: Processing,
    input: impl BufRead,
    changes: &mut dyn Write,
    errors: &mut dyn Write,
    options: ReplayOptions,
) -> io::Result<(ReplaySummary, Processor)> {
    let shard = Arc::new(new_shard(options.capacity));
    let partitions = options.partitions.max(1);
    let mut processors: Vec<Processor> = (0..partitions)
        .map(|_| {
            let mut processor = Processor::new(engine.clone(), shard.clone(), processing);
            if processing.merge_identities {
                processor.merge_identities();
            }
            processor
        })
        .collect();
    let mut summary = ReplaySummary::default();
    let mut out: Vec<StageChange> = Vec::new();
    let mut lanes = Lanes::new(partitions, processing.reorder_window_millis);
    let mut error_count = 0u64;
    let mut input = input;
    let mut line = Vec::with_capacity(512);
    let mut line_number = 0u64;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        line_number += 1;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        summary.lines += 1;
        match decode_input(text) {
            Ok(input) => {
                summary.events += 1;
                lanes.deliver(&mut processors, vec![input], &mut out);
            }
            Err(error) => {
                *summary.errors.entry(error.reason()).or_default() += 1;
                error_count += 1;
                if error_count <= options.max_errors_shown as u64 {
                    writeln!(errors, "line {line_number}: {error}")?;
                }
            }
        }
        if !out.is_empty() {
            write_changes(&out, &engine.model, changes)?;
            out.clear();
        }
    }
    lanes.flush(&mut processors, &mut out);
    if let Some(as_of) = options.as_of {
        for processor in &mut processors {
            processor.advance_to(as_of, &mut out);
        }
    }
    write_changes(&out, &engine.model, changes)?;
    out.clear();
    if error_count > options.max_errors_shown as u64 {
        writeln!(
            errors,
            "... {} more bad lines not shown",
            error_count - options.max_errors_shown as u64
        )?;
    }
    for stats in processors.iter().map(Processor::stats) {
        summary.duplicates += stats.duplicates;
        summary.too_late += stats.too_late;
        summary.stage_changes += stats.stage_changes;
        summary.timer_changes += stats.timer_changes;
    }
    let watermark = processors
        .iter()
        .map(Processor::watermark)
        .max()
        .unwrap_or(Timestamp::MIN_VALID);
    let mut processor = processors.swap_remove(0);
    processor.raise_watermark(watermark);
    summary.contacts = processor.shard().len() as u64;
    for entry in processor.shard().iter() {
        let id = engine.model.stage(entry.value().stage).id.clone();
        *summary.contacts_per_stage.entry(id).or_default() += 1;
    }
    summary.as_of = Some(format_timestamp(options.as_of.unwrap_or(processor.watermark())));
    Ok((summary, processor))
}

/// The partitions of a replay, each with the reorder buffer and feeder the service gives it:
/// inputs go to the partition of their key, and merge requests and handovers travel between
/// partitions as they do through the service's identity topic (with the same event-time
/// ordering at the receiving end), so both give the same answers.
struct Lanes {
    partitions: u32,
    reorders: Vec<ReorderBuffer>,
    feeders: Vec<Feeder<()>>,
}

impl Lanes {
    fn new(partitions: u32, window_millis: i64) -> Self {
        Lanes {
            partitions,
            reorders: (0..partitions).map(|_| ReorderBuffer::new(window_millis)).collect(),
            feeders: (0..partitions).map(|_| Feeder::default()).collect(),
        }
    }

    fn lane(&self, input: &Input) -> usize {
        match input.routing_id() {
            Some(id) if self.partitions > 1 => partition_for(id.as_bytes(), self.partitions) as usize,
            _ => 0,
        }
    }

    /// Pushes inputs into their partitions' reorder buffers and processes what they release,
    /// following the requests that sets off until there are none.
    fn deliver(&mut self, processors: &mut [Processor], inputs: Vec<Input>, out: &mut Vec<StageChange>) {
        let mut work: VecDeque<Input> = inputs.into();
        let mut ready = Vec::new();
        while let Some(input) = work.pop_front() {
            let lane = self.lane(&input);
            self.reorders[lane].push(input, (), &mut ready);
            self.process(processors, lane, &mut ready, &mut work, out);
        }
    }

    /// Releases everything held (end of input), until no request is left in flight.
    fn flush(&mut self, processors: &mut [Processor], out: &mut Vec<StageChange>) {
        let mut ready = Vec::new();
        let mut work = VecDeque::new();
        loop {
            for lane in 0..self.reorders.len() {
                self.reorders[lane].flush(&mut ready);
                self.process(processors, lane, &mut ready, &mut work, out);
            }
            if work.is_empty() {
                return;
            }
            self.deliver(processors, work.drain(..).collect(), out);
        }
    }

    fn process(
        &mut self,
        processors: &mut [Processor],
        lane: usize,
        ready: &mut Vec<(Input, ())>,
        work: &mut VecDeque<Input>,
        out: &mut Vec<StageChange>,
    ) {
        let mut elsewhere = Vec::new();
        for (input, ()) in ready.drain(..) {
            let partitions = self.partitions;
            let here = |request: &Input| {
                partitions <= 1
                    || request
                        .routing_id()
                        .is_none_or(|id| partition_for(id.as_bytes(), partitions) as usize == lane)
            };
            self.feeders[lane].feed(
                &mut processors[lane],
                input,
                None,
                out,
                here,
                &mut elsewhere,
                |_, _, _, _| {},
            );
        }
        work.extend(elsewhere);
    }
}

fn write_changes(changes: &[StageChange], model: &StageModel, out: &mut dyn Write) -> io::Result<()> {
    for change in changes {
        serde_json::to_writer(&mut *out, &StageChangeRecord::new(change, model))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Time spent in one stage, as written by `--state-out`.
#[derive(Debug, Serialize)]
pub struct StageVisit {
    /// Stage id.
    pub stage: String,
    /// Times entered.
    pub visits: u32,
    /// First entry.
    pub first_entered_at: String,
    /// Last exit; `null` while the contact is in the stage.
    pub last_exited_at: Option<String>,
    /// Cumulative seconds over all visits.
    pub seconds: f64,
}

/// One contact's final state as written by `--state-out`.
#[derive(Debug, Serialize)]
pub struct ContactReport {
    /// The contact id, when identified.
    pub contact_id: Option<String>,
    /// The anonymous id, for anonymous visitors.
    pub anonymous_id: Option<String>,
    /// Current stage id.
    pub stage: String,
    /// When the current stage was entered.
    pub stage_entered_at: String,
    /// Seconds in the current stage as of the report time.
    pub seconds_in_stage: f64,
    /// Highest main-path stage reached.
    pub main_stage: String,
    /// Stage changes so far.
    pub transitions: u32,
    /// Every stage visited: visits, first entry, last exit, cumulative seconds (the current
    /// visit included, with no exit).
    pub stages: Vec<StageVisit>,
    /// Repeat purchase days (`x`), for buyers.
    pub x: Option<f64>,
    /// Recency in the model's time unit.
    pub t_x: Option<f64>,
    /// Age in the model's time unit.
    #[serde(rename = "T")]
    pub t: Option<f64>,
    /// Time unit of `t_x` and `T`.
    pub time_unit: String,
    /// Completed orders.
    pub orders: u32,
    /// Total amount of completed orders.
    pub spend: f64,
    /// P(alive), for buyers.
    pub p_alive: Option<f64>,
    /// Expected purchases within the horizon, for buyers.
    pub expected_purchases: Option<f64>,
    /// Churn risk within [0, 1].
    pub churn_risk: f64,
    /// Which model produced the churn risk.
    pub score_model: crate::scoring::ScoreSource,
    /// Days since the last activity.
    pub days_since_last_activity: f64,
}

impl ContactReport {
    /// Describes one contact as of `now`.
    pub fn new(engine: &Engine, key: &ContactKey, state: &ContactState, now: Timestamp) -> Self {
        let model = &engine.model;
        let score = engine.scorer.score(state, now);
        let (contact_id, anonymous_id) = key.output_ids();
        let mut stages: Vec<StageVisit> = state
            .history()
            .iter()
            .map(|span| StageVisit {
                stage: model.stage(span.stage).id.clone(),
                visits: span.visits,
                first_entered_at: format_timestamp(span.first_entered_at),
                last_exited_at: Some(format_timestamp(span.last_exited_at)),
                seconds: state.time_in_stage(span.stage, now) as f64 / 1000.0,
            })
            .collect();
        match stages
            .iter_mut()
            .find(|visit| visit.stage == model.stage(state.stage).id)
        {
            Some(visit) => {
                // Back in a stage visited before: the open visit counts too.
                visit.visits += 1;
                visit.last_exited_at = None;
            }
            None => stages.push(StageVisit {
                stage: model.stage(state.stage).id.clone(),
                visits: 1,
                first_entered_at: format_timestamp(state.stage_entered_at),
                last_exited_at: None,
                seconds: state.time_in_stage(state.stage, now) as f64 / 1000.0,
            }),
        }
        let history = state.purchase_history();
        ContactReport {
            contact_id: contact_id.map(str::to_owned),
            anonymous_id: anonymous_id.map(str::to_owned),
            stage: model.stage(state.stage).id.clone(),
            stage_entered_at: format_timestamp(state.stage_entered_at),
            seconds_in_stage: now.millis_since(state.stage_entered_at).max(0) as f64 / 1000.0,
            main_stage: model.stage(state.main_stage).id.clone(),
            transitions: state.seq,
            stages,
            x: score.x,
            t_x: score.t_x,
            t: score.t,
            time_unit: engine.scorer.time_unit.to_string(),
            orders: history.map_or(0, |history| history.completed_orders),
            spend: history.map_or(0.0, |history| history.completed_amount),
            p_alive: score.p_alive,
            expected_purchases: score.expected_purchases,
            churn_risk: score.churn_risk,
            score_model: score.source,
            days_since_last_activity: score.days_since_last_activity,
        }
    }
}

/// Writes every contact's state as JSON lines, sorted by key, scored as of `now`.
pub fn write_state(processor: &Processor, now: Timestamp, out: &mut dyn Write) -> io::Result<()> {
    let engine = processor.engine();
    let mut keys: Vec<ContactKey> = processor.shard().iter().map(|entry| entry.key().clone()).collect();
    keys.sort_unstable();
    for key in keys {
        if let Some(state) = processor.shard().get(&key) {
            serde_json::to_writer(&mut *out, &ContactReport::new(engine, &key, &state, now))?;
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}
