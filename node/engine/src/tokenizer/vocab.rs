//! Building a [`Tokenizer`] from GGUF metadata: reading the `tokenizer.ggml.*` keys, then
//! llama.cpp's `llama_vocab::impl::load` step by step.
//!
//! Why so literal: besides the token list, llama.cpp derives state that changes token ids and
//! output text: defaults per vocab type and `pre` name, special ids validated against the vocab,
//! end-of-generation tokens and control attributes detected by token *text*, a few model-name
//! quirks, and the order in which special tokens are matched. Each step below names the
//! llama.cpp behaviour it reproduces.

use std::collections::{BTreeSet, HashMap};

use sharding::{GgufFile, Value};

use super::pretokenize::{pre_flags, pre_tokenizer_regexes, FALLBACK, UNSUPPORTED};
use super::{attr, bpe, spm, Algorithm, Tokenizer, TokenizerError, TokenizerParts, Vocab};
use super::{SpecialIds, MAX_VOCAB_TOKENS};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// Texts llama.cpp takes as the EOT token when no id is given.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<\u{FF5C}end\u{2581}of\u{2581}sentence\u{FF5C}>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<\u{FF5C}fim\u{2581}begin\u{FF5C}>",
    "<PRE>",
    "\u{2581}<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<\u{FF5C}fim\u{2581}hole\u{FF5C}>",
    "<SUF>",
    "\u{2581}<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<\u{FF5C}fim\u{2581}end\u{FF5C}>",
    "<MID>",
    "\u{2581}<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts llama.cpp always treats as end of generation (and forces to control).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{FF5C}end\u{2581}of\u{2581}sentence\u{FF5C}>",
    "[e~[",
];
/// gpt-oss tokens llama.cpp always renders (forced to user-defined).
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

fn invalid(key: &'static str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidKey {
        key,
        reason: reason.into(),
    }
}

fn get_str(g: &GgufFile, key: &'static str) -> Result<Option<String>, TokenizerError> {
    g.get(key)
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid(key, "not a string"))
        })
        .transpose()
}

fn get_bool(g: &GgufFile, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    g.get(key)
        .map(|v| v.as_bool().ok_or_else(|| invalid(key, "not a bool")))
        .transpose()
}

/// An id key; a negative or non-integer value counts as absent (llama.cpp reads it as u32).
fn get_id(g: &GgufFile, key: &'static str) -> Option<u64> {
    g.get(key).and_then(Value::as_u64)
}

