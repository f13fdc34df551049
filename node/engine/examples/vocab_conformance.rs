//! llama.cpp's own tokenizer conformance data (`models/ggml-vocab-*.gguf`
//! with `.inp`/`.out`, as its `tests/test-tokenizer-0.cpp` uses them), run
//! through shoal's tokenizer. Not a test: the data comes with llama.cpp's
//! source, which tests must not need. `bench/vocab-conformance.sh` finds it
//! and runs this:
//!
//! ```sh
//! cargo run --release -p shoal-engine --example vocab_conformance -- <llama.cpp>/models
//! ```

use engine::tokenizer::Tokenizer;

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: vocab_conformance <llama.cpp>/models");
        std::process::exit(2);
    };
    let mut failures = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "inp"))
    {
        let gguf_path = path.with_extension("");
        let name = gguf_path.display().to_string();
        let gguf = sharding::GgufFile::open(&gguf_path).expect("vocab gguf");
        let tok = match Tokenizer::from_gguf(&gguf) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skip {name}: {e}");
                continue;
            }
        };
        let inp = std::fs::read_to_string(path).expect("inputs");
        let out = std::fs::read_to_string(path.with_extension("out")).expect("outputs");
        let (mut ok, mut total) = (0, 0);
        for (text, want) in inp.split("\n__ggml_vocab_test__\n").zip(out.lines()) {
            let want: Vec<u32> = want
                .split_whitespace()
                .map(|t| t.parse().expect("token id"))
                .collect();
            let got = tok.encode(text, false, false).expect("encode");
            total += 1;
            // without clean_spaces, llama.cpp's detokenize gives the input back
            let round_trip = tok.cleans_spaces() || tok.decode(&got) == text;
            if got == want && round_trip {
                ok += 1;
            } else {
                failures.push(format!("{name}: {text:?}\n  want {want:?}\n  got  {got:?}"));
            }
        }
        println!("{name}: {ok}/{total}");
    }
    if !failures.is_empty() {
        eprintln!("{}", failures.join("\n"));
        std::process::exit(1);
    }
}
