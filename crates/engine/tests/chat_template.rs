//! Chat template parity (jinja2 renders, transformers `apply_chat_template` reference) and the
//! system-role policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use phi_engine::chat_template::{
    ChatMessage, ChatTemplate, ChatTemplateError, ResolvedSystemRole, SystemRolePolicy,
    TemplateTokens,
};
use phi_engine::tokenizer::PhiTokenizer;
use serde_json::Value;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

/// Loads each tokenizer directory once per test binary (loading takes ~0.2 s).
fn load(dir: &str) -> PhiTokenizer {
    static CACHE: OnceLock<Mutex<HashMap<String, PhiTokenizer>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().expect("cache lock");
    map.entry(dir.to_string())
        .or_insert_with(|| PhiTokenizer::from_dir(data(dir)).expect("tokenizer loads"))
        .clone()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("readable");
    serde_json::from_str(&text).expect("valid json")
}

fn read_text(rel: &str) -> String {
    std::fs::read_to_string(data(rel)).expect("readable")
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn messages_of(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).expect("messages")
}

fn phi3_tokens() -> TemplateTokens {
    TemplateTokens::new(Some("<s>"), Some("<|endoftext|>"))
}

/// Template versions of `CHAT_FORMAT.md`, by the name prefix used in `chat_template_renders.json`.
fn template_source(name: &str) -> (String, TemplateTokens) {
    let from_config =
        |dir: &str| load(dir).chat_template().expect("config has a template").to_string();
    if name.starts_with("phi3-mini-2024-04-initial") {
        (read_text("templates/phi3-mini-2024-04-initial.jinja"), phi3_tokens())
    } else if name.starts_with("phi3-mini-2024-04 ") {
        (from_config("phi3-april-2024"), phi3_tokens())
    } else if name.starts_with("phi3-medium-2024-05") {
        (from_config("phi3-medium"), phi3_tokens())
    } else if name.starts_with("phi3-mini-2024-07") {
        (from_config("phi3-july-2024"), phi3_tokens())
    } else if name.starts_with("phi3.5-mini") {
        (read_text("templates/microsoft-Phi-3.5-mini-instruct.jinja"), phi3_tokens())
    } else if name.starts_with("phi3-small") {
        (
            read_text("templates/phi3-small.jinja"),
            TemplateTokens::new(Some("<|endoftext|>"), Some("<|endoftext|>")),
        )
    } else {
        panic!("unknown template {name}")
    }
}

fn template(name: &str, policy: SystemRolePolicy) -> ChatTemplate {
    let (src, tokens) = template_source(name);
    ChatTemplate::new(src, tokens, policy).expect("template compiles")
}

/// Every render of `chat_template_renders.json` (jinja2 with transformers' settings), and its ids
/// under both tokenizer versions. `Native` passes messages through unchanged, which is what the
/// reference did (so system messages are dropped by templates B and C here).
#[test]
fn shared_renders_and_ids_match() {
    let cases = read_json(&data("test-vectors/chat_template_renders.json"));
    let cases = cases.as_array().expect("list");
    assert_eq!(cases.len(), 48);
    let july = load("phi3-july-2024");
    let april = load("phi3-april-2024");
    let mut with_ids = 0;
    for case in cases {
        let name = case["template"].as_str().expect("name");
        let t = template(name, SystemRolePolicy::Native);
        let messages = messages_of(&case["messages"]);
        let agp = case["add_generation_prompt"].as_bool().expect("bool");
        let expected = case["rendered"].as_str().expect("rendered");
        assert_eq!(
            t.render(&messages, agp).expect("renders"),
            expected,
            "{name} / {} / agp={agp}",
            case["conversation"]
        );
        if let Some(ids) = case.get("ids_tokenizer_2024_07_rstrip_true") {
            let p = t.render_and_encode(&july, &messages, agp).expect("encodes");
            assert_eq!(p.text, expected);
            assert_eq!(p.ids, ids_of(ids), "{name} july ids");
            let p = t.render_and_encode(&april, &messages, agp).expect("encodes");
            assert_eq!(
                p.ids,
                ids_of(&case["ids_tokenizer_2024_04_rstrip_false"]),
                "{name} april ids"
            );
            with_ids += 1;
        }
    }
    assert_eq!(with_ids, 40);
}

