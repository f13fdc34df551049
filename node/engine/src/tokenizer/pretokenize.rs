//! Pre-tokenizer regexes of byte-level BPE vocabularies, keyed by the GGUF's
//! `tokenizer.ggml.pre`, plus the per-name tokenizer flags llama.cpp sets with them.
//!
//! Why a table: the GGUF stores only the *name* of the pre-tokenizer; the regexes live in
//! llama.cpp's `llm_tokenizer_bpe` constructor (src/llama-vocab.cpp) and the flags
//! (`ignore_merges`, `clean_spaces`, default `add_bos`) in `llama_vocab::impl::load`. Token ids
//! must equal llama.cpp's, so both are transcribed here (from commit 00ad355e0).
//!
//! How a list is applied (llama.cpp `unicode_regex_split`): start with one piece, the whole text;
//! for each regex in order, split every current piece separately (the piece is the whole
//! haystack, so `(?!\S)` and `$` stop at the piece end), keeping both the matches and the
//! unmatched gaps ("Isolated"); empty pieces produce nothing. Each final piece is then
//! byte-encoded (GPT-2 `bytes_to_unicode`) and BPE-merged on its own.
//!
//! Regexes using `\p{..}` run in llama.cpp on a "collapsed" text (one byte per category for
//! non-ASCII code points) and the others on `std::wregex` (ASCII `\d`, `\b`); where that differs
//! from Rust regex semantics the string is rewritten to reproduce llama.cpp (marked REWRITTEN).
//! Not covered (see [`UNSUPPORTED`]): "youtu", "afmoe" (non-ASCII classes / custom digit code)
//! and the non-byte-level "gemma4", "granite-embed-multi-311m", "sarvam-moe", "whitespace".
//! "gpt2" is not a llama.cpp pre name (it is the model name), so it counts as unknown.

// GPT-2 regex. llama.cpp recognises this exact string and runs a hand-written splitter
// (`unicode_regex_split_custom_gpt2`) that behaves like this regex followed by `|\s+`;
// because unmatched gaps are kept as pieces, the regex alone gives the same pieces.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

// Llama-3 regex with `(?i:...)` spelled out. llama.cpp recognises this exact string and runs
// `unicode_regex_split_custom_llama3`, which is equivalent.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// Qwen2 regex (like LLAMA3 but single digits). Runs through std::regex in llama.cpp.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const JAIS2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}";

// llama.cpp's rewrite of the Tekken regex: `(?=[\p{L}])([^a-z])` stands in for
// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]` and `(?=[\p{L}])([^A-Z])` for `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`
// (so non-ASCII letters count as both cases, marks count as neither). Valid as-is in fancy-regex;
// the equivalent lookaround-free classes are `[\p{L}--a-z]` / `[\p{L}--A-Z]`.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// llama.cpp's rewrite of the GPT-4o (o200k) regex; same lookahead trick as TEKKEN
// (`[\p{L}--a-z]` / `[\p{L}--A-Z]` are equivalent lookaround-free forms).
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const GRANITE_EMB_MULTI: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";

// llama.cpp turned the original possessive `?+` / `++` into greedy `?` / `+`.
const BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

const UFAKZEKA: &str =
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const EXAONE_MOE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+";

const MINICPM5_MAIN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// Third regex of deepseek-v3 & co. REWRITTEN: `--~` added to the two classes with `\p{S}`.
// llama.cpp's collapsed-text emulation of `\p{S}` covers only ASCII `$+<=>^`|` (no `~`), so `~`
// is neither P nor S there. Verbatim llama.cpp source literal:
// "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
const DEEPSEEK3_MAIN: &str = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}--~]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}--~]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";

// Third regex of spark2_5; same `--~` rewrite as DEEPSEEK3_MAIN. Verbatim llama.cpp source literal(s):
// "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+"
const SPARK2_5_MAIN: &str = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}--~]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}--~]+|[\r\n]|\\s+(?!\\S)|\\s+";

