//! Writes the random-weight fixture model of an architecture:
//! `cargo run -p shoal-tests --example synth -- ARCH OUT.gguf`
//! (used by `tests/fixtures/arch/make.sh`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [arch, out] = args.as_slice() else {
        eprintln!("usage: synth ARCH OUT.gguf");
        std::process::exit(2);
    };
    let Some(spec) = shoal_tests::synth::fixture_spec(arch) else {
        eprintln!("no fixture spec for architecture '{arch}'");
        std::process::exit(2);
    };
    if let Err(e) = shoal_tests::synth::write_synthetic_gguf(std::path::Path::new(out), &spec) {
        eprintln!("{out}: {e}");
        std::process::exit(1);
    }
}
