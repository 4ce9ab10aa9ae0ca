//! Chat prompts: render messages with the model's Jinja chat template, as transformers'
//! `tokenizer.apply_chat_template` does, and tokenize the result.
//!
//! transformers compiles the template with jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` plus the `loopcontrols` extension, a `tojson` filter that calls
//! `json.dumps(ensure_ascii=False)`, and the globals `raise_exception` and `strftime_now`; it
//! renders with `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the
//! special-token strings (`bos_token`, `eos_token`, `unk_token`, `pad_token`). [`ChatTemplate`]
//! sets up minijinja the same way (Python string methods such as `.strip()` come from
//! `minijinja_contrib::pycompat`).
//!
//! # System messages
//!
//! Several published Phi-3 templates silently drop `system` messages (versions B and C in
//! `CHAT_FORMAT.md`), and the managed cloud endpoint translates `system` into `user` for those
//! models. [`SystemRolePolicy`] decides what happens here; the default, [`SystemRolePolicy::Auto`],
//! probes the template once at load time and never loses system content. `developer` messages
//! (OpenAI's newer name for system) are treated exactly like `system`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::tokenizer::{PhiTokenizer, TokenizerError};

const TEMPLATE_NAME: &str = "chat_template";
/// Marks errors raised by the template itself through `raise_exception(...)`.
const RAISE_MARKER: &str = "raise_exception: ";
/// Text of the system message used to probe whether a template renders system content.
const PROBE_SENTINEL: &str = "phi-serve system probe 7c1f3a9e";

/// Errors from building or rendering a chat template.
///
/// Exists so the HTTP layer can answer a bad conversation (unknown role, template exception) with
/// a 4xx and a broken model directory with a 5xx.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The tokenizer config has no chat template.
    #[error("the tokenizer has no chat template")]
    NoTemplate,
    /// The template source does not compile.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// A message has a role this server does not know.
    #[error(
        "message {index} has unsupported role {role:?} (expected system, developer, user or assistant)"
    )]
    UnknownRole {
        /// Position of the message in the request.
        index: usize,
        /// The role as given.
        role: String,
    },
    /// The template called `raise_exception(message)` (e.g. roles do not alternate).
    #[error("chat template rejected the conversation: {0}")]
    TemplateException(String),
    /// Any other error while rendering.
    #[error("chat template rendering failed: {0}")]
    Render(String),
    /// Tokenizing the rendered prompt failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Result alias for this module.
pub type Result<T, E = ChatTemplateError> = std::result::Result<T, E>;

/// One chat message as the template sees it: `{"role": ..., "content": ...}`.
///
/// Exists as the engine-side message type; the HTTP layer flattens its richer message shapes
/// (content parts, missing content) into this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role (validated when rendering).
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// What to do with `system` (and `developer`) messages.
///
/// Exists because some Phi-3 templates drop system messages without a trace; the server must not
/// silently ignore instructions a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemRolePolicy {
    /// Probe the template at load time: render a conversation whose system message is a unique
    /// sentinel; if the sentinel appears in the output the template handles system messages
    /// ([`ResolvedSystemRole::Native`]), otherwise translate them ([`ResolvedSystemRole::ToUser`]).
    /// A template that raises on the probe also resolves to `ToUser`.
    #[default]
    Auto,
    /// Pass system messages to the template unchanged (it may drop them: only choose this for
    /// templates known to render them).
    Native,
    /// Translate system messages into user turns (what the managed endpoint does for Phi-3 models
    /// without a system role). See [`ChatTemplate::normalize_messages`] for the exact rule.
    ToUser,
}

impl SystemRolePolicy {
    /// The policy's name as accepted by [`FromStr`]: `auto`, `native`, `to_user`.
    pub fn as_str(self) -> &'static str {
        match self {
            SystemRolePolicy::Auto => "auto",
            SystemRolePolicy::Native => "native",
            SystemRolePolicy::ToUser => "to_user",
        }
    }
}

impl fmt::Display for SystemRolePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SystemRolePolicy {
    type Err = String;

