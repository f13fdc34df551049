//! The `shoal` binary end to end: real model runs, stats lines, bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run shoal")
}

/// `shoal SUB -m <default model> ARGS...`
fn shoal_default(sub: &str, args: &[&str]) -> Output {
    let m = model();
    let mut all = vec![sub, "-m", m.to_str().unwrap()];
    all.extend_from_slice(args);
    shoal(&all)
}

/// `shoal run -m PATH hi`: what a user with a bad file would type.
fn run_hi(path: &std::path::Path) -> Output {
    shoal(&["run", "-m", path.to_str().unwrap(), "hi"])
}

fn model() -> PathBuf {
    shoal_tests::default_model()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A bad input: non-zero exit and a one-line error naming `needle`.
fn assert_clear_error(o: &Output, needle: &str) {
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(
        lines[0].contains(needle),
        "error should mention {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn greedy_completion_streams_and_reports_stats() {
    let o = shoal_default(
        "run",
        &[
            "--no-template",
            "--temp",
            "0",
            "-n",
            "16",
            "-t",
            "1",
            "--verbose",
            "The capital of France is",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "{}", stdout(&o));
    let last = stderr(&o).lines().last().unwrap_or_default().to_string();
    let re_ok = last.starts_with("prompt 5 tok, ")
        && last.contains(" tok/s | gen 16 tok, ")
        && last.contains(" | ttft ")
        && last.ends_with(" ms");
    assert!(re_ok, "stats line: {last:?}");
}

#[test]
fn chat_mode_reads_stdin_and_seeded_sampling_repeats() {
    let m = model();
    let run = |seed: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args([
                "run",
                "-m",
                m.to_str().unwrap(),
                "-n",
                "20",
                "--temp",
                "1.0",
                "--seed",
                seed,
                "-t",
                "1",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"Write a haiku about the sea.")
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let a = run("7");
    assert!(!a.trim().is_empty());
    assert_eq!(a, run("7"));
}

#[test]
fn missing_file() {
    assert_clear_error(
        &run_hi(std::path::Path::new("/no/such/model.gguf")),
        "/no/such/model.gguf",
    );
}

#[test]
fn not_a_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("readme.gguf");
    std::fs::write(&p, "# just text, not a model\n").unwrap();
    assert_clear_error(&run_hi(&p), "not a GGUF file");
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.gguf");
    let bytes = std::fs::read(model()).unwrap();
    // Cut inside the tensor data: the header parses, the last tensors are missing.
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_clear_error(&run_hi(&p), "truncated");
    // Cut inside the header (the vocabulary).
    std::fs::write(&p, &bytes[..100_000]).unwrap();
    assert_clear_error(&run_hi(&p), "truncated");
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mamba.gguf");
    let spec = shoal_tests::synth::SynthSpec {
        architecture: "mamba".into(),
        n_layers: 1,
        ..Default::default()
    };
    shoal_tests::synth::write_synthetic_gguf(&p, &spec).unwrap();
    assert_clear_error(&run_hi(&p), "unsupported model architecture 'mamba'");
}

#[test]
fn prompt_longer_than_context() {
    let long = "word ".repeat(200);
    let o = shoal_default("run", &["--ctx", "64", "--no-template", &long]);
    assert_clear_error(&o, "context full");
}

#[test]
fn bad_flags_are_rejected() {
    let o = shoal_default("run", &["--top-p", "0", "hi"]);
    assert_clear_error(&o, "top_p");
}

#[test]
fn perplexity_prints_final_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    let para = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. ";
    std::fs::write(&text, para.repeat(12)).unwrap();
    let o = shoal_default(
        "perplexity",
        &["-f", text.to_str().unwrap(), "--ctx", "64", "-t", "1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("Final estimate: PPL = "))
        .expect(&out);
    let ppl: f64 = line["Final estimate: PPL = ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Repeated text becomes very predictable.
    assert!(ppl > 1.0 && ppl < 20.0, "{line}");
}

#[test]
fn bench_json_has_llama_bench_fields() {
    let o = shoal_default(
        "bench",
        &["-t", "1", "-p", "16", "-n", "4", "-r", "1", "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        for k in ["n_prompt", "n_gen", "n_threads", "avg_ts"] {
            assert!(r.get(k).is_some(), "missing {k} in {r}");
        }
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(rows[0]["n_prompt"], 16);
    assert_eq!(rows[1]["n_gen"], 4);
}

#[test]
fn resident_memory_after_load_stays_near_file_size() {
    let o = shoal_default(
        "run",
        &[
            "--no-template",
            "--temp",
            "0",
            "-n",
            "1",
            "-t",
            "1",
            "--verbose",
            "Hi",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let line = err.lines().find(|l| l.starts_with("memory: ")).expect(&err);
    let rss: f64 = line
        .split("rss ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let file_mib = std::fs::metadata(model()).unwrap().len() as f64 / (1 << 20) as f64;
    assert!(
        rss <= 1.3 * file_mib,
        "rss {rss} MiB for a {file_mib:.1} MiB model: {line}"
    );
}

#[test]
fn demo_starts_a_local_cluster_answers_and_prints_the_status_page() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = shoal_default(
        "demo",
        &[
            "--nodes",
            "2",
            "--port",
            &port.to_string(),
            "--exit",
            "--temp",
            "0",
            "-n",
            "8",
            "Hi",
        ],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
    assert!(err.contains("cluster formed"), "{err}");
    assert!(
        err.contains(&format!("status page: http://127.0.0.1:{port}/")),
        "{err}"
    );
}

#[test]
fn models_are_listed_and_found_by_the_names_people_use() {
    let path = model();
    let list = shoal(&["list", "--json"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let listed = stdout(&list);
    assert!(
        listed.contains(r#""name":"smollm2:135m""#) && listed.contains(r#""quantization":"Q4_1""#),
        "{listed}"
    );
    let args = [
        "--temp",
        "0",
        "-n",
        "8",
        "--no-template",
        "-t",
        "1",
        "Once upon a time",
    ];
    let by_name = shoal(&[&["run", "-m", "smollm2:135m"][..], &args].concat());
    let by_path = shoal(&[&["run", "-m", path.to_str().unwrap()][..], &args].concat());
    assert!(by_name.status.success(), "{}", stderr(&by_name));
    assert_eq!(stdout(&by_name), stdout(&by_path));
    // A name no one has: one line saying what there is.
    let o = shoal(&["run", "-m", "qwen2.5:0.5b", "hi"]);
    assert_clear_error(&o, "qwen2.5:0.5b");
    assert!(stderr(&o).contains("smollm2:135m"), "{}", stderr(&o));
}

#[test]
fn config_file_settings_sit_under_environment_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    let with = |text: &str, args: &[&str], env: &[(&str, &str)]| {
        std::fs::write(&file, text).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
        c.args(args)
            .env("SHOAL_CONFIG", &file)
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    // A setting of the file reaches the node...
    let o = with("ctx = 8\n", &["node"], &[]);
    assert_clear_error(&o, "--ctx must be at least 16");
    // ... under the environment and the flags.
    let o = with(
        "ctx = 8\n",
        &["node"],
        &[("SHOAL_CTX", "32"), ("SHOAL_HTTP", "0.0.0.0:0")],
    );
    assert_clear_error(&o, "would be open to anyone");
    let o = with(
        "ctx = 8\n",
        &["node", "--ctx", "32", "--http", "0.0.0.0:0"],
        &[],
    );
    assert_clear_error(&o, "would be open to anyone");
    // An unknown setting is named, with the known ones.
    let o = with("max_memroy = \"1G\"\n", &["status"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown setting 'max_memroy'") && stderr(&o).contains("max-memory"),
        "{}",
        stderr(&o)
    );
    // SHOAL_HOST, as OLLAMA_HOST: host:port is enough.
    let o = with("", &["status"], &[("SHOAL_HOST", "127.0.0.1:9")]);
    assert!(stderr(&o).contains("http://127.0.0.1:9"), "{}", stderr(&o));
}

#[test]
fn shell_completions_name_the_subcommands_and_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let o = shoal(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let text = stdout(&o);
        assert!(
            text.contains("max-memory") && text.contains("list"),
            "{shell}"
        );
    }
}

#[test]
fn run_with_a_schema_answers_valid_json_and_a_bad_schema_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","properties":{"colour":{"enum":["red","blue"]},"n":{"type":"integer","minimum":1,"maximum":9}},"required":["colour","n"],"additionalProperties":false}"#,
    )
    .unwrap();
    let s = schema.to_str().unwrap();
    for seed in ["1", "2"] {
        let o = shoal_default(
            "run",
            &[
                "--format",
                s,
                "--temp",
                "0.8",
                "--seed",
                seed,
                "-n",
                "60",
                "Pick a colour.",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
        assert!(
            ["red", "blue"].contains(&v["colour"].as_str().unwrap()),
            "{v}"
        );
        assert!((1..=9).contains(&v["n"].as_i64().unwrap()), "{v}");
    }
    std::fs::write(&schema, r#"{"type":"nonsense"}"#).unwrap();
    let o = shoal_default("run", &["--format", s, "hi"]);
    assert_clear_error(&o, "invalid grammar");
}
