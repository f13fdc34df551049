//! How people name a model, its size and quantisation (Ollama's names and
//! `details`, `shoal list`): a short name from the header, parameters
//! counted from the tensors, llama.cpp's file type by its usual name.

use crate::{GgufFile, ModelLayout};

/// What a model's header says about it to people, read once.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    /// [`short_name`], if the header names the model.
    pub short_name: Option<String>,
    /// [`parameter_count`].
    pub parameters: u64,
    /// [`file_type`].
    pub quantization: Option<&'static str>,
    /// The chat template, if it has one.
    pub template: Option<String>,
}

/// The [`Description`] of a model from its header and layout.
pub fn describe(gguf: &GgufFile, layout: &ModelLayout) -> Description {
    Description {
        short_name: short_name(gguf),
        parameters: parameter_count(layout),
        quantization: file_type(gguf),
        template: gguf
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(String::from),
    }
}

/// Parameters of the model: every weight of the layout's tensors.
pub fn parameter_count(layout: &ModelLayout) -> u64 {
    let head = [
        Some(&layout.token_embd),
        Some(&layout.output_norm),
        layout.output.as_ref(),
    ];
    let head: u64 = head.into_iter().flatten().map(|t| t.elements()).sum();
    head + layout
        .layers
        .iter()
        .flat_map(|l| &l.tensors)
        .map(|t| t.elements())
        .sum::<u64>()
}

/// `135M`, `1.2B`, `70B`: a parameter count as model names write it.
pub fn parameter_size(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        let b = n / 1e9;
        if b >= 10.0 {
            format!("{b:.0}B")
        } else {
            format!("{b:.1}B")
        }
    } else {
        format!("{:.0}M", n / 1e6)
    }
}

/// The quantisation llama.cpp wrote (`general.file_type`), by its name
/// (`Q4_K_M`); `None` when the file does not say or uses a number this
/// table does not know.
pub fn file_type(gguf: &GgufFile) -> Option<&'static str> {
    let n = gguf.get("general.file_type")?.as_u64()?;
    Some(match n {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

/// The short name people use for a model, as Ollama writes it:
/// `general.basename:general.size_label`, lower case (`smollm2:135m`);
/// `None` when the file names neither.
pub fn short_name(gguf: &GgufFile) -> Option<String> {
    let get = |k: &str| gguf.get(k).and_then(|v| v.as_str()).map(str::trim);
    let base = get("general.basename").filter(|s| !s.is_empty())?;
    let size = get("general.size_label").filter(|s| !s.is_empty())?;
    let clean = |s: &str| -> String {
        s.to_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    Some(format!("{}:{}", clean(base), clean(size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_model_names() {
        assert_eq!(parameter_size(134_515_008), "135M");
        assert_eq!(parameter_size(1_235_814_400), "1.2B");
        assert_eq!(parameter_size(70_553_706_496), "71B");
    }
}