fn get_array<T>(
    g: &GgufFile,
    key: &'static str,
    what: &str,
    f: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>, TokenizerError> {
    let Some(value) = g.get(key) else {
        return Ok(None);
    };
    let items = value
        .as_array()
        .ok_or_else(|| invalid(key, "not an array"))?;
    if items.len() > MAX_VOCAB_TOKENS * 4 {
        return Err(invalid(key, format!("{} entries is too many", items.len())));
    }
    let out: Option<Vec<T>> = items.iter().map(f).collect();
    out.map(Some)
        .ok_or_else(|| invalid(key, format!("not an array of {what}")))
}

/// Reads the tokenizer metadata of a GGUF.
pub(super) fn parts_from_gguf(g: &GgufFile) -> Result<TokenizerParts, TokenizerError> {
    let model = get_str(g, KEY_MODEL)?.ok_or(TokenizerError::MissingKey(KEY_MODEL))?;
    let tokens = get_array(g, KEY_TOKENS, "strings", |v| v.as_str().map(str::to_owned))?
        .ok_or(TokenizerError::MissingKey(KEY_TOKENS))?;
    let merges = get_array(g, KEY_MERGES, "strings", |v| v.as_str().map(str::to_owned))?;
    if model == "gpt2" && merges.is_none() {
        return Err(TokenizerError::MissingKey(KEY_MERGES));
    }
    let id = |key| get_id(g, key);
    Ok(TokenizerParts {
        model,
        pre: get_str(g, KEY_PRE)?,
        tokens,
        scores: get_array(g, KEY_SCORES, "numbers", |v| v.as_f64().map(|x| x as f32))?,
        token_types: get_array(g, KEY_TOKEN_TYPE, "integers", |v| {
            v.as_i64().and_then(|x| i32::try_from(x).ok())
        })?,
        merges,
        ids: SpecialIds {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            eot: id("tokenizer.ggml.eot_token_id"),
            eom: id("tokenizer.ggml.eom_token_id"),
            unk: id("tokenizer.ggml.unknown_token_id"),
            // the deprecated prefix/suffix/middle keys win, as they come later in llama.cpp
            fim_pre: id("tokenizer.ggml.prefix_token_id").or(id("tokenizer.ggml.fim_pre_token_id")),
            fim_suf: id("tokenizer.ggml.suffix_token_id").or(id("tokenizer.ggml.fim_suf_token_id")),
            fim_mid: id("tokenizer.ggml.middle_token_id").or(id("tokenizer.ggml.fim_mid_token_id")),
            fim_pad: id("tokenizer.ggml.fim_pad_token_id"),
            fim_rep: id("tokenizer.ggml.fim_rep_token_id"),
            fim_sep: id("tokenizer.ggml.fim_sep_token_id"),
        },
        add_bos: get_bool(g, KEY_ADD_BOS)?,
        add_eos: get_bool(g, KEY_ADD_EOS)?,
        add_space_prefix: get_bool(g, KEY_ADD_PREFIX)?,
        model_name: get_str(g, "general.name").ok().flatten(),
        arch: get_str(g, "general.architecture").ok().flatten(),
    })
}

/// llama.cpp's token-type → attribute mapping.
fn attr_of_type(t: i32) -> u32 {
    match t {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => 0,
    }
}

/// Token texts, duplicates refused, empty texts renamed `[EMPTY_i]` as llama.cpp does.
fn build_vocab(p: &mut TokenizerParts) -> Result<Vocab, TokenizerError> {
    let n = p.tokens.len();
    if n == 0 || n > MAX_VOCAB_TOKENS {
        let reason = format!("{n} tokens (expected 1..={MAX_VOCAB_TOKENS})");
        return Err(TokenizerError::InvalidVocab(reason));
    }
    let mut texts = std::mem::take(&mut p.tokens);
    let mut ids = HashMap::with_capacity(n);
    for (i, text) in texts.iter_mut().enumerate() {
        if text.is_empty() {
            *text = format!("[EMPTY_{i}]");
        }
        let id = i as u32; // n <= MAX_VOCAB_TOKENS < u32::MAX
        if let Some(first) = ids.insert(text.clone(), id) {
            let (text, second) = (text.clone(), id);
            return Err(TokenizerError::DuplicateToken {
                text,
                first,
                second,
            });
        }
    }
    let scores = match p.scores.take() {
        Some(s) if s.len() < n => {
            return Err(invalid(
                KEY_SCORES,
                format!("{} scores for {n} tokens", s.len()),
            ))
        }
        Some(s) => s,
        None => vec![0.0; n],
    };
    let attrs = match p.token_types.take() {
        Some(t) if t.len() < n => {
            return Err(invalid(
                KEY_TOKEN_TYPE,
                format!("{} types for {n} tokens", t.len()),
            ))
        }
        Some(t) => t.iter().take(n).map(|&t| attr_of_type(t)).collect(),
        None => vec![attr::NORMAL; n],
    };
    Ok(Vocab {
        texts,
        scores,
        attrs,
        ids,
    })
}

/// llama.cpp's rule for a special id: the GGUF's id if in range, else the default if in range.
fn resolve(default: Option<u32>, given: Option<u64>, n: usize) -> Option<u32> {
    match given {
        Some(g) if g < n as u64 => u32::try_from(g).ok(),
        _ => default.filter(|&d| (d as usize) < n),
    }
}

/// What the tokenizer model type implies before the GGUF's own keys.
struct Defaults {
    /// SentencePiece (`llama`) rather than byte-level BPE (`gpt2`).
    is_spm: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_space_prefix: bool,
    add_bos: bool,
    clean_spaces: bool,
    /// BPE only: pre-tokenizer regexes and whether merges are ignored.
    bpe_config: Option<(&'static [&'static str], bool)>,
}

/// The defaults of `p`'s tokenizer model and pre-tokenizer (llama.cpp's).
fn defaults(p: &TokenizerParts) -> Result<Defaults, TokenizerError> {
    let is_spm = match p.model.as_str() {
        "llama" => true,
        "gpt2" => false,
        other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
    };
    if is_spm {
        return Ok(Defaults {
            is_spm,
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            add_space_prefix: true,
            add_bos: true,
            clean_spaces: false,
            bpe_config: None,
        });
    }
    let pre = p.pre.clone().unwrap_or_default();
    if UNSUPPORTED.contains(&pre.as_str()) {
        return Err(TokenizerError::UnsupportedPre(pre));
    }
    let flags = pre_flags(&pre);
    let regexes = pre_tokenizer_regexes(&pre).unwrap_or(FALLBACK);
    Ok(Defaults {
        is_spm,
        bos: (!flags.no_default_bos).then_some(11),
        eos: Some(11),
        unk: None,
        add_space_prefix: false,
        add_bos: flags.add_bos,
        clean_spaces: flags.clean_spaces,
        bpe_config: Some((regexes, flags.ignore_merges)),
    })
}