    /// Parses `auto`, `native`, `to_user` (also `to-user`, `touser`), case-insensitively.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(SystemRolePolicy::Auto),
            "native" => Ok(SystemRolePolicy::Native),
            "to_user" | "to-user" | "touser" | "user" => Ok(SystemRolePolicy::ToUser),
            other => Err(format!(
                "unknown system role policy {other:?} (expected auto, native or to_user)"
            )),
        }
    }
}

/// The system-message handling actually in effect once [`SystemRolePolicy::Auto`] is resolved.
///
/// Exists so the server can report (e.g. in `/info` or logs) how system prompts are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolvedSystemRole {
    /// System messages go to the template as `system` turns.
    Native,
    /// System messages are rewritten into user turns before rendering.
    ToUser,
}

impl ResolvedSystemRole {
    /// `native` or `to_user`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedSystemRole::Native => "native",
            ResolvedSystemRole::ToUser => "to_user",
        }
    }
}

impl fmt::Display for ResolvedSystemRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Special-token strings passed to the template (`{{ bos_token }}` etc.).
///
/// Exists because templates reference these by name; transformers passes its special-tokens map.
/// Tokens that are `None` are left undefined in the template, as in transformers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateTokens {
    /// `bos_token` (`"<s>"` for Phi-3).
    pub bos_token: Option<String>,
    /// `eos_token` (`"<|endoftext|>"` for Phi-3).
    pub eos_token: Option<String>,
    /// `unk_token`.
    pub unk_token: Option<String>,
    /// `pad_token`.
    pub pad_token: Option<String>,
}

impl TemplateTokens {
    /// Only BOS and EOS, the two tokens chat templates use in practice.
    pub fn new(bos_token: Option<&str>, eos_token: Option<&str>) -> Self {
        TemplateTokens {
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
            unk_token: None,
            pad_token: None,
        }
    }

    /// The tokens named in a tokenizer's `tokenizer_config.json`.
    pub fn from_tokenizer(tokenizer: &PhiTokenizer) -> Self {
        let cfg = tokenizer.config();
        TemplateTokens {
            bos_token: cfg.bos_token.clone(),
            eos_token: cfg.eos_token.clone(),
            unk_token: cfg.unk_token.clone(),
            pad_token: cfg.pad_token.clone(),
        }
    }
}

/// A rendered chat prompt and its token ids.
///
/// Exists so callers get the exact text that was tokenized (for logging and `echo`) with the ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPrompt {
    /// The prompt string produced by the template.
    pub text: String,
    /// `text` tokenized with `add_special_tokens=False`.
    pub ids: Vec<u32>,
}

