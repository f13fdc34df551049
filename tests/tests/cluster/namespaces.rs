//! Real hosts in network namespaces: mDNS, `--peer` where multicast is
//! dropped, a slow link kept out of the plan.

use crate::prelude::*;

#[test]
fn namespaces_form_a_cluster_by_mdns_and_match_one_machine() {
    let _serial = serial();
    let Some(lan) = lan_or_skip(3) else { return };
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    // One host sends through a 50 Mbit/s token bucket.
    lan.limit_rate(2, "50mbit");
    let mut nodes: Vec<NodeProc> = (0..3)
        .map(|i| ns_node(dir.path(), &lan, i, &key, &m, &["--max-memory", "50M"]))
        .collect();
    let _logs = LogsOnFailure::of(&nodes.iter().collect::<Vec<_>>());
    let started = Instant::now();
    wait_plan(&mut nodes[0], 3, 3);
    let took = started.elapsed();
    assert!(took < secs(10), "cluster formed in {took:?}");
    // The shaped host measures its own links at the bucket's rate.
    nodes[2].wait_status(secs(10), |s| {
        let others = &s["nodes"].as_array().map_or(&[][..], |v| &v[1..]);
        !others.is_empty()
            && others.iter().all(|n| {
                n["link_mbit_s"]
                    .as_f64()
                    .is_some_and(|m| m > 5.0 && m < 80.0)
            })
    });
    assert_same_as_one_machine(&model, &[&nodes[1]]);
}

#[test]
fn peer_joins_where_multicast_is_dropped() {
    let _serial = serial();
    let Some(lan) = lan_or_skip(3) else { return };
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    for i in 0..3 {
        lan.drop_multicast(i);
    }
    let mut a = ns_node(dir.path(), &lan, 0, &key, &m, &["--max-memory", "80M"]);
    let a_addr = a.addr_on(&lan.ips[0]);
    let mut b = ns_node(
        dir.path(),
        &lan,
        1,
        &key,
        &m,
        &["--max-memory", "80M", "--peer", &a_addr],
    );
    // No --peer: with multicast dropped it must stay alone.
    let c = ns_node(dir.path(), &lan, 2, &key, &m, &["--max-memory", "80M"]);
    wait_plan(&mut b, 2, 2);
    let s = a.wait_status(secs(5), |s| plan_size(s).0 == 2);
    assert_eq!(plan_size(&s), (2, 2));
    // An absence: c must stay alone for a while (mDNS announces every
    // second), checked all along the window.
    let window = Instant::now() + secs(3);
    while Instant::now() < window {
        assert_eq!(
            plan_size(&c.status()).0,
            1,
            "mDNS got through: multicast was not dropped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let want = run_single(&model, SETTINGS[0], PROMPTS[0]);
    let (got, err, ok) = b.ask(SETTINGS[0], PROMPTS[0]);
    assert!(ok, "{err}");
    assert_eq!(got, want);
}

#[test]
fn a_slow_link_measured_on_the_data_plane_keeps_its_node_out_of_the_plan() {
    let _serial = serial();
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    // Four nodes, any three hold the model; the fourth is behind a relay
    // adding 20 ms (+ up to 4 ms jitter) to every datagram sent to it.
    let mut nodes = loopback_cluster(dir.path(), &model, 3, "50M", &[]);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let relay =
        shoal_tests::UdpRelay::start(target, Duration::from_millis(20), Duration::from_millis(4));
    let key = dir.path().join("key").display().to_string();
    let first = nodes[0].addr_on("127.0.0.1");
    let data = target.to_string();
    let advertise = relay.addr.to_string();
    let slow = loopback_node(
        dir.path(),
        &m,
        &key,
        &[
            "--max-memory",
            "50M",
            "--data",
            &data,
            "--data-advertise",
            &advertise,
            "--peer",
            &first,
        ],
    );
    let slow_http = slow.http.clone();
    let slow_entry = move |s: &Value| -> Option<Value> {
        s["nodes"]
            .as_array()?
            .iter()
            .find(|n| slow_http.ends_with(n["http"].as_str().unwrap_or("?")))
            .cloned()
    };
    let s = nodes[0].wait_status(secs(30), |s| {
        plan_size(s) == (4, 3)
            && slow_entry(s).is_some_and(|n| {
                n["layers"].is_null() && n["link_rtt_ms"].as_f64().is_some_and(|r| r >= 30.0)
            })
    });
    eprintln!("{s:#}");
    assert_same_as_one_machine(&model, &[&nodes[1]]);
    drop(relay);
}

#[test]
fn halves_of_a_split_network_each_serve_and_become_one_cluster_when_it_heals() {
    let _serial = serial();
    let Some(lan) = lan_or_skip(4) else { return };
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    // Any two hold the model.
    let mut nodes: Vec<NodeProc> = (0..4)
        .map(|i| ns_node(dir.path(), &lan, i, &key, &m, &["--max-memory", "80M"]))
        .collect();
    let _logs = LogsOnFailure::of(&nodes.iter().collect::<Vec<_>>());
    wait_plan_with(&mut nodes[0], 4, |s| s >= 2);
    let want = run_single(&model, SETTINGS[0], PROMPTS[0]);
    lan.split(&[2, 3]);
    // Each half plans on its own and answers as one machine.
    for i in [0, 2] {
        wait_plan_with(&mut nodes[i], 2, |s| s >= 1);
        let (got, err, ok) = nodes[i].ask(SETTINGS[0], PROMPTS[0]);
        assert!(ok, "half of node {i}: {err}");
        assert_eq!(got, want);
    }
    lan.heal();
    let healed = Instant::now();
    // One cluster, one plan (the same on every node), within seconds.
    let one = |s: &Value| plan_size(s).0 == 4 && !s["plan"].is_null();
    let summary = loop {
        let all: Vec<Value> = nodes.iter().map(|n| n.status()).collect();
        let first = &all[0]["plan"]["summary"];
        if all.iter().all(|s| one(s) && s["plan"]["summary"] == *first) {
            break first.clone();
        }
        assert!(
            healed.elapsed() < secs(15),
            "not one cluster {:?} after healing: {all:#?}",
            healed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (got, err, ok) = nodes[3].ask(SETTINGS[0], PROMPTS[0]);
    assert!(ok, "{err}");
    assert_eq!(got, want, "plan {summary}");
}
