//! The simulated world: every stage's queue and pass in flight, the links,
//! the requests, and the events between them.

use super::*;

/// Nanoseconds since the start.
type Ns = u64;

fn ns(us: f64) -> Ns {
    (us * 1e3).round().max(0.0) as Ns
}

#[derive(Debug)]
enum Event {
    /// A request arrives at the origin.
    Arrive { request: usize },
    /// Chunks reach a stage.
    Deliver { stage: usize, work: Vec<Work> },
    /// A stage's forward pass ends, unless its speed changed since (then
    /// a later event with the new `version` stands).
    PassDone { stage: usize, version: u64 },
    /// Sampled tokens reach the origin.
    Tokens { requests: Vec<u64> },
    /// A stage's regroup wait ends.
    Wake { stage: usize },
    /// A finished request's Cancel reaches the first stage.
    End { request: u64 },
}

/// A pass in progress.
struct Running {
    batch: Vec<SeqRows>,
    /// Compute left at full speed, µs.
    remaining_us: f64,
    /// Fraction of full speed it gets now.
    rate: f64,
    /// When `remaining_us` and `rate` were last updated.
    since: Ns,
    started: Ns,
}

struct Stage {
    node: usize,
    /// MiB of layer weights streamed per pass.
    layer_mib: f64,
    /// MiB-equivalent of the head's work per sampled row (last stage).
    head_mib: f64,
    batcher: Batcher,
    running: Option<Running>,
    version: u64,
    wake: Option<Ns>,
    busy_ns: Ns,
    passes: u64,
    rows: u64,
    seqs: u64,
}

/// One request's times, nanoseconds from the start of a run: what the
/// simulator records, and what `shoal bench --cluster` measures.
#[derive(Debug, Clone, Default)]
pub struct RequestLog {
    /// When it arrived.
    pub arrive: u64,
    /// Its prompt tokens.
    pub prompt: usize,
    /// When each generated token reached the origin (or the client).
    pub tokens: Vec<u64>,
}

/// A request's speculation, as its origin would run it: the proposals in
/// flight and when they left (the trip time the length adapts to).
#[derive(Debug, Clone)]
struct Speculating {
    spec: Speculation,
    /// Proposals in the trip in flight.
    drafts: usize,
    sent: Ns,
}

pub(super) struct World<'a> {
    cluster: &'a Cluster,
    load: &'a Load,
    stages: Vec<Stage>,
    entry: usize,
    base: Instant,
    now: Ns,
    queue: BinaryHeap<Reverse<(Ns, u64)>>,
    events: HashMap<u64, Event>,
    seq: u64,
    /// Per directed link: when its sender is free, when its last message lands.
    link_free: HashMap<(usize, usize), (Ns, Ns)>,
    rng: StdRng,
    requests: Vec<RequestLog>,
    /// Per request, when the load speculates.
    speculating: HashMap<u64, Speculating>,
    issued: usize,
    active: usize,
    processed: u64,
}