// NOT a llama.cpp string. llama.cpp uses the trigger regex `\p{Han}+`, which dispatches to the
// hand-written `unicode_regex_split_custom_kimi_k2`; this single regex reproduces that code:
// Han = exactly the CJK blocks of `unicode_cpt_is_han` (not the Unicode Han script), other
// letters = any `\p{L}` (no `\p{M}`, no upper/lower distinction), contractions case-insensitive.
const KIMI_K2_EMULATED: &str = r"[\x{3400}-\x{4DBF}\x{4E00}-\x{9FFF}\x{F900}-\x{FAFF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{2CEB0}-\x{2EBEF}\x{2F800}-\x{2FA1F}]+|[^\r\n\p{L}\p{N}]?[\p{L}--[\x{3400}-\x{4DBF}\x{4E00}-\x{9FFF}\x{F900}-\x{FAFF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{2CEB0}-\x{2EBEF}\x{2F800}-\x{2FA1F}]]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// LLAMA_VOCAB_PRE_TYPE_DEFAULT (also used when tokenizer.ggml.pre is missing/empty). Not plain GPT-2!
const PRE_DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];

// GPT2 / MPT / OLMO / JAIS / TRILLION / GRANITE_DOCLING
const PRE_GPT2: &[&str] = &[GPT2];

// LLAMA3 / DBRX / SMAUG / CHATGLM4 (chatglm4's literal is identical to llama3's)
const PRE_LLAMA3: &[&str] = &[LLAMA3];

// QWEN2 / STABLELM2 / HUNYUAN / SOLAR_OPEN / GROK_2 (identical literal)
const PRE_QWEN2: &[&str] = &[QWEN2];

const PRE_QWEN35: &[&str] = &[QWEN35];

const PRE_JAIS2: &[&str] = &[JAIS2];

// STARCODER / REFACT / COMMAND_R / SMOLLM / CODESHELL / EXAONE / MINERVA / MELLUM2:
// isolate every single digit, then GPT-2.
const PRE_STARCODER: &[&str] = &[r"\p{N}", GPT2];

const PRE_FALCON: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"];

const PRE_DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1F7D}ᾀ-ᾴᾶ-ᾼ\u{1FBE}ῂ-ῄῆ-ῌῐ-\u{1FD3}ῖ-\u{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u{2126}ℨ\u{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟\u{3000}-。]+",
    r"\s+$",
    "[一-龥ࠀ-一가-\u{D7FF}]+",
    r"\p{N}+",
];

const PRE_DEEPSEEK_CODER: &[&str] = &[
    "[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[一-龥ࠀ-一가-\u{D7FF}]+",
    r"\p{N}",
];

// DEEPSEEK3_LLM / HUNYUAN_DENSE / JOYAI_LLM / HY_V4
const PRE_DEEPSEEK3: &[&str] = &[r"\p{N}{1,3}", "[一-龥\u{3040}-ゟ゠-ヿ]+", DEEPSEEK3_MAIN];

const PRE_SPARK2_5: &[&str] = &[
    r"\p{N}{1,3}",
    "[一-龥\u{3040}-ゟ゠-ヿ]+",
    SPARK2_5_MAIN,
    r"\p{N}",
];

// PORO / BLOOM / GPT3_FINNISH
const PRE_PORO: &[&str] = &[" ?[^(\\s|.,!?…。，、।۔،)]+"];

const PRE_VIKING: &[&str] = &[" ?[^(\\s|.,!?…。，、।۔،)]+", r"\p{N}"];

const PRE_TEKKEN: &[&str] = &[TEKKEN];

// GPT4O / MINIMAX_M2
const PRE_GPT4O: &[&str] = &[GPT4O];

const PRE_GRANITE_EMB_MULTI: &[&str] = &[GRANITE_EMB_MULTI];

const PRE_CHAMELEON: &[&str] = &[
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    GPT2,
];

