use super::functions::format_time;
use super::*;

/// SmolLM2's ChatML template, as in its GGUF.
const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn chat() -> Vec<Message> {
    vec![Message::new("user", "Hi there")]
}

#[test]
fn hostile_templates_stop_at_their_fuel_or_output_cap() {
    let t = |src: &str| ChatTemplate::new(src.into(), "".into(), "".into()).unwrap();
    let start = std::time::Instant::now();
    let spin =
        t("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
    let e = spin.render(&chat(), true).unwrap_err().to_string();
    assert!(e.contains("steps"), "{e}");
    let flood = format!(
        "{{% for i in range(60000) %}}{}{{% endfor %}}",
        "x".repeat(200)
    );
    let e = t(&flood).render(&chat(), true).unwrap_err().to_string();
    assert!(e.contains("bytes"), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn a_template_value_that_contains_itself_is_an_error_not_a_crash() {
    let src = "{% set ns = namespace(x=0) %}{% set ns.x = ns %}{{ ns.x }}";
    let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
    let e = t.render(&chat(), true).unwrap_err().to_string();
    assert!(e.contains("nested too deeply"), "{e}");
    // Ordinary nested values print as minijinja prints them.
    let t = ChatTemplate::new(
        "{{ [[1, 2], {'a': [3]}] }}".into(),
        String::new(),
        String::new(),
    )
    .unwrap();
    assert_eq!(t.render(&chat(), true).unwrap(), "[[1, 2], {'a': [3]}]");
}

#[test]
fn builtin_gemma_template() {
    let t = ChatTemplate::new(
        builtin_template("gemma3").unwrap().into(),
        "<bos>".into(),
        "<eos>".into(),
    )
    .unwrap();
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi "),
        Message::new("assistant", "Hello."),
        Message::new("user", "Why?"),
    ];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
    );
    assert!(builtin_template("llama").is_none());
}

#[test]
fn renders_chatml() {
    let t = ChatTemplate::new(CHATML.into(), "<|im_start|>".into(), "<|im_end|>".into()).unwrap();
    let out = t.render(&chat(), true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let no_prompt = t.render(&chat(), false).unwrap();
    assert!(no_prompt.ends_with("Hi there<|im_end|>\n"));
}

#[test]
fn trim_and_lstrip_blocks() {
    let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}";
    let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
    let out = t.render(&[Message::new("user", "  hi  ")], false).unwrap();
    assert_eq!(out, "[hi]\n");
}

#[test]
fn python_methods_bos_and_exceptions() {
    let src = "{{ bos_token }}{% if not messages[0].content.startswith('ok') %}{{ raise_exception('bad start') }}{% endif %}{{ messages[0].content.upper() }}{{ eos_token }}";
    let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "ok go")], false).unwrap(),
        "<s>OK GO</s>"
    );
    let err = t.render(&[Message::new("user", "no")], false).unwrap_err();
    assert!(
        matches!(err, ChatError::Render(ref m) if m.contains("bad start")),
        "{err}"
    );
}

#[test]
fn compile_errors_are_reported() {
    let err = ChatTemplate::new("{% if %}".into(), String::new(), String::new()).unwrap_err();
    assert!(matches!(err, ChatError::Compile(_)));
    let big = "x".repeat(MAX_TEMPLATE_BYTES + 1);
    assert!(matches!(
        ChatTemplate::new(big, String::new(), String::new()),
        Err(ChatError::TooLarge { .. })
    ));
}

#[test]
fn tojson_like_python() {
    let src = "{{ messages[0] | tojson }}|{{ ['a<b', 1, none, true] | tojson }}|{{ [1] | tojson(indent=2) }}";
    let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
    let out = t.render(&[Message::new("user", "q\"x")], false).unwrap();
    assert_eq!(
        out,
        "{\"content\": \"q\\\"x\", \"role\": \"user\"}|[\"a<b\", 1, null, true]|[\n  1\n]"
    );
}

#[test]
fn strftime_formats() {
    // 2024-03-05 14:07:09 UTC was a Tuesday, day 65 of the year
    let secs = 1_709_647_629;
    assert_eq!(
        format_time(secs, "%Y-%m-%d %H:%M:%S"),
        "2024-03-05 14:07:09"
    );
    assert_eq!(
        format_time(secs, "%d %B %Y, %a %b %j %I%p %% %Q"),
        "05 March 2024, Tue Mar 065 02PM % %Q"
    );
    assert_eq!(format_time(0, "%A %e"), "Thursday  1");
    let t = ChatTemplate::new(
        "{{ strftime_now('%Y') }}".into(),
        String::new(),
        String::new(),
    )
    .unwrap();
    assert_eq!(t.render(&[], false).unwrap().len(), 4);
}
