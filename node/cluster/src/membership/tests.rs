use super::*;
use protocol::{Capabilities, DeviceKind, PROTOCOL_VERSION};

fn hello(id: &str, memory_mib: u64) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        node_id: id.into(),
        cluster: "c".into(),
        model_hash: [1; 32],
        capabilities: Capabilities {
            device: DeviceKind::Cpu,
            threads: 1,
            kernels: "portable".into(),
            memory_bytes: memory_mib << 20,
            us_per_mib: 100.0,
            row_us_per_mib: 20.0,
            prompt_row_us_per_mib: 30.0,
            data_addr: "0.0.0.0:7000".into(),
            http_addr: "127.0.0.1:8080".into(),
            cert_fingerprint: [0; 32],
            addrs: vec![],
            name: "n".into(),
        },
    }
}

fn model() -> ModelSpec {
    ModelSpec {
        layer_bytes: vec![3 << 20; 30],
        first_bytes: 4 << 20,
        last_bytes: 8 << 20,
        last_compute_bytes: 8 << 20,
        kv_bytes_per_token_layer: 1024,
        context_tokens: 1024,
        activation_bytes: 2304,
    }
}

#[test]
fn smallest_id_leads_and_plans_are_only_taken_from_it() {
    let mut a = Membership::new(hello("b", 50), model(), PlanGoal::Latency);
    assert!(a.is_leader());
    assert!(a.join(hello("a", 50), None));
    assert!(!a.join(hello("a", 50), None));
    assert_eq!(a.leader(), "a");
    let mut leader = Membership::new(hello("a", 50), model(), PlanGoal::Latency);
    leader.join(hello("b", 50), None);
    leader.join(hello("c", 50), None);
    let p = leader.replan().unwrap().unwrap();
    assert_eq!(p.stages.len(), 3);
    assert_eq!(leader.replan().unwrap(), None, "same members, same plan");
    // The leader introduces c, which this node has not met yet.
    let c = [MemberAddrs {
        node_id: "c".into(),
        addrs: vec![],
    }];
    assert!(a.accept_plan("a", p.clone(), &c).unwrap());
    assert!(!a.accept_plan("a", p.clone(), &c).unwrap());
    assert!(a.accept_plan("c", p, &[]).is_err());
}

#[test]
fn plans_that_do_not_fit_the_model_or_the_members_are_refused() {
    let mut leader = Membership::new(hello("a", 500), model(), PlanGoal::Latency);
    leader.join(hello("b", 500), None);
    let good = leader.replan().unwrap().unwrap();
    let mut b = Membership::new(hello("b", 500), model(), PlanGoal::Latency);
    b.join(hello("a", 500), None);
    let mut short = good.clone();
    short.n_layers = 31;
    short.stages.last_mut().unwrap().layers_end = 31;
    assert!(matches!(
        b.accept_plan("a", short, &[]),
        Err(PlanRejected::Invalid(_))
    ));
    let mut stranger = good.clone();
    stranger.stages[0].node_id = "zz".into();
    assert!(matches!(
        b.accept_plan("a", stranger, &[]),
        Err(PlanRejected::Invalid(_))
    ));
    let mut wrap = good.clone();
    wrap.epoch = u64::MAX;
    assert!(matches!(
        b.accept_plan("a", wrap, &[]),
        Err(PlanRejected::Invalid(_))
    ));
    assert!(b.accept_plan("a", good, &[]).unwrap());
}

#[test]
fn a_member_with_another_model_cannot_lead() {
    let mut b = Membership::new(hello("b", 50), model(), PlanGoal::Latency);
    let mut other = hello("a", 50);
    other.model_hash = [9; 32];
    b.join(other, None);
    assert_eq!(b.leader(), "b");
    assert!(b.is_leader());
}

#[test]
fn a_member_leaving_makes_the_plan_stale_and_replans() {
    let mut m = Membership::new(hello("a", 50), model(), PlanGoal::Latency);
    m.join(hello("b", 50), None);
    m.join(hello("c", 50), None);
    let p1 = m.replan().unwrap().unwrap();
    assert!(m.leave("c"));
    assert!(m.clear_plan_if_stale());
    let err = m.replan().unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(m.plan_error().is_some());
    m.join(hello("d", 500), None);
    let p2 = m.replan().unwrap().unwrap();
    assert!(p2.epoch > p1.epoch);
}

