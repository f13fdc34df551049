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

/// A request as its origin runs it (`schedule::flight`): the trips in
/// flight and, since the simulator has no text, a model of its tokens.
/// Token `p` is the one at position `p`; a proposal is that token with
/// the load's acceptance rate, another one otherwise.
struct Flying {
    flight: Flight,
    /// The tokens so far (prompt and generated).
    known: Vec<u32>,
    /// The tokens the stages hold, by position.
    inputs: Vec<u32>,
    /// How many of `inputs` from the start are the true tokens.
    valid: usize,
    /// Per chunk in flight, in order: the tokens the last stage will draw.
    draws: VecDeque<Vec<u32>>,
}

impl Flying {
    /// The chunk `c` goes in: the stages hold its tokens, and the last
    /// stage will draw the true token after a true prefix, junk otherwise;
    /// false when it will skip the chunk (proposals only, after one that
    /// did not stand: see `protocol::Activations::proposals`).
    fn send(&mut self, c: &Chunk) -> bool {
        self.inputs.truncate(c.position);
        self.valid = self.valid.min(c.position);
        self.inputs.extend(&c.tokens);
        while self.valid < self.inputs.len() && self.inputs[self.valid] == self.valid as u32 {
            self.valid += 1;
        }
        let n = protocol::draws(c.tokens.len() as u32, c.draft as u32) as usize;
        let first = c.position + c.tokens.len() - n + 1;
        let valid = self.valid;
        if c.draft == c.tokens.len() && valid <= c.position {
            return false;
        }
        self.draws.push_back(
            (first..first + n)
                .map(|p| if valid >= p { p as u32 } else { u32::MAX })
                .collect(),
        );
        true
    }
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
    /// Per request in progress: its trips.
    flying: HashMap<u64, Flying>,
    /// Chunks (request, position) the last stage skips.
    skipped: HashSet<(u64, u32)>,
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
            flying: HashMap::new(),
            skipped: HashSet::new(),
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
        let reach = Reach {
            context: prompt + self.load.output_tokens + 1,
            prompt,
            max_tokens: self.load.output_tokens,
        };
        // Speculation adapts as on a node: adaptive length, on a pipeline
        // proposals in flight.
        let speculate = self.load.acceptance.map(|_| 0);
        let known: Vec<u32> = (0..prompt as u32).collect();
        let flight = Flight::new(
            speculate,
            self.stages.len(),
            reach,
            prompt,
            self.at(self.now),
        );
        // The prompt's last chunk draws the first token.
        let draws = VecDeque::from([vec![prompt as u32]]);
        self.flying.insert(
            request as u64,
            Flying {
                flight,
                inputs: known.clone(),
                valid: prompt,
                known,
                draws,
            },
        );
        for c in prompt_chunks(prompt) {
            let land = self.send(self.entry, head, c.rows as u64 * 4 + 32);
            let work = token_work(request as u64, c.start, c.rows, c.sample, 0);
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
        let mut batch = stage.batcher.next_batch(seqs_max, first, now);
        let picked = batch.len();
        if s + 1 == n_stages {
            let skipped = &mut self.skipped;
            batch.retain(|w| !skipped.remove(&(w.seq.request_id, w.seq.position)));
        }
        if batch.is_empty() {
            if picked > 0 {
                // All skipped: the next batch, as a worker's next step.
                self.try_start(s);
            }
            return;
        }
        let rows: usize = batch.iter().map(|w| w.seq.rows as usize).sum();
        // A verification pass wants logits for every row it draws after.
        let sampled: usize = batch
            .iter()
            .filter(|w| w.seq.sample)
            .map(|w| protocol::draws(w.seq.rows, w.seq.draft) as usize)
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
                    proposals: Vec::new(),
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
        let now = self.at(self.now);
        let mut next = Vec::new();
        for id in requests {
            // A request that ended may still have trips on their way.
            let Some(f) = self.flying.get_mut(&id) else {
                continue;
            };
            let log = &mut self.requests[id as usize];
            for token in f.draws.pop_front().unwrap_or_default() {
                if f.flight.drawn(token, f.known.len(), now) == Some(Drawn::Next) {
                    f.known.push(token);
                    log.tokens.push(self.now);
                    if log.tokens.len() >= self.load.output_tokens {
                        break;
                    }
                }
            }
            if log.tokens.len() >= self.load.output_tokens {
                self.flying.remove(&id);
                let land = self.send(self.entry, head, 16);
                self.schedule(land, Event::End { request: id });
                if self.load.streams.is_some() {
                    self.issue();
                }
                continue;
            }
            let a = self.load.acceptance.unwrap_or(0.0);
            let rng = &mut self.rng;
            // Each proposal is the true token with the acceptance rate.
            let mut propose = |context: &[u32], k: usize| -> Vec<u32> {
                (context.len()..context.len() + k)
                    .map(|p| {
                        if rng.random::<f64>() < a {
                            p as u32
                        } else {
                            u32::MAX - 1
                        }
                    })
                    .collect()
            };
            while let Some(c) = f.flight.next_chunk(&f.known, &mut propose, now) {
                if !f.send(&c) {
                    self.skipped.insert((id, c.position as u32));
                }
                next.push(token_work(id, c.position, c.tokens.len(), true, c.draft));
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

fn token_work(request: u64, position: usize, rows: usize, sample: bool, draft: usize) -> Work {
    Work {
        seq: SeqRows {
            request_id: request,
            position: position as u32,
            rows: rows as u32,
            sample,
            draft: draft as u32,
        },
        rows: Rows::Tokens(vec![0; rows]),
        proposals: Vec::new(),
    }
}