// TINY_AYA. REWRITTEN: regex 1 ran on std::wregex (C locale), so `\d` -> `[0-9]` and the `\b`
// (always preceded by a digit there) -> `(?![0-9A-Za-z_])`; regex 2 ran collapsed, where
// \p{Lu}/\p{Ll}/\p{Lt}/\p{Lm}/\p{Lo} all mean \p{L}, so both classes become `[\p{L}\p{M}]`.
// Verbatim llama.cpp source literal(s): "\\d{1,3}(?=(?:\\d{3})*\\b)",
// "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
const PRE_TINY_AYA: &[&str] = &[
    r"[0-9]{1,3}(?=(?:[0-9]{3})*(?![0-9A-Za-z_]))",
    r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]*[\p{L}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+[\p{L}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
];

// SUPERBPE. REWRITTEN `\d` -> `[0-9]` (std::wregex, C locale). Regex 2 only has zero-width
// matches: it cuts digit runs so that the short group comes first (1234567 -> 1|234|567).
// Verbatim llama.cpp source literal(s): "(?=(\\d{3})+(?!\\d))"
const PRE_SUPERBPE: &[&str] = &[r"\p{N}+", r"(?=([0-9]{3})+(?![0-9]))"];

const PRE_BAILINGMOE: &[&str] = &[BAILINGMOE];

const PRE_SEED_CODER: &[&str] = &[SEED_CODER];

const PRE_UFAKZEKA: &[&str] = &[UFAKZEKA];

const PRE_LAGUNA: &[&str] = &[r"[^\n]+|[\n]+", QWEN2];

const PRE_EXAONE_MOE: &[&str] = &[EXAONE_MOE];

const PRE_MINICPM5: &[&str] = &[r"\p{N}{1,3}", MINICPM5_MAIN];

// See KIMI_K2_EMULATED (approximation of llama.cpp's custom code, not its regex string).
const PRE_KIMI_K2: &[&str] = &[KIMI_K2_EMULATED];

/// Regex lists for GPT-2 style byte-level BPE pre-tokenization, keyed by GGUF `tokenizer.ggml.pre`.
///
/// Mirrors the name -> LLAMA_VOCAB_PRE_TYPE_* mapping in `llama_vocab::impl::load` and the
/// per-type lists in the `llm_tokenizer_bpe` constructor. Apply the regexes one after another, each
/// one splitting every piece produced so far and keeping both matches and the unmatched gaps.
/// `""` (key present but empty) behaves like a missing key: llama.cpp warns and uses DEFAULT.
pub(crate) fn pre_tokenizer_regexes(pre: &str) -> Option<&'static [&'static str]> {
    Some(match pre {
        // missing/empty key -> DEFAULT (with a "GENERATION QUALITY WILL BE DEGRADED" warning)
        "" | "default" => PRE_DEFAULT,
        "minicpm5" => PRE_MINICPM5,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PRE_LLAMA3,
        "deepseek-llm" => PRE_DEEPSEEK_LLM,
        "deepseek-coder" => PRE_DEEPSEEK_CODER,
        "deepseek-v3" | "hunyuan-dense" | "hy_v4" | "joyai-llm" => PRE_DEEPSEEK3,
        "spark2_5" => PRE_SPARK2_5,
        "falcon" => PRE_FALCON,
        "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => PRE_GPT2,
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" => PRE_GPT2,
        // same type as gpt-2, llama.cpp additionally sets add_sep = true
        "jina-v1-en" | "jina-v2-code" | "roberta-bpe" => PRE_GPT2,
        "jais-2" => PRE_JAIS2,
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => PRE_STARCODER,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" | "grok-2" => PRE_QWEN2,
        "qwen35" => PRE_QWEN35,
        "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => PRE_LLAMA3,
        "poro-chat" | "bloom" | "gpt3-finnish" => PRE_PORO,
        "viking" => PRE_VIKING,
        "tekken" => PRE_TEKKEN,
        "chameleon" => PRE_CHAMELEON,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => PRE_GPT4O,
        "granite-embed-multi-97m" => PRE_GRANITE_EMB_MULTI,
        "tiny_aya" | "cohere2moe" => PRE_TINY_AYA,
        "superbpe" => PRE_SUPERBPE,
        "bailingmoe" | "bailingmoe2" | "llada-moe" => PRE_BAILINGMOE,
        "seed-coder" => PRE_SEED_CODER,
        "kimi-k2" => PRE_KIMI_K2,
        "ufakzeka" => PRE_UFAKZEKA,
        "laguna" => PRE_LAGUNA,
        "exaone-moe" => PRE_EXAONE_MOE,
        _ => return None,
    })
}

/// Pre-tokenizer names llama.cpp knows but this crate cannot reproduce: loading such a vocab
/// is an error rather than silently different token ids.
pub(crate) const UNSUPPORTED: &[&str] = &[
    "youtu",
    "afmoe",
    "gemma4",
    "granite-embed-multi-311m",
    "sarvam-moe",
    "whitespace",
];

