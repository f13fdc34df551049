//! Fuzzing of every parser that reads bytes from a peer, a file or a
//! client: frames (decode + validation), GGUF headers, the tokenizer, chat
//! templates and the HTTP request bodies. Stable Rust, no libFuzzer: each
//! target mutates valid seeds (bit flips, random bytes, interesting
//! integers, inserted, deleted and repeated ranges, truncation) with a
//! seeded RNG, runs the parser under `catch_unwind`, and a counting
//! allocator records the largest single allocation, held to a limit per
//! target. `SHOAL_FUZZ_INPUTS` sets the inputs per target (a short run
//! here; `bench/fuzz.sh` runs 10⁶); `SHOAL_FUZZ_SEED` the RNG seed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Largest single allocation since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A parser under test.
type Run<'a> = Box<dyn Fn(&[u8]) + 'a>;

/// One target: seeds, the parser, the allocation limit.
struct Target<'a> {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    run: Run<'a>,
    /// Largest single allocation allowed, given the input's length.
    limit: fn(usize) -> usize,
}

/// What a run found.
#[derive(Debug)]
struct Report {
    inputs: u64,
    panics: u64,
    largest_alloc: usize,
    over_limit: u64,
}

fn inputs() -> u64 {
    std::env::var("SHOAL_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.random_range(1..=8) {
        let len = v.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = rng.random();
            }
            2 if len >= 4 => {
                // An interesting integer at a random offset: lengths and
                // counts are where parsers trust their input.
                let i = rng.random_range(0..=len - 4);
                let x: u32 = [0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, u32::MAX, 1 << 20]
                    [rng.random_range(0..8)];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            3 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..64)).min(len);
                v.drain(a..b);
            }
            5 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..32)).min(len);
                let piece = v[a..b].to_vec();
                let at = rng.random_range(0..=v.len());
                v.splice(at..at, piece);
            }
            6 if len > 0 => v.truncate(rng.random_range(0..len)),
            _ => {
                if len >= 8 {
                    let i = rng.random_range(0..=len - 8);
                    let x: u64 = [u64::MAX, 1 << 40, 1 << 62][rng.random_range(0..3)];
                    v[i..i + 8].copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    v
}

/// Serialises runs: the allocation high-water mark is process-wide.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Holds the process to one target, setup included (the high-water mark
/// would count another test's allocations).
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn fuzz(t: &Target<'_>) -> Report {
    let seed = std::env::var("SHOAL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let n = inputs();
    let mut report = Report {
        inputs: n,
        panics: 0,
        largest_alloc: 0,
        over_limit: 0,
    };
    // Panics are counted, not printed a million times.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..n {
        let base = &t.seeds[i as usize % t.seeds.len()];
        let input = if i < t.seeds.len() as u64 {
            base.clone()
        } else {
            mutate(&mut rng, base)
        };
        LARGEST.store(0, Ordering::Relaxed);
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(&input)));
        let largest = LARGEST.load(Ordering::Relaxed);
        report.largest_alloc = report.largest_alloc.max(largest);
        if largest > (t.limit)(input.len()) {
            report.over_limit += 1;
            if report.over_limit == 1 {
                let path = std::env::temp_dir().join(format!("shoal-fuzz-{}-alloc.bin", t.name));
                let _ = std::fs::write(&path, &input);
                eprintln!(
                    "{}: {largest} bytes for a {}-byte input, in {}",
                    t.name,
                    input.len(),
                    path.display()
                );
            }
        }
        if ok.is_err() {
            report.panics += 1;
            if report.panics == 1 {
                let path = std::env::temp_dir().join(format!("shoal-fuzz-{}.bin", t.name));
                let _ = std::fs::write(&path, &input);
                eprintln!("{}: first panic's input in {}", t.name, path.display());
            }
        }
    }
    std::panic::set_hook(hook);
    eprintln!(
        "fuzz {:<10} {:>9} inputs, {} panics, largest allocation {} bytes, {} over the limit",
        t.name, report.inputs, report.panics, report.largest_alloc, report.over_limit
    );
    report
}

fn check(t: Target<'_>) {
    let r = fuzz(&t);
    assert_eq!(r.panics, 0, "{}: {r:?}", t.name);
    assert_eq!(r.over_limit, 0, "{}: {r:?}", t.name);
}