/// Builds the tokenizer (llama.cpp `llama_vocab::impl::load`, in order).
pub(super) fn build(mut p: TokenizerParts) -> Result<Tokenizer, TokenizerError> {
    let d = defaults(&p)?;
    let add_space_prefix = p.add_space_prefix.unwrap_or(d.add_space_prefix);
    let mut vocab = build_vocab(&mut p)?;
    let n = vocab.texts.len();
    let ids = std::mem::take(&mut p.ids);
    let bos = resolve(d.bos, ids.bos, n);
    let eos = resolve(d.eos, ids.eos, n);
    let unk = resolve(d.unk, ids.unk, n);
    let add_bos = p.add_bos.unwrap_or(d.add_bos);
    let add_eos = p.add_eos.unwrap_or(false);
    if add_bos && bos.is_none() {
        let reason = format!("{KEY_ADD_BOS} is true, but tokenizer.ggml.bos_token_id is not set");
        return Err(TokenizerError::InvalidVocab(reason));
    }
    if add_eos && eos.is_none() {
        let reason = format!("{KEY_ADD_EOS} is true, but tokenizer.ggml.eos_token_id is not set");
        return Err(TokenizerError::InvalidVocab(reason));
    }
    let (eot, eog) = end_of_generation(&mut vocab, &ids, eos);
    let special_cache = special_cache(&vocab);
    let pieces = (0..n)
        .map(|id| piece(&vocab, d.is_spm, id).into_boxed_slice())
        .collect();
    apply_model_quirks(&mut vocab, &special_cache, &p);
    let algorithm = match d.bpe_config {
        None => Algorithm::Spm,
        Some((regexes, ignore_merges)) => {
            let merges = p.merges.as_deref().unwrap_or(&[]);
            let engine = bpe::BpeEngine::new(&vocab, merges, regexes, ignore_merges)?;
            // The engine holds its own text -> id map: a second one would
            // cost ~4 MB of resident memory for nothing.
            vocab.ids = HashMap::new();
            Algorithm::Bpe(Box::new(engine))
        }
    };
    Ok(Tokenizer {
        vocab,
        algorithm,
        bos,
        eos,
        eot,
        unk,
        add_bos,
        add_eos,
        add_space_prefix,
        clean_spaces: d.clean_spaces,
        eog,
        special_cache,
        pieces,
    })
}

/// The end-of-turn token and every end-of-generation token: the GGUF's
/// ids, then tokens recognised by their text (marked as control), with
/// llama.cpp's exceptions. Returns (eot, eog).
fn end_of_generation(
    vocab: &mut Vocab,
    ids: &SpecialIds,
    eos: Option<u32>,
) -> (Option<u32>, BTreeSet<u32>) {
    let n = vocab.texts.len();
    let mut eot = resolve(None, ids.eot, n);
    let mut eom = resolve(None, ids.eom, n);
    // Special tokens recognised by their text (llama.cpp iterates a hash map; here ids
    // ascend, which only matters when a vocab has two candidates for the same role).
    let mut fim_pad = resolve(None, ids.fim_pad, n);
    let mut fim_rep = resolve(None, ids.fim_rep, n);
    let mut fim_sep = resolve(None, ids.fim_sep, n);
    let mut fim_pre = resolve(None, ids.fim_pre, n);
    let mut fim_suf = resolve(None, ids.fim_suf, n);
    let mut fim_mid = resolve(None, ids.fim_mid, n);
    for id in 0..n {
        let text = vocab.texts[id].as_str();
        for (slot, list) in [
            (&mut eot, EOT_TEXTS),
            (&mut eom, EOM_TEXTS),
            (&mut fim_pre, FIM_PRE_TEXTS),
            (&mut fim_suf, FIM_SUF_TEXTS),
            (&mut fim_mid, FIM_MID_TEXTS),
            (&mut fim_pad, FIM_PAD_TEXTS),
            (&mut fim_rep, FIM_REP_TEXTS),
            (&mut fim_sep, FIM_SEP_TEXTS),
        ] {
            if slot.is_none() && list.contains(&text) {
                *slot = Some(id as u32);
                vocab.attrs[id] |= attr::CONTROL;
            }
        }
    }
    // control tokens named "unused" are unused
    for (text, a) in vocab.texts.iter().zip(vocab.attrs.iter_mut()) {
        if *a & attr::CONTROL != 0 && text.contains("unused") {
            *a |= attr::UNUSED;
        }
    }
    let mut eog: BTreeSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
    for id in 0..n {
        let text = vocab.texts[id].as_str();
        if EOG_TEXTS.contains(&text) {
            eog.insert(id as u32);
            vocab.attrs[id] |= attr::CONTROL;
        }
        if ALWAYS_RENDERED.contains(&text) {
            vocab.attrs[id] = attr::USER_DEFINED;
        }
    }
    eog.extend([eos, eot, eom].into_iter().flatten());
    eog_exceptions(vocab, &mut eog);
    (eot, eog)
}