/// A compiled chat template with its special tokens and resolved system-role handling.
///
/// Exists to turn a request's messages into the exact prompt transformers would build, once per
/// request, without re-parsing the template. `Send + Sync`: share it between requests.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    tokens: TemplateTokens,
    requested: SystemRolePolicy,
    resolved: ResolvedSystemRole,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("tokens", &self.tokens)
            .field("requested", &self.requested)
            .field("resolved", &self.resolved)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` and resolves `policy` (probing the template when it is `Auto`).
    pub fn new(
        source: impl Into<String>,
        tokens: TemplateTokens,
        policy: SystemRolePolicy,
    ) -> Result<Self> {
        let source = source.into();
        let env = build_environment(&source)?;
        let mut template = ChatTemplate {
            env,
            source,
            tokens,
            requested: policy,
            resolved: ResolvedSystemRole::Native,
        };
        template.resolved = match policy {
            SystemRolePolicy::Native => ResolvedSystemRole::Native,
            SystemRolePolicy::ToUser => ResolvedSystemRole::ToUser,
            SystemRolePolicy::Auto => template.probe_system_support()?,
        };
        Ok(template)
    }

    /// Uses the tokenizer's default chat template and its special-token strings.
    pub fn from_tokenizer(tokenizer: &PhiTokenizer, policy: SystemRolePolicy) -> Result<Self> {
        let source = tokenizer.chat_template().ok_or(ChatTemplateError::NoTemplate)?;
        Self::new(source, TemplateTokens::from_tokenizer(tokenizer), policy)
    }

    /// Renders a probe conversation with a sentinel system message; `Native` iff the sentinel
    /// shows up. If the template raises on the probe but renders a plain user turn, system
    /// messages are unsupported (`ToUser`); if it cannot render even that, it is broken.
    fn probe_system_support(&self) -> Result<ResolvedSystemRole> {
        let probe = [ChatMessage::system(PROBE_SENTINEL), ChatMessage::user("Hello")];
        match self.render_raw(&probe, true) {
            Ok(text) if text.contains(PROBE_SENTINEL) => Ok(ResolvedSystemRole::Native),
            Ok(_) => Ok(ResolvedSystemRole::ToUser),
            Err(_) => {
                self.render_raw(&[ChatMessage::user("Hello")], true)?;
                Ok(ResolvedSystemRole::ToUser)
            }
        }
    }

    /// The policy the template was built with.
    pub fn requested_system_role(&self) -> SystemRolePolicy {
        self.requested
    }

    /// How system messages are actually delivered (the result of resolving `Auto`).
    pub fn resolved_system_role(&self) -> ResolvedSystemRole {
        self.resolved
    }

    /// The Jinja source of the template.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special-token strings given to the template.
    pub fn tokens(&self) -> &TemplateTokens {
        &self.tokens
    }

    /// Validates roles and applies the resolved system-role handling; this is the message list
    /// the template receives.
    ///
    /// * Roles other than `system`, `developer`, `user`, `assistant` are an error.
    /// * `developer` is treated as `system`.
    /// * `Native`: system messages are passed through (`developer` renamed to `system`).
    /// * `ToUser`: every system message becomes user text. Consecutive system messages are joined
    ///   with a blank line; if the (joined) system text is immediately followed by a user message,
    ///   the two are merged into one user turn `"<system>\n\n<user>"`, so that the user/assistant
    ///   alternation Phi-3 was trained on is kept (two user turns in a row would be a shape the
    ///   model never saw). Otherwise (followed by an assistant message, or at the end) it becomes
    ///   a user turn of its own. Empty system messages are dropped in this mode (they carry no
    ///   content and would only add blank lines). Nothing non-empty is ever lost.
    pub fn normalize_messages(&self, messages: &[ChatMessage]) -> Result<Vec<ChatMessage>> {
        normalize(messages, self.resolved)
    }

    /// Renders the conversation as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` would, after [`ChatTemplate::normalize_messages`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let normalized = self.normalize_messages(messages)?;
        self.render_raw(&normalized, add_generation_prompt)
    }

    /// Renders, then tokenizes the prompt with `add_special_tokens=False`, which is what
    /// `apply_chat_template(tokenize=True)` does in transformers: the BOS token appears only if
    /// the template writes `{{ bos_token }}`; `add_bos_token` from the config is *not* applied
    /// (so the Phi-3-medium template, which writes no BOS, gives a prompt without BOS, exactly as
    /// transformers does). Special-token strings in the text, including any inside message
    /// contents, are tokenized as special tokens, also as in transformers.
    pub fn render_and_encode(
        &self,
        tokenizer: &PhiTokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<RenderedPrompt> {
        let text = self.render(messages, add_generation_prompt)?;
        let ids = tokenizer.encode(&text)?;
        Ok(RenderedPrompt { text, ids })
    }

    /// Renders exactly the given messages (no validation or translation).
    fn render_raw(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Syntax(format!("{e:#}")))?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        let tokens = [
            ("bos_token", &self.tokens.bos_token),
            ("eos_token", &self.tokens.eos_token),
            ("unk_token", &self.tokens.unk_token),
            ("pad_token", &self.tokens.pad_token),
        ];
        for (name, value) in tokens {
            if let Some(v) = value {
                ctx.insert(name, Value::from(v.as_str()));
            }
        }
        template.render(ctx).map_err(map_render_error)
    }
}