/// The regex list used for a `pre` name this table does not know (llama.cpp would refuse it).
pub(crate) const FALLBACK: &[&str] = PRE_GPT2;

/// Tokenizer flags llama.cpp sets from the `pre` name of a BPE vocab (before the GGUF's own
/// `add_bos_token` etc. override them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PreFlags {
    /// Look the whole pre-token up in the vocab before merging (`ignore_merges`).
    pub(crate) ignore_merges: bool,
    /// Apply `clean_up_tokenization_spaces` when detokenizing a whole sequence.
    pub(crate) clean_spaces: bool,
    /// Default of `add_bos` for this pre-tokenizer.
    pub(crate) add_bos: bool,
    /// llama.cpp clears the default BOS id (11) for this pre-tokenizer (chatglm).
    pub(crate) no_default_bos: bool,
}

/// Names whose vocab keeps `clean_spaces == false` in llama.cpp (all others: `true`).
const NO_CLEAN_SPACES: &[&str] = &[
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "spark2_5",
    "youtu",
    "tekken",
    "smollm",
    "command-r",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "qwen35",
    "poro-chat",
    "viking",
    "chameleon",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "granite-embed-multi-97m",
    "tiny_aya",
    "cohere2moe",
    "superbpe",
    "trillion",
    "granite-docling",
    "bailingmoe",
    "bailingmoe2",
    "llada-moe",
    "seed-coder",
    "hunyuan",
    "hunyuan-dense",
    "hy_v4",
    "joyai-llm",
    "kimi-k2",
    "ufakzeka",
    "grok-2",
    "afmoe",
    "laguna",
    "minimax-m2",
    "solar-open",
    "sarvam-moe",
];

/// The llama3 family: `ignore_merges` and `add_bos` by default.
const LLAMA3_NAMES: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
];

/// Flags for `pre` (see [`PreFlags`]); unknown names get llama.cpp's BPE defaults.
pub(crate) fn pre_flags(pre: &str) -> PreFlags {
    let llama3 = LLAMA3_NAMES.contains(&pre);
    PreFlags {
        ignore_merges: llama3
            || matches!(
                pre,
                "minicpm5" | "youtu" | "tekken" | "granite-embed-multi-97m"
            ),
        clean_spaces: !NO_CLEAN_SPACES.contains(&pre),
        add_bos: llama3 || matches!(pre, "tekken" | "chameleon"),
        no_default_bos: matches!(pre, "glm4" | "chatglm-bpe"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name of the table, to compile each list once.
    const NAMES: &[&str] = &[
        "",
        "minicpm5",
        "llama3",
        "deepseek-llm",
        "deepseek-coder",
        "deepseek-v3",
        "spark2_5",
        "falcon",
        "mpt",
        "gpt-2",
        "jais-2",
        "smollm",
        "qwen2",
        "qwen35",
        "dbrx",
        "poro-chat",
        "viking",
        "tekken",
        "chameleon",
        "gpt-4o",
        "granite-embed-multi-97m",
        "tiny_aya",
        "superbpe",
        "bailingmoe",
        "seed-coder",
        "kimi-k2",
        "ufakzeka",
        "laguna",
        "exaone-moe",
    ];

    #[test]
    fn every_regex_compiles() {
        for name in NAMES {
            let list = pre_tokenizer_regexes(name).expect("known name");
            for re in list {
                tokenizers::pre_tokenizers::split::Split::new(
                    tokenizers::pre_tokenizers::split::SplitPattern::Regex((*re).to_string()),
                    tokenizers::SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{name}: {re}: {e}"));
            }
        }
    }

    #[test]
    fn flags_follow_llama_cpp() {
        let smollm = pre_flags("smollm");
        assert!(!smollm.clean_spaces && !smollm.ignore_merges && !smollm.add_bos);
        let llama3 = pre_flags("llama-bpe");
        assert!(llama3.clean_spaces && llama3.ignore_merges && llama3.add_bos);
        assert!(pre_flags("glm4").no_default_bos);
        assert!(pre_tokenizer_regexes("gpt2").is_none());
        for name in UNSUPPORTED {
            assert!(pre_tokenizer_regexes(name).is_none());
        }
    }
}