/// llama.cpp's exceptions to end-of-generation by text.
fn eog_exceptions(vocab: &mut Vocab, eog: &mut BTreeSet<u32>) {
    let find_eog = |eog: &BTreeSet<u32>, text: &str| -> Option<u32> {
        eog.iter()
            .copied()
            .find(|&id| vocab.texts[id as usize] == text)
    };
    // harmony / solar-open: "<|end|>" is not EOG when "<|return|>"/"<|call|>" or "<|calls|>"/"<|flush|>" are
    let has = |t: &str| find_eog(eog, t).is_some();
    let harmony = has("<|return|>") && has("<|call|>") || has("<|calls|>") && has("<|flush|>");
    if let Some(end) = find_eog(eog, "<|end|>").filter(|_| harmony) {
        eog.remove(&end);
        vocab.attrs[end as usize] = attr::USER_DEFINED;
    }
    // gemma4 / paddleocr: "</s>" is not EOG when "<|tool_response>" is
    if let Some(s) = find_eog(eog, "</s>").filter(|_| find_eog(eog, "<|tool_response>").is_some()) {
        eog.remove(&s);
        vocab.attrs[s as usize] = attr::NORMAL;
    }
}

/// Control, user-defined and unknown tokens, longest text first.
fn special_cache(vocab: &Vocab) -> Vec<u32> {
    let special = attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN;
    let mut cache: Vec<u32> = (0..vocab.texts.len() as u32)
        .filter(|&id| vocab.attrs[id as usize] & special != 0)
        .collect();
    cache.sort_by(|&a, &b| {
        vocab.texts[b as usize]
            .len()
            .cmp(&vocab.texts[a as usize].len())
    });
    cache
}

/// llama.cpp `token_to_piece(id, special = false)` without the leading-space strip.
fn piece(vocab: &Vocab, is_spm: bool, id: usize) -> Vec<u8> {
    let (a, text) = (vocab.attrs[id], vocab.texts[id].as_str());
    if a & (attr::CONTROL | attr::UNKNOWN) != 0 {
        Vec::new()
    } else if a & attr::USER_DEFINED != 0 {
        text.as_bytes().to_vec()
    } else if a & attr::NORMAL != 0 {
        if is_spm {
            spm::unescape(text)
        } else {
            bpe::byte_level_decode(text)
        }
    } else if a & attr::BYTE != 0 {
        // "<0xXX>": llama.cpp parses text[3..5] as hex
        text.get(3..5)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .map(|b| vec![b])
            .unwrap_or_default()
    } else {
        Vec::new() // unused and undefined tokens render as nothing
    }
}

/// Per-model token attributes llama.cpp sets by name (it has no GGUF field for them).
fn apply_model_quirks(vocab: &mut Vocab, special_cache: &[u32], p: &TokenizerParts) {
    let name = p.model_name.as_deref().unwrap_or("").to_ascii_lowercase();
    let pre = p.pre.as_deref().unwrap_or("");
    let arch = p.arch.as_deref().unwrap_or("");
    let any = |s: &str, list: &[&str]| list.iter().any(|x| s.contains(x));
    if any(pre, &["jina-v2-de", "jina-v2-es", "jina-v2-code"])
        || any(arch, &["nomic-bert-moe", "jina-bert-v3"])
    {
        set_attr(vocab, "<mask>", attr::LSTRIP, true);
    } else if any(&name, &["phi-3", "phi3"]) {
        for &id in special_cache {
            vocab.attrs[id as usize] |= attr::RSTRIP;
        }
        set_attr(vocab, "</s>", attr::RSTRIP, true);
        for t in ["<unk>", "<s>", "<|endoftext|>"] {
            set_attr(vocab, t, attr::RSTRIP, false);
        }
    } else if name.contains("modern-bert") {
        set_attr(vocab, "[MASK]", attr::LSTRIP, true);
    }
}

/// Sets or clears an attribute bit of the token whose text is `text`, if there is one.
fn set_attr(vocab: &mut Vocab, text: &str, bit: u32, on: bool) {
    if let Some(&id) = vocab.ids.get(text) {
        let a = &mut vocab.attrs[id as usize];
        *a = if on { *a | bit } else { *a & !bit };
    }
}