fn normalize(messages: &[ChatMessage], mode: ResolvedSystemRole) -> Result<Vec<ChatMessage>> {
    let mut out = Vec::with_capacity(messages.len());
    let mut pending_system: Option<String> = None;
    for (index, m) in messages.iter().enumerate() {
        let is_system = match m.role.as_str() {
            "system" | "developer" => true,
            "user" | "assistant" => false,
            _ => return Err(ChatTemplateError::UnknownRole { index, role: m.role.clone() }),
        };
        match mode {
            ResolvedSystemRole::Native => {
                let role = if is_system { "system" } else { m.role.as_str() };
                out.push(ChatMessage::new(role, m.content.clone()));
            }
            ResolvedSystemRole::ToUser => {
                if is_system {
                    if m.content.is_empty() {
                        continue;
                    }
                    pending_system = Some(match pending_system.take() {
                        Some(prev) => format!("{prev}\n\n{}", m.content),
                        None => m.content.clone(),
                    });
                } else if m.role == "user" {
                    let content = match pending_system.take() {
                        Some(sys) => format!("{sys}\n\n{}", m.content),
                        None => m.content.clone(),
                    };
                    out.push(ChatMessage::user(content));
                } else {
                    if let Some(sys) = pending_system.take() {
                        out.push(ChatMessage::user(sys));
                    }
                    out.push(m.clone());
                }
            }
        }
    }
    if let Some(sys) = pending_system {
        out.push(ChatMessage::user(sys));
    }
    Ok(out)
}

fn map_render_error(e: JinjaError) -> ChatTemplateError {
    if let Some(msg) = e.detail().and_then(|d| d.strip_prefix(RAISE_MARKER)) {
        return ChatTemplateError::TemplateException(msg.to_string());
    }
    ChatTemplateError::Render(format!("{e:#}"))
}

/// The jinja2 environment of transformers' `_compile_jinja_template`, in minijinja.
fn build_environment(source: &str) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // jinja2's default: a single trailing newline of the template source is removed.
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(TEMPLATE_NAME, source.to_string())
        .map_err(|e| ChatTemplateError::Syntax(format!("{e:#}")))?;
    Ok(env)
}

/// `raise_exception(message)`: aborts rendering with the template's message.
fn raise_exception(message: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, format!("{RAISE_MARKER}{message}")))
}

/// `strftime_now(format)`: the current time formatted with C `strftime` directives. Uses UTC
/// (transformers uses the server's local time; servers usually run in UTC).
fn strftime_now(format: String) -> std::result::Result<Value, JinjaError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Value::from(format_utc(&format, secs)))
}