#[test]
fn frames() {
    let _one = one_at_a_time();
    use protocol::*;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        node_id: "12D3KooWabc".into(),
        cluster: "office".into(),
        model_hash: [3; 32],
        capabilities: Capabilities {
            device: DeviceKind::Cpu,
            threads: 2,
            kernels: "avx2".into(),
            memory_bytes: 8 << 30,
            us_per_mib: 300.0,
            row_us_per_mib: 60.0,
            prompt_row_us_per_mib: 90.0,
            data_addr: "10.0.0.2:7000".into(),
            http_addr: "127.0.0.1:8080".into(),
            cert_fingerprint: [9; 32],
            addrs: vec!["/ip4/10.0.0.2/tcp/4001".into()],
            name: "n".into(),
        },
    };
    let msgs = [
        Message::Join(Join {
            version: PROTOCOL_VERSION,
            cluster: "office".into(),
            proof: [1; 32],
            sealed_hello: SealedHello {
                nonce: [5; 12],
                bytes: encode(&Message::Hello(hello.clone())).unwrap(),
            },
        }),
        Message::Hello(hello),
        Message::Cancel { request_id: 7 },
        Message::Tokens(Tokens {
            entries: vec![SampledToken {
                request_id: 7,
                position: 3,
                token: 42,
            }],
            logprobs: Vec::new(),
        }),
        Message::Activations(Activations {
            batch: vec![SeqRows {
                request_id: 7,
                position: 0,
                rows: 2,
                sample: true,
                draft: 0,
            }],
            dim: 4,
            dtype: DType::F32,
            payload: vec![0; 32],
            proposals: Vec::new(),
        }),
        Message::Input(Input {
            request_id: 1,
            position: 0,
            tokens: vec![1, 2, 3],
            sample: false,
            draft: 0,
        }),
        Message::ChunkQuery {
            index: 3,
            proof: [2; 32],
            nonce: [4; 32],
        },
    ];
    let seeds = msgs.iter().map(|m| encode(m).unwrap()).collect();
    check(Target {
        name: "frames",
        seeds,
        run: Box::new(|b| {
            let _ = decode(b);
        }),
        // Decoding may hold ~32 bytes per byte on the wire (by size class
        // of the body, see `protocol::frame::decode_body`); serde reserves
        // at most 1 MiB ahead for a list whatever its announced length.
        // Never megabytes for a few bytes.
        limit: |len| (len * 128).max(1 << 20) + 4096,
    });
}

#[test]
fn gguf_headers() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.gguf");
    let model = shoal_tests::default_model();
    // The real header (metadata, vocabulary, tensor index) and a small
    // synthetic model whole.
    let head: Vec<u8> = {
        use std::io::Read;
        let mut b = vec![0; 64 << 10];
        let mut f = std::fs::File::open(&model).unwrap();
        f.read_exact(&mut b).unwrap();
        b
    };
    let synth = dir.path().join("synth.gguf");
    shoal_tests::synth::write_synthetic_gguf(&synth, &shoal_tests::synth::SynthSpec::default())
        .unwrap();
    let small = std::fs::read(&synth).unwrap();
    check(Target {
        name: "gguf",
        seeds: vec![small, head],
        run: Box::new(|b| {
            std::fs::write(&path, b).unwrap();
            if let Ok(g) = sharding::GgufFile::open(&path) {
                let _ = sharding::ModelLayout::from_gguf(&g);
                let _ = engine::tokenizer::Tokenizer::from_gguf(&g);
            }
        }),
        // The header reader's 1 MiB buffer; everything else within the file.
        limit: |len| (1 << 20) + len * 64 + 65536,
    });
}

#[test]
fn tokenizer() {
    let _one = one_at_a_time();
    let g = sharding::GgufFile::open(shoal_tests::default_model()).unwrap();
    let tok = engine::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let seeds = [
        "Hello, world! <|im_start|>system\nhi<|im_end|>",
        "naïve café — 東京 🦀 \t\n  spaces",
        "1234567 + 89 = ?\r\n'll 've <s></s>",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    check(Target {
        name: "tokenizer",
        seeds,
        run: Box::new(|b| {
            let text = String::from_utf8_lossy(b);
            for special in [false, true] {
                if let Ok(ids) = tok.encode(&text, special, special) {
                    let _ = tok.decode(&ids);
                }
            }
            let half = std::ops::Range {
                start: 0,
                end: text.len() / 2,
            };
            let _ = tok.encode_with_literal(&text, false, std::slice::from_ref(&half));
        }),
        limit: |len| len * 64 + (1 << 20),
    });
}

#[test]
fn templates() {
    let _one = one_at_a_time();
    let seeds = [
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<start_of_turn>user\n{{ m.content | trim }}<end_of_turn>\n{% else %}{{ raise_exception('x') }}{% endif %}{% endfor %}",
        "{% set ns = namespace(x=0) %}{% for i in range(10) %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}{{ messages | tojson }}{{ strftime_now('%Y') }}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let msgs = vec![
        engine::chat::Message::new("system", "Be brief."),
        engine::chat::Message::new("user", "Hi <|im_start|>"),
    ];
    check(Target {
        name: "templates",
        seeds,
        run: Box::new(|b| {
            let src = String::from_utf8_lossy(b).into_owned();
            if let Ok(t) = engine::chat::ChatTemplate::new(src, "<s>".into(), "</s>".into()) {
                let _ = t.render(&msgs, true);
            }
        }),
        // The rendered output's cap, and the template within its size limit.
        limit: |len| engine::chat::RENDERED_BYTES_MAX * 2 + len * 64 + (1 << 20),
    });
}

#[test]
fn http_bodies() {
    let _one = one_at_a_time();
    let seeds = [
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true,"stop":["\n"],"temperature":0.5}"#,
        r#"{"model":"m","prompt":"Once","max_tokens":4,"seed":3,"top_p":0.9}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"options":{"num_predict":4,"stop":["x"]}}"#,
        r#"{"prompt":"hi","max_tokens":3,"temperature":0,"top_k":4}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    check(Target {
        name: "http",
        seeds,
        run: Box::new(|b| {
            for path in api::REQUEST_PATHS {
                let _ = api::check_body(path, b);
            }
        }),
        limit: |len| len * 64 + (1 << 20),
    });
}