/// `tests/reference/tokenizer/chat.json`: `apply_chat_template` of transformers itself, text and
/// ids (`tokenize=True`).
#[test]
fn transformers_reference_chat_json_matches() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/tokenizer/chat.json");
    let v = read_json(&path);
    let templates = v["templates"].as_object().expect("templates");
    let entries = v["entries"].as_array().expect("entries");
    assert!(!entries.is_empty());
    let tokenizer_dir = |name: &str| match name {
        "phi-3-mini-4k-instruct" => "phi3-july-2024",
        "phi-3-2024-04" => "phi3-april-2024",
        "phi-3-medium" => "phi3-medium",
        other => panic!("unknown tokenizer {other}"),
    };
    for e in entries {
        let key = e["template"].as_str().expect("template key");
        let src = templates[key]["template"].as_str().expect("template source");
        let tok = load(tokenizer_dir(e["tokenizer"].as_str().expect("tokenizer")));
        let t = ChatTemplate::new(src, phi3_tokens(), SystemRolePolicy::Native)
            .expect("template compiles");
        let messages = messages_of(&e["messages"]);
        let agp = e["add_generation_prompt"].as_bool().expect("bool");
        let p = t.render_and_encode(&tok, &messages, agp).expect("renders");
        let what = format!("{key} / {} / agp={agp}", e["conversation"]);
        assert_eq!(p.text, e["text"].as_str().expect("text"), "{what}");
        assert_eq!(p.ids, ids_of(&e["ids"]), "{what}");
    }
}

#[test]
fn auto_resolves_per_template_version() {
    let cases = [
        ("phi3-mini-2024-04-initial", ResolvedSystemRole::Native), // A
        ("phi3-mini-2024-04 ", ResolvedSystemRole::ToUser),        // B
        ("phi3-medium-2024-05", ResolvedSystemRole::ToUser),       // C
        ("phi3-mini-2024-07", ResolvedSystemRole::Native),         // D
        ("phi3.5-mini", ResolvedSystemRole::Native),               // E
        ("phi3-small", ResolvedSystemRole::Native),                // F
    ];
    for (name, expected) in cases {
        let t = template(name, SystemRolePolicy::Auto);
        assert_eq!(t.requested_system_role(), SystemRolePolicy::Auto);
        assert_eq!(t.resolved_system_role(), expected, "{name}");
    }
    // Also through the tokenizer's own template.
    let july = load("phi3-july-2024");
    let t = ChatTemplate::from_tokenizer(&july, SystemRolePolicy::default()).expect("builds");
    assert_eq!(t.resolved_system_role(), ResolvedSystemRole::Native);
    let medium = load("phi3-medium");
    let t = ChatTemplate::from_tokenizer(&medium, SystemRolePolicy::default()).expect("builds");
    assert_eq!(t.resolved_system_role(), ResolvedSystemRole::ToUser);
    // Explicit policies are not probed.
    let t = template("phi3-mini-2024-07", SystemRolePolicy::ToUser);
    assert_eq!(t.resolved_system_role(), ResolvedSystemRole::ToUser);
    let t = template("phi3-medium-2024-05", SystemRolePolicy::Native);
    assert_eq!(t.resolved_system_role(), ResolvedSystemRole::Native);
}

#[test]
fn auto_on_dropping_templates_never_loses_system_content() {
    let system = "Answer only in French. Secret marker Q7.";
    let convs: Vec<Vec<ChatMessage>> = vec![
        vec![ChatMessage::system(system), ChatMessage::user("Hello")],
        vec![
            ChatMessage::system(system),
            ChatMessage::user("Hi"),
            ChatMessage::assistant("Bonjour"),
            ChatMessage::user("Tell me a joke."),
        ],
        vec![ChatMessage::system(system)],
        vec![ChatMessage::user("Hi"), ChatMessage::system(system)],
        vec![ChatMessage::new("developer", system), ChatMessage::user("Hi")],
    ];
    for name in ["phi3-mini-2024-04 ", "phi3-medium-2024-05"] {
        let t = template(name, SystemRolePolicy::Auto);
        for conv in &convs {
            for agp in [true, false] {
                let out = t.render(conv, agp).expect("renders");
                assert!(out.contains(system), "{name}: system text lost in {out:?}");
            }
        }
        // Native on the same template really drops it (what Auto protects against).
        let native = template(name, SystemRolePolicy::Native);
        assert!(!native.render(&convs[0], true).expect("renders").contains(system));
    }
}

#[test]
fn to_user_merges_system_into_following_user_turn() {
    let t = template("phi3-mini-2024-04 ", SystemRolePolicy::Auto);
    let out = t
        .render(&[ChatMessage::system("You are terse."), ChatMessage::user("Hello")], true)
        .expect("renders");
    assert_eq!(out, "<s><|user|>\nYou are terse.\n\nHello<|end|>\n<|assistant|>\n");

    // Token ids of that prompt with the April tokenizer (template B's own tokenizer).
    let april = load("phi3-april-2024");
    let p = t
        .render_and_encode(
            &april,
            &[ChatMessage::system("You are terse."), ChatMessage::user("Hello")],
            true,
        )
        .expect("encodes");
    assert_eq!(p.text, out);
    assert_eq!(p.ids, april.encode(&out).expect("encodes"));
    assert_eq!(p.ids.first(), Some(&1), "BOS comes from the template");

    let n = t
        .normalize_messages(&[
            ChatMessage::system("S1"),
            ChatMessage::new("developer", "S2"),
            ChatMessage::user("U1"),
            ChatMessage::assistant("A1"),
            ChatMessage::system("S3"),
            ChatMessage::assistant("A2"),
            ChatMessage::system(""),
            ChatMessage::user("U2"),
            ChatMessage::system("S4"),
        ])
        .expect("valid roles");
    assert_eq!(
        n,
        vec![
            ChatMessage::user("S1\n\nS2\n\nU1"),
            ChatMessage::assistant("A1"),
            ChatMessage::user("S3"),
            ChatMessage::assistant("A2"),
            ChatMessage::user("U2"),
            ChatMessage::user("S4"),
        ]
    );
}