#[test]
fn members_with_another_model_are_left_out() {
    let mut m = Membership::new(hello("a", 500), model(), PlanGoal::Throughput);
    let mut other = hello("b", 500);
    other.model_hash = [9; 32];
    m.join(other, None);
    let p = m.replan().unwrap().unwrap();
    assert!(p.stages.iter().all(|s| s.node_id == "a"));
}

#[test]
fn members_left_out_for_lying_lose_the_lead_cannot_rejoin_and_are_not_planned() {
    let mut b = Membership::new(hello("b", 80), model(), PlanGoal::Latency);
    b.join(hello("a", 80), None);
    b.join(hello("c", 80), None);
    let mut a = Membership::new(hello("a", 80), model(), PlanGoal::Latency);
    a.join(hello("b", 80), None);
    a.join(hello("c", 80), None);
    let old = a.replan().unwrap().unwrap();
    assert_eq!(b.leader(), "a");
    // Made-up ids are not kept; c says a lied: a is out, b leads.
    assert!(b.accuse("c", "nobody").is_empty());
    assert_eq!(b.accuse("c", "a"), vec!["a".to_string()]);
    assert!(b.is_excluded("a") && !b.members().contains_key("a"));
    assert_eq!(b.leader(), "b");
    assert!(!b.join(hello("a", 80), None), "no rejoin under the same id");
    assert!(b.accuse("c", "a").is_empty(), "counted once");
    // A plan giving a layers (from a leader that has not heard yet) is
    // refused without holding it against the leader.
    let mut c = Membership::new(hello("c", 80), model(), PlanGoal::Latency);
    c.join(hello("a", 80), None);
    c.join(hello("b", 80), None);
    c.accuse("c", "a");
    assert_eq!(c.leader(), "b");
    assert!(matches!(
        c.accept_plan("b", old, &[]),
        Err(PlanRejected::Excluded(id)) if id == "a"
    ));
    let p = b.replan().unwrap().unwrap();
    assert!(p.stages.iter().all(|s| s.node_id != "a"));
    assert!(c.accept_plan("b", p, &[]).unwrap());
    // a hears it was left out: it stops leading.
    a.accuse("c", "a");
    assert!(!a.is_leader());
    assert_eq!(a.my_accusations(), Vec::<String>::new());
    assert_eq!(c.my_accusations(), vec!["a".to_string()]);
}

#[test]
fn after_a_split_heals_the_leader_plans_past_the_other_halfs_epoch() {
    let mut a = Membership::new(hello("a", 80), model(), PlanGoal::Latency);
    a.join(hello("b", 80), None);
    let first = a.replan().unwrap().unwrap();
    assert_eq!(first.epoch, 1);
    // b ran alone with its own leader for a while: epoch 5.
    let mut b = Membership::new(hello("b", 80), model(), PlanGoal::Latency);
    b.join(hello("c", 80), None);
    for _ in 0..5 {
        b.leave("c");
        assert!(b.replan().is_err(), "b alone cannot hold the model");
        b.join(hello("c", 80), None);
        b.replan().unwrap();
    }
    b.join(hello("a", 80), None);
    let b_epoch = b.plan().map_or(0, |p| p.epoch);
    assert!(b_epoch > 1);
    let load = protocol::LoadReport {
        epoch: b_epoch,
        ..Default::default()
    };
    assert!(a.set_load("b", load), "a replan is due");
    let next = a.replan().unwrap().expect("a new epoch, same stages");
    assert_eq!(next.stages, first.stages);
    assert!(next.epoch > b_epoch);
    assert!(b.accept_plan("a", next, &[]).unwrap());
    // A lying epoch cannot wrap the count.
    let lie = protocol::LoadReport {
        epoch: u64::MAX,
        ..Default::default()
    };
    a.set_load("b", lie);
    assert!(a.replan().unwrap().unwrap().epoch < u64::MAX / 2);
}
