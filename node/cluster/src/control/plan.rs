//! Plans and what feeds them: membership changes, link probes, load
//! reports; the leader's replanning; installing a plan on this node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use libp2p::Multiaddr;
use protocol::{Message, Plan, RequestError};
use tracing::{info, warn};

use super::{Control, PROBE_ATTEMPTS, PROBE_RETRY, REPLAN_SETTLE, REPORT_INTERVAL};
use crate::dataplane::{short, PeerData};
use crate::shared::plan_line;
use crate::worker::WorkerMsg;

impl Control {
    /// Samples this node's load and sends it to every member.
    pub(super) fn report_load(&mut self) {
        let sh = &self.shared;
        let running = sh.stats.lock().expect("stats lock").running as u32;
        let queued = sh.queued.load(std::sync::atomic::Ordering::Relaxed) as u32;
        let sequences = sh.live_sequences.load(std::sync::atomic::Ordering::Relaxed) as u32;
        let mut load = self
            .load_meter
            .sample(&sh.metrics, running, queued, sequences);
        // The highest seen, plan in force or not: a new leader (the old
        // one gone) must plan past it for this node to take its plan.
        load.epoch = self.m.epoch();
        *sh.load.lock().expect("load lock") = load;
        self.tell_members(&Message::Load(load), None);
    }

    /// Measures the data-plane link to a new member in the background.
    pub(super) fn start_probe(&self, peer: String) {
        let data = self.shared.data.clone();
        let tx = self.probes.0.clone();
        tokio::spawn(async move {
            // The peer may not have admitted us yet (its allow list lags
            // its answer to our join by a moment): retry a few times.
            let mut result = Err(String::new());
            for attempt in 1..=PROBE_ATTEMPTS {
                result = data.probe(&peer).await;
                if result.is_ok() {
                    break;
                }
                tokio::time::sleep(PROBE_RETRY * attempt).await;
            }
            let _ = tx.send((peer, result)).await;
        });
    }

    pub(super) fn on_probe(&mut self, peer: String, result: Result<(u32, f64), String>) {
        match result {
            Ok((rtt_us, bps)) => {
                info!(
                    peer = %short(&peer),
                    rtt_ms = format!("{:.2}", f64::from(rtt_us) / 1000.0),
                    mbit_s = format!("{:.0}", bps * 8.0 / 1e6),
                    "link measured"
                );
                let changed = self.m.set_probe(&peer, rtt_us, bps);
                if changed {
                    self.last_report = Instant::now() - REPORT_INTERVAL;
                    self.replan_at = Some(Instant::now() + REPLAN_SETTLE);
                }
            }
            Err(e) => info!("{e}"),
        }
    }

    /// Members changed: update the data plane's allow list, drop a plan
    /// naming a node that left, and (if leading) replan after settling.
    pub(super) fn members_changed(&mut self) {
        let peers: HashMap<String, PeerData> = self
            .m
            .members()
            .iter()
            .filter_map(|(id, mem)| {
                Some((
                    id.clone(),
                    PeerData {
                        addr: mem.data_addr()?,
                        fingerprint: mem.hello.capabilities.cert_fingerprint,
                    },
                ))
            })
            .collect();
        self.shared.data.set_members(peers);
        // Members are where missing layers come from.
        let addrs: Vec<Multiaddr> = self
            .m
            .members()
            .values()
            .flat_map(|m| {
                m.hello
                    .capabilities
                    .addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
            })
            .collect();
        self.shared
            .fetcher
            .sources
            .lock()
            .expect("sources lock")
            .addrs = addrs
            .into_iter()
            .chain(self.cfg.peers.iter().cloned())
            .collect();
        if self.m.clear_plan_if_stale() {
            self.apply_plan();
        }
        self.replan_at = Some(Instant::now() + REPLAN_SETTLE);
    }

    /// The leader plans and tells every member; others wait for it.
    pub(super) fn replan(&mut self) {
        if !self.m.is_leader() {
            return;
        }
        let result = self.m.replan();
        let members = self.m.member_addrs();
        match result {
            Ok(Some(_)) => self.apply_plan(),
            Ok(None) => {}
            Err(e) => {
                if self.last_plan_error.as_deref() != Some(&e.to_string()) {
                    warn!("cannot plan: {e}");
                    self.last_plan_error = Some(e.to_string());
                }
                self.apply_plan();
                return;
            }
        }
        let Some(mut plan) = self.m.plan().cloned() else {
            return;
        };
        if crate::fault::lies().plan {
            warn!("fault injection: a plan for layers the model does not have");
            plan.n_layers += 8;
            if let Some(last) = plan.stages.last_mut() {
                last.layers_end += 8;
            }
        }
        // Everyone gets the plan, changed or not: a node that just joined needs it.
        self.tell_members(&Message::PlanUpdate { plan, members }, None);
    }

    /// Hands the plan in force to the rest of the node.
    pub(super) fn apply_plan(&mut self) {
        let plan = self.m.plan().cloned();
        self.install_plan(plan);
    }

    /// Installs a plan (or none): logs it, fails requests of the old one,
    /// reconfigures the worker, and tells origins.
    pub(super) fn install_plan(&mut self, plan: Option<Plan>) {
        let sh = &self.shared;
        // Readers see the membership (and plan error) that goes with the
        // plan before they see the plan.
        self.publish.view.send_replace(Arc::new(self.m.view()));
        let old = self.publish.plan.borrow().clone();
        if old == plan {
            return;
        }
        let (layers, next, prev, epoch) = match &plan {
            Some(p) => {
                let pos = p.stages.iter().position(|s| s.node_id == sh.node_id);
                let layers =
                    pos.map(|i| p.stages[i].layers_start as usize..p.stages[i].layers_end as usize);
                let next = pos
                    .filter(|&i| i + 1 < p.stages.len())
                    .map(|i| p.stages[i + 1].node_id.clone());
                let prev = pos
                    .filter(|&i| i > 0)
                    .map(|i| p.stages[i - 1].node_id.clone());
                info!(
                    "plan epoch {}: {} | {:.1} ms/token, {:.1} tok/s full{}",
                    p.epoch,
                    plan_line(p),
                    p.token_latency_us / 1000.0,
                    p.throughput_tokens_per_s,
                    match &layers {
                        Some(l) => format!(" (this node: layers {}..{})", l.start, l.end),
                        None => " (this node: none)".into(),
                    }
                );
                (layers, next, prev, p.epoch)
            }
            None => {
                warn!("no plan in force: waiting for the leader");
                (None, None, None, 0)
            }
        };
        // Without a plan the worker keeps its layers loaded (the next plan
        // is likely to give them back) but drops its requests.
        let msg = match plan {
            Some(ref p) => WorkerMsg::Reconfigure {
                epoch,
                layers,
                next,
                prev,
                stages: p.stages.len(),
            },
            None => WorkerMsg::Pause,
        };
        // The worker hears of the plan before any request of it can reach it.
        sh.data.to_worker_now(msg);
        self.publish.plan.send_replace(plan);
        // Requests see the new plan (or none) by the time they fail: one
        // that had no token yet runs again on the new plan.
        if old.is_some() {
            sh.data.fail_all_requests(&RequestError::Replanned);
        }
    }
}