impl<'a> World<'a> {
    pub(super) fn new(
        cluster: &'a Cluster,
        load: &'a Load,
        split: &[(usize, Range<usize>)],
    ) -> World<'a> {
        let m = &cluster.model;
        let n = split.len();
        let stages = split
            .iter()
            .enumerate()
            .map(|(s, (node, layers))| Stage {
                node: *node,
                layer_mib: mib(m.layer_bytes[layers.clone()].iter().sum()),
                head_mib: if s + 1 == n {
                    mib(m.last_compute_bytes)
                } else {
                    0.0
                },
                batcher: Batcher::default(),
                running: None,
                version: 0,
                wake: None,
                busy_ns: 0,
                passes: 0,
                rows: 0,
                seqs: 0,
            })
            .collect();
        World {
            cluster,
            load,
            stages,
            entry: cluster.entry.unwrap_or(split[0].0),
            base: Instant::now(),
            now: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            link_free: HashMap::new(),
            rng: StdRng::seed_from_u64(load.seed),
            requests: Vec::new(),
            speculating: HashMap::new(),
            issued: 0,
            active: 0,
            processed: 0,
        }
    }

    fn at(&self, t: Ns) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    fn schedule(&mut self, t: Ns, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((t.max(self.now), self.seq)));
        self.events.insert(self.seq, e);
    }

    /// When a message of `bytes` sent now from node `a` lands on node `b`.
    fn send(&mut self, a: usize, b: usize, bytes: u64) -> Ns {
        if a == b {
            return self.now;
        }
        let link = self.cluster.links[a][b];
        let tx = ns(link.spec.transfer_us(bytes));
        let (free, last) = self.link_free.get(&(a, b)).copied().unwrap_or((0, 0));
        let start = free.max(self.now);
        let jitter = if link.jitter_us > 0.0 {
            let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
            -u.ln() * link.jitter_us
        } else {
            0.0
        };
        let sent = start.saturating_add(tx);
        let land = sent
            .saturating_add(ns(link.spec.latency_us + jitter))
            .max(last);
        self.link_free.insert((a, b), (sent, land));
        land
    }

    fn issue(&mut self) {
        if self.issued >= self.load.requests {
            return;
        }
        let request = self.issued;
        self.issued += 1;
        let prompt = match self.load.prompt_tokens_max {
            Some(max) if max > self.load.prompt_tokens => {
                self.rng.random_range(self.load.prompt_tokens..=max)
            }
            _ => self.load.prompt_tokens,
        };
        self.requests.push(RequestLog {
            arrive: 0,
            prompt,
            tokens: Vec::new(),
        });
        // Open loop: the next arrival is drawn when the previous one lands.
        let when = match self.load.rate_per_s {
            Some(rate) if request > 0 => {
                let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
                self.now.saturating_add(ns(-u.ln() / rate * 1e6))
            }
            _ => self.now,
        };
        self.schedule(when, Event::Arrive { request });
    }

    pub(super) fn run(&mut self) -> Result<(), SimError> {
        match self.load.streams {
            Some(n) => (0..n).for_each(|_| self.issue()),
            None => self.issue(),
        }
        while let Some(Reverse((t, id))) = self.queue.pop() {
            self.processed += 1;
            if self.processed > EVENTS_MAX {
                return Err(SimError::Runaway);
            }
            self.now = t;
            let event = self.events.remove(&id).expect("scheduled event");
            match event {
                Event::Arrive { request } => self.arrive(request),
                Event::Deliver { stage, work } => {
                    let now = self.at(self.now);
                    for w in work {
                        self.stages[stage].batcher.push(w, now);
                    }
                    self.try_start(stage);
                }
                Event::PassDone { stage, version } => {
                    if self.stages[stage].version == version {
                        self.pass_done(stage);
                    }
                }
                Event::Tokens { requests } => self.tokens(requests),
                Event::End { request } => {
                    self.active -= 1;
                    self.stages[0].batcher.cancel(request);
                    self.try_start(0);
                }
                Event::Wake { stage } => {
                    if self.stages[stage].wake == Some(self.now) {
                        self.stages[stage].wake = None;
                    }
                    self.try_start(stage);
                }
            }
        }
        Ok(())
    }

    fn arrive(&mut self, request: usize) {
        self.requests[request].arrive = self.now;
        self.active += 1;
        if self.load.rate_per_s.is_some() {
            self.issue();
        }
        let prompt = self.requests[request].prompt;
        let head = self.stages[0].node;
        for c in prompt_chunks(prompt) {
            let land = self.send(self.entry, head, c.rows as u64 * 4 + 32);
            let work = token_work(request as u64, c.start, c.rows, c.sample);
            self.schedule(
                land,
                Event::Deliver {
                    stage: 0,
                    work: vec![work],
                },
            );
        }
    }

    fn try_start(&mut self, s: usize) {
        let now = self.at(self.now);
        let n_stages = self.stages.len();
        let active = self.active;
        let stage = &mut self.stages[s];
        if stage.running.is_some() {
            return;
        }
        match stage.batcher.next(now) {
            Next::Idle => return,
            Next::WaitUntil(deadline) => {
                let t = deadline.duration_since(self.base).as_nanos() as Ns;
                if stage.wake.is_none_or(|w| w > t) {
                    stage.wake = Some(t);
                    self.schedule(t, Event::Wake { stage: s });
                }
                return;
            }
            Next::Run => {}
        }
        let first = s == 0;
        let seqs_max = micro_batch_cap(first, n_stages, active);
        let batch = stage.batcher.next_batch(seqs_max, first, now);
        if batch.is_empty() {
            return;
        }
        let rows: usize = batch.iter().map(|w| w.seq.rows as usize).sum();
        // A verification pass wants logits for every row it carries.
        let sampled: usize = batch
            .iter()
            .filter(|w| w.seq.sample)
            .map(|w| {
                let drafts = self
                    .speculating
                    .get(&w.seq.request_id)
                    .map_or(0, |s| s.drafts);
                1 + drafts.min(w.seq.rows as usize - 1)
            })
            .sum();
        let node = &self.cluster.nodes[stage.node];
        let us = node.pass_us(stage.layer_mib, rows) + node.pass_us(stage.head_mib, sampled);
        stage.passes += 1;
        stage.rows += rows as u64;
        stage.seqs += batch.len() as u64;
        stage.running = Some(Running {
            batch: batch.into_iter().map(|w| w.seq).collect(),
            remaining_us: us,
            rate: 1.0,
            since: self.now,
            started: self.now,
        });
        self.reshare(s);
    }

    /// Brings the passes sharing stage `s`'s machine up to now, gives each
    /// its share of the cores and (re)schedules their ends.
    fn reshare(&mut self, s: usize) {
        let node = self.stages[s].node;
        let host = self
            .cluster
            .hosts
            .iter()
            .find(|h| h.nodes.iter().any(|&(n, _)| n == node));
        let members: Vec<(usize, f64)> = match host {
            Some(h) => self
                .stages
                .iter()
                .enumerate()
                .filter_map(|(i, st)| {
                    h.nodes
                        .iter()
                        .find(|&&(n, _)| n == st.node)
                        .map(|&(_, t)| (i, t))
                })
                .collect(),
            None => vec![(s, 1.0)],
        };
        let want: f64 = members
            .iter()
            .filter(|&&(i, _)| self.stages[i].running.is_some())
            .map(|&(_, t)| t)
            .sum();
        let rate = host.map_or(1.0, |h| (h.cores / want.max(1e-9)).min(1.0));
        let now = self.now;
        for (i, _) in members {
            let st = &mut self.stages[i];
            let Some(run) = st.running.as_mut() else {
                continue;
            };
            let done_us = (now - run.since) as f64 / 1e3 * run.rate;
            run.remaining_us = (run.remaining_us - done_us).max(0.0);
            run.rate = rate;
            run.since = now;
            st.version += 1;
            let (at, version) = (now.saturating_add(ns(run.remaining_us / rate)), st.version);
            self.schedule(at, Event::PassDone { stage: i, version });
        }
    }

    fn pass_done(&mut self, s: usize) {
        let now = self.at(self.now);
        let run = self.stages[s].running.take().expect("a pass was running");
        self.stages[s].busy_ns += self.now - run.started;
        self.reshare(s);
        let batch = run.batch;
        self.stages[s].batcher.finished(now);
        let from = self.stages[s].node;
        if s + 1 < self.stages.len() {
            let rows: u64 = batch.iter().map(|b| u64::from(b.rows)).sum();
            let to = self.stages[s + 1].node;
            let land = self.send(from, to, rows * self.cluster.model.activation_bytes);
            let work = batch
                .into_iter()
                .map(|seq| Work {
                    seq,
                    rows: Rows::Hidden(Vec::new()),
                })
                .collect();
            self.schedule(land, Event::Deliver { stage: s + 1, work });
        } else {
            let requests: Vec<u64> = batch
                .iter()
                .filter(|b| b.sample)
                .map(|b| b.request_id)
                .collect();
            if !requests.is_empty() {
                let land = self.send(from, self.entry, 4 * requests.len() as u64);
                self.schedule(land, Event::Tokens { requests });
            }
        }
        self.try_start(s);
    }

    fn tokens(&mut self, requests: Vec<u64>) {
        let head = self.stages[0].node;
        let mut next = Vec::new();
        for id in requests {
            // With speculation, the trip brings the accepted proposals and
            // the token after them.
            let mut gained = 1;
            let mut drafts = 0;
            if let Some(a) = self.load.acceptance {
                let now = self.now;
                // The first token ends the prompt's trip: nothing to time.
                let fresh = !self.speculating.contains_key(&id);
                let s = self.speculating.entry(id).or_insert_with(|| Speculating {
                    spec: Speculation::default(),
                    drafts: 0,
                    sent: now,
                });
                let trip_us = (now - s.sent) as f64 / 1e3;
                if fresh {
                } else if s.drafts == 0 {
                    s.spec.timed_step(trip_us);
                } else {
                    let rng = &mut self.rng;
                    let kept = (0..s.drafts)
                        .take_while(|_| rng.random::<f64>() < a)
                        .count();
                    s.spec.verified(s.drafts, kept, trip_us);
                    gained += kept;
                }
                drafts = s.spec.length();
                s.sent = now;
            }
            let log = &mut self.requests[id as usize];
            let left = self.load.output_tokens.saturating_sub(log.tokens.len());
            for _ in 0..gained.min(left.max(1)) {
                log.tokens.push(self.now);
            }
            let left = self.load.output_tokens.saturating_sub(log.tokens.len());
            drafts = drafts.min(left.saturating_sub(1));
            if let Some(s) = self.speculating.get_mut(&id) {
                s.drafts = drafts;
            }
            if log.tokens.len() >= self.load.output_tokens {
                let land = self.send(self.entry, head, 16);
                self.schedule(land, Event::End { request: id });
                if self.load.streams.is_some() {
                    self.issue();
                }
            } else {
                let position = log.prompt + log.tokens.len() - 1;
                next.push(token_work(id, position, 1 + drafts, true));
            }
        }
        if !next.is_empty() {
            let land = self.send(self.entry, head, 32 * next.len() as u64);
            self.schedule(
                land,
                Event::Deliver {
                    stage: 0,
                    work: next,
                },
            );
        }
    }

    pub(super) fn report(&self, plan: &Plan) -> Report {
        let stages = self
            .stages
            .iter()
            .map(|s| crate::report::StageRun {
                node: self.cluster.nodes[s.node].id.clone(),
                busy_ns: s.busy_ns,
                passes: s.passes,
                rows: s.rows,
                seqs: s.seqs,
            })
            .collect();
        Report::from_run(&Run {
            plan,
            stages,
            requests: &self.requests,
            end: self.now,
        })
    }
}

fn token_work(request: u64, position: usize, rows: usize, sample: bool) -> Work {
    Work {
        seq: SeqRows {
            request_id: request,
            position: position as u32,
            rows: rows as u32,
            sample,
            draft: 0,
        },
        rows: Rows::Tokens(vec![0; rows]),
    }
}
