//! Hybrid routing: requests leave for an upstream (here another shoal
//! cluster, a real OpenAI-compatible server) only where the policy allows,
//! never when marked private, and never without a policy.

use crate::prelude::*;

/// `POST url` with a JSON body and extra headers, by curl: status and body.
fn post(url: &str, body: &str, headers: &[&str]) -> (u16, String) {
    let mut args = vec![
        "-s",
        "-N",
        "-w",
        "\n%{http_code}",
        "-H",
        "Content-Type: application/json",
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.extend(["-d", body, url]);
    let out = std::process::Command::new("curl")
        .args(&args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Requests that reached `node` as their origin (finished or failed).
fn served(node: &NodeProc) -> u64 {
    let s = node.status();
    s["requests"]["finished"].as_u64().unwrap_or(0) + s["requests"]["failed"].as_u64().unwrap_or(0)
}

fn route<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["routing"]["routes"]
        .as_array()?
        .iter()
        .find(|r| r["route"] == name)
}

#[test]
fn requests_leave_for_an_upstream_only_where_the_policy_allows() {
    let _serial = serial();
    if !prerequisite("curl", shoal_tests::browser::tool("curl", "curl")) {
        return;
    }
    let model = default_model();
    let up_dir = tempfile::tempdir().unwrap();
    // The upstream: one node of its own cluster, with a longer context
    // than the office cluster's 512.
    let up_key = keyfile(up_dir.path(), "key");
    let model_arg = model.display().to_string();
    let up_args = [
        &["-m", &model_arg, "--cluster-key-file", &up_key][..],
        &LOOPBACK,
        &["-t", "1", "--ctx", "2048", "--max-memory", "1G"],
    ]
    .concat();
    let mut upstream = NodeProc::start_with_env(up_dir.path(), None, &up_args, &[]);
    wait_plan(&mut upstream, 1, 1);
    let up = format!("cloud={}/v1", upstream.http);
    let dir = tempfile::tempdir().unwrap();
    // Two nodes, neither able to hold the model alone: one stopped, no plan.
    let spill = ["--upstream", &up, "--spill", "no-plan,too-long"];
    let mut nodes = loopback_cluster(dir.path(), &model, 2, "80M", &spill);
    wait_plan(&mut nodes[0], 2, 2);
    let chat = r#"{"model":"smollm2:135m","messages":[{"role":"user","content":"Why is the sky blue?"}],"temperature":0,"max_tokens":16}"#;
    let stream = chat.replace("\"max_tokens\":16", "\"max_tokens\":16,\"stream\":true");
    let url = |n: &NodeProc| format!("{}/v1/chat/completions", n.http);
    let text = |body: &str| -> String {
        let v: Value = serde_json::from_str(body).expect(body);
        v["choices"][0]["message"]["content"]
            .as_str()
            .expect(body)
            .to_string()
    };
    let streamed = |body: &str| -> String {
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        body.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    };

    // With a plan, the cluster answers; the policy is shown.
    let (code, local) = post(&url(&nodes[0]), chat, &[]);
    assert_eq!(code, 200, "{local}");
    let local = text(&local);
    let s = nodes[0].status();
    let policy = s["routing"]["policy"].to_string();
    assert!(
        policy.contains("to cloud when the cluster has no plan"),
        "{policy}"
    );
    assert!(policy.contains("never requests marked private"), "{policy}");
    assert_eq!(route(&s, "local").unwrap()["requests"], 1, "{s}");
    assert_eq!(served(&upstream), 0);

    // A prompt over the local context goes upstream (the upstream holds it);
    // marked private it gets the cluster's own answer: context full.
    let long = chat.replace("Why is the sky blue?", &"Why is the sky blue? ".repeat(120));
    let (code, body) = post(&url(&nodes[0]), &long, &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(served(&upstream), 1, "the long prompt went upstream");
    let (code, body) = post(&url(&nodes[0]), &long, &["X-Shoal-Private: 1"]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("private"), "{body}");
    assert_eq!(served(&upstream), 1);

    // The other node stops: no plan, so requests go upstream — whole and
    // streamed, in the same shapes (the same model: the same greedy text).
    nodes[1].kill();
    nodes[0].wait_status(secs(30), |s| s["plan"].is_null());
    let (code, body) = post(&url(&nodes[0]), chat, &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(text(&body), local);
    let (code, body) = post(&url(&nodes[0]), &stream, &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(streamed(&body), local);
    assert_eq!(served(&upstream), 3, "the upstream answered both");

    // Marked private: refused instead, and the upstream never saw it.
    let (code, body) = post(&url(&nodes[0]), chat, &["X-Shoal-Private: true"]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("private"), "{body}");
    // Named upstream models need a 'named' rule.
    let named = chat.replace("smollm2:135m", "cloud/smollm2:135m");
    let (code, body) = post(&url(&nodes[0]), &named, &[]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no 'named' rule"), "{body}");
    std::thread::sleep(secs(1));
    assert_eq!(served(&upstream), 3, "a kept request reached the upstream");
    let s = nodes[0].status();
    let cloud = route(&s, "cloud").expect("the cloud route is counted");
    assert_eq!(
        (cloud["requests"].as_u64(), cloud["refused"].as_u64()),
        (Some(3), Some(3)),
        "{s}"
    );
    let metrics = nodes[0].try_get("/metrics").unwrap();
    assert!(
        metrics.contains("shoal_route_requests_total{route=\"cloud\"} 3"),
        "{metrics}"
    );
    // The upstream's models are listed under its name.
    let models = nodes[0].try_get("/v1/models").unwrap();
    assert!(models.contains("\"cloud/smollm2:135m\""), "{models}");

    // Without a policy nothing leaves: a node that cannot serve alone,
    // with the same upstream configured, answers its own 503.
    let lone_dir = tempfile::tempdir().unwrap();
    let mut lone =
        loopback_cluster(lone_dir.path(), &model, 1, "80M", &["--upstream", &up]).remove(0);
    lone.wait_status(secs(60), |s| !s["plan_error"].is_null());
    let (code, body) = post(&url(&lone), chat, &[]);
    assert_eq!(code, 503, "{body}");
    let (code, body) = post(&url(&lone), &named, &[]);
    assert_eq!(code, 503, "{body}");
    assert_eq!(served(&upstream), 3, "a request left without a policy");
    let policy = lone.status()["routing"]["policy"].to_string();
    assert!(policy.contains("nothing leaves this cluster"), "{policy}");
}