/// Formats unix time `secs` (UTC) with the common `strftime` directives.
fn format_utc(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] =
        ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (hour, minute, second) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let (year, month, day) = civil_from_days(days as i64);
    let weekday = ((days + 3) % 7) as usize; // 1970-01-01 was a Thursday (index 3 from Monday)
    let month_idx = (month as usize).saturating_sub(1).min(11);
    let yday = days as i64 - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `%-d` (no padding) extension, used by some templates.
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |v: u64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num((year.rem_euclid(100)) as u64, 2)),
            Some('m') => out.push_str(&num(month as u64, 2)),
            Some('d') => out.push_str(&num(day as u64, 2)),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('j') => out.push_str(&num(yday as u64, 3)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[month_idx]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month_idx][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)` (not HTML-escaped, Python spacing `", "`/`": "`).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(n) = v.as_i64() {
                Some(" ".repeat(n.max(0) as usize))
            } else if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let items: Vec<Value> = v.try_iter()?.collect();
            match items.as_slice() {
                [a, b] => match (a.as_str(), b.as_str()) {
                    (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                    _ => {
                        return Err(JinjaError::new(
                            ErrorKind::InvalidOperation,
                            "tojson: separators must be two strings",
                        ))
                    }
                },
                _ => {
                    return Err(JinjaError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_py_json(&value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_py_json(
    value: &Value,
    opts: &JsonOpts,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), JinjaError> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&py_float_repr(f));
            }
        }
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), opts, out),
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.as_str() {
                    Some(s) => s.to_string(),
                    None if key.is_none() => "null".to_string(),
                    None => {
                        let mut k = String::new();
                        write_py_json(&key, opts, level, &mut k)?;
                        k.trim_matches('"').to_string()
                    }
                };
                entries.push((key, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                write_json_string(k, opts, out);
                out.push_str(&opts.key_sep);
                write_py_json(v, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                write_py_json(v, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push(']');
        }
        _ => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of kind {}", value.kind()),
            ))
        }
    }
    Ok(())
}

fn newline_indent(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json_string(s: &str, opts: &JsonOpts, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if opts.ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, positional for 1e-4 <= |x| < 1e16,
/// otherwise exponent form with at least two exponent digits (`1e-07`, `1e+16`).
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `{:e}` gives the shortest round-trip mantissa, e.g. "1.2345e-7".
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = match sci.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (sci.as_str(), 0),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        assert_eq!(py_float_repr(1.0), "1.0");
        assert_eq!(py_float_repr(0.1), "0.1");
        assert_eq!(py_float_repr(-2.5), "-2.5");
        assert_eq!(py_float_repr(1e16), "1e+16");
        assert_eq!(py_float_repr(1.5e-7), "1.5e-07");
        assert_eq!(py_float_repr(123456.789), "123456.789");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(1e15), "1000000000000000.0");
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-07-01 13:05:09 UTC, a Monday.
        let t = 1_719_839_109;
        assert_eq!(
            format_utc("%Y-%m-%d %H:%M:%S %a %A %b %B %j %p %I %%", t),
            "2024-07-01 13:05:09 Mon Monday Jul July 183 PM 01 %"
        );
        assert_eq!(format_utc("%-d %b %Y", t), "1 Jul 2024");
        assert_eq!(format_utc("%d %b %Y", 0), "01 Jan 1970");
        // 2000-02-29 (leap day).
        assert_eq!(format_utc("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
    }

    fn render(src: &str, ctx: Value) -> String {
        let env = build_environment(src).expect("compiles");
        let t = env.get_template(TEMPLATE_NAME).expect("exists");
        t.render(ctx).expect("renders")
    }

    #[test]
    fn tojson_uses_python_spacing_and_no_html_escaping() {
        // A dict literal keeps insertion order (Python dict semantics, `preserve_order`).
        let x = r#"{"b": [1, 2.5, "<a&b>", x], "a": none, "é": true}"#;
        let ctx = minijinja::context! { x => "tab\there" };
        assert_eq!(
            render(&format!("{{{{ {x} | tojson }}}}"), ctx.clone()),
            r#"{"b": [1, 2.5, "<a&b>", "tab\there"], "a": null, "é": true}"#
        );
        assert_eq!(
            render(&format!("{{{{ {x} | tojson(sort_keys=true) }}}}"), ctx.clone()),
            r#"{"a": null, "b": [1, 2.5, "<a&b>", "tab\there"], "é": true}"#
        );
        assert_eq!(
            render(&format!("{{{{ {x} | tojson(ensure_ascii=true) }}}}"), ctx.clone()),
            r#"{"b": [1, 2.5, "<a&b>", "tab\there"], "a": null, "\u00e9": true}"#
        );
        assert_eq!(
            render(&format!("{{{{ {x} | tojson(indent=2) }}}}"), ctx),
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"<a&b>\",\n    \"tab\\there\"\n  ],\n  \"a\": null,\n  \"é\": true\n}"
        );
    }

    #[test]
    fn python_string_methods_loop_controls_and_trim_blocks() {
        let ctx = minijinja::context! { s => "  hi  ", xs => vec![1, 2, 3] };
        assert_eq!(render("[{{ s.strip() }}]", ctx.clone()), "[hi]");
        assert_eq!(
            render(
                "{% for x in xs %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}",
                ctx.clone()
            ),
            "1"
        );
        // trim_blocks removes the newline after a block tag; lstrip_blocks the indentation before.
        assert_eq!(render("{% if true %}\n    a\n  {% endif %}\nb\n", ctx), "    a\nb");
    }

    #[test]
    fn raise_exception_is_reported_as_template_exception() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            TemplateTokens::default(),
            SystemRolePolicy::Native,
        )
        .expect("compiles");
        match t.render(&[ChatMessage::assistant("x")], false) {
            Err(ChatTemplateError::TemplateException(m)) => assert_eq!(m, "first must be user"),
            other => panic!("expected TemplateException, got {other:?}"),
        }
        assert_eq!(t.render(&[ChatMessage::user("x")], false).expect("renders"), "ok");
    }
}