#[test]
fn native_passes_system_through_and_maps_developer() {
    let t = template("phi3-mini-2024-07", SystemRolePolicy::Auto);
    let conv =
        [ChatMessage::new("developer", "You are a helpful assistant."), ChatMessage::user("Hello")];
    assert_eq!(
        t.render(&conv, true).expect("renders"),
        "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n"
    );
    let july = load("phi3-july-2024");
    let p = t.render_and_encode(&july, &conv, true).expect("encodes");
    assert_eq!(
        p.ids,
        vec![32006, 887, 526, 263, 8444, 20255, 29889, 32007, 32010, 15043, 32007, 32001]
    );
    // Template D writes no BOS and add_bos_token is false: no BOS in the ids.
    assert_ne!(p.ids.first(), Some(&1));
}

#[test]
fn medium_template_has_no_bos_even_in_ids() {
    // Template C writes no BOS; transformers tokenizes with add_special_tokens=False, so there is
    // none in the ids either.
    let medium = load("phi3-medium");
    let t = ChatTemplate::from_tokenizer(&medium, SystemRolePolicy::Auto).expect("builds");
    let p = t.render_and_encode(&medium, &[ChatMessage::user("Hello")], true).expect("encodes");
    assert_eq!(p.text, "<|user|>\nHello<|end|>\n<|assistant|>\n");
    assert_eq!(p.ids, vec![32010, 15043, 32007, 32001]);
}

#[test]
fn unknown_roles_are_rejected() {
    let t = template("phi3-mini-2024-07", SystemRolePolicy::Auto);
    for role in ["tool", "function", "System", "", "bot"] {
        let err = t
            .render(&[ChatMessage::user("hi"), ChatMessage::new(role, "x")], true)
            .expect_err("unknown role must fail");
        match &err {
            ChatTemplateError::UnknownRole { index, role: r } => {
                assert_eq!(*index, 1);
                assert_eq!(r, role);
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("unsupported role"), "{err}");
    }
    // Same under ToUser.
    let t = template("phi3-medium-2024-05", SystemRolePolicy::ToUser);
    assert!(matches!(
        t.render(&[ChatMessage::new("tool", "x")], true),
        Err(ChatTemplateError::UnknownRole { index: 0, .. })
    ));
}

#[test]
fn template_errors_are_reported() {
    assert!(matches!(
        ChatTemplate::new("{% for %}", phi3_tokens(), SystemRolePolicy::Native),
        Err(ChatTemplateError::Syntax(_))
    ));
    // A template that raises on system messages resolves to ToUser under Auto.
    let strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}";
    let t = ChatTemplate::new(strict, phi3_tokens(), SystemRolePolicy::Auto).expect("builds");
    assert_eq!(t.resolved_system_role(), ResolvedSystemRole::ToUser);
    assert_eq!(
        t.render(&[ChatMessage::system("S"), ChatMessage::user("U")], false).expect("renders"),
        "<|user|>S\n\nU"
    );
    let t = ChatTemplate::new(strict, phi3_tokens(), SystemRolePolicy::Native).expect("builds");
    assert!(matches!(
        t.render(&[ChatMessage::system("S")], false),
        Err(ChatTemplateError::TemplateException(m)) if m == "no system"
    ));
    // A template that cannot render at all fails at construction under Auto.
    assert!(ChatTemplate::new(
        "{{ raise_exception('broken') }}",
        phi3_tokens(),
        SystemRolePolicy::Auto
    )
    .is_err());
    // No template in the config.
    let tok = PhiTokenizer::from_files(data("phi3-july-2024/tokenizer.json"), None).expect("loads");
    assert!(matches!(
        ChatTemplate::from_tokenizer(&tok, SystemRolePolicy::Auto),
        Err(ChatTemplateError::NoTemplate)
    ));
}

#[test]
fn policy_parsing_and_names() {
    for (s, p) in [
        ("auto", SystemRolePolicy::Auto),
        ("Native", SystemRolePolicy::Native),
        ("to_user", SystemRolePolicy::ToUser),
        ("to-user", SystemRolePolicy::ToUser),
    ] {
        assert_eq!(s.parse::<SystemRolePolicy>(), Ok(p));
    }
    assert!("sideways".parse::<SystemRolePolicy>().is_err());
    assert_eq!(SystemRolePolicy::ToUser.to_string(), "to_user");
    assert_eq!(ResolvedSystemRole::Native.to_string(), "native");
    assert_eq!(SystemRolePolicy::default(), SystemRolePolicy::Auto);
}

#[test]
fn chat_template_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
    assert_send_sync::<PhiTokenizer>();
}
