//! A content filter that asks the operator's own moderation service over HTTP (issue 3: "an HTTP
//! classifier that sends the text to a URL and reads back categories and severities").
//!
//! Each check is one `POST` to the configured URL with the body `{"text": "..."}`, the header
//! `x-phi-serve-text-kind: prompt|completion`, and any headers the operator configured (an API
//! key, say). Two answer shapes are read:
//!
//! - Azure AI Content Safety's `text:analyze` answer, so its endpoint can be used as it is:
//!   `{"categoriesAnalysis": [{"category": "Hate", "severity": 4}, ...]}` with severities 0-7
//!   (0-1 safe, 2-3 low, 4-5 medium, 6-7 high, as Azure OpenAI maps them);
//! - the annotation shape itself, per category a severity name or an object:
//!   `{"violence": {"severity": "high", "filtered": true}, "hate": "low"}`.
//!
//! Missing categories are safe; a category is blocked when the service says `filtered: true` or,
//! when it does not say, when its severity reaches the configured threshold. A service that is
//! unreachable, slower than the timeout, answers a non-2xx status or an unreadable body makes the
//! check fail, and the server fails closed (see [`crate::content_filter`]).

use std::time::Duration;

use phi_api::Severity;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::content_filter::{
    slot, Category, CheckFuture, ContentFilter, FilterError, FilterVerdict, TextKind,
};

/// The header that tells the service whether it judges a prompt or an answer.
pub const TEXT_KIND_HEADER: &str = "x-phi-serve-text-kind";

/// Asks a moderation service at a URL.
#[derive(Debug, Clone)]
pub struct HttpFilter {
    client: reqwest::Client,
    url: reqwest::Url,
    threshold: Severity,
}

impl HttpFilter {
    /// A filter that posts to `url`, blocks at `threshold` (unless the service decides), sends
    /// `headers` (`Name: value`) with every request and gives up after `timeout`.
    pub fn new(
        url: &str,
        threshold: Severity,
        headers: &[String],
        timeout: Duration,
    ) -> Result<Self, FilterError> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| FilterError(format!("invalid content-filter URL {url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FilterError(format!(
                "the content-filter URL must be http:// or https://, not {}",
                url.scheme()
            )));
        }
        if threshold == Severity::Safe {
            return Err(FilterError(
                "the blocking threshold must be low, medium or high, not safe".into(),
            ));
        }
        let mut map = HeaderMap::new();
        for h in headers {
            let (name, value) = h.split_once(':').ok_or_else(|| {
                FilterError(format!("content-filter header {h:?} is not `Name: value`"))
            })?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| FilterError(format!("content-filter header name {name:?}: {e}")))?;
            let mut value = HeaderValue::from_str(value.trim())
                .map_err(|e| FilterError(format!("content-filter header {name}: {e}")))?;
            value.set_sensitive(true);
            map.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(map)
            .timeout(timeout)
            .build()
            .map_err(|e| FilterError(format!("cannot build the content-filter client: {e}")))?;
        Ok(HttpFilter { client, url, threshold })
    }

    async fn ask(&self, text: &str, kind: TextKind) -> Result<FilterVerdict, FilterError> {
        let res = self
            .client
            .post(self.url.clone())
            .header(TEXT_KIND_HEADER, kind.as_str())
            .json(&serde_json::json!({ "text": text }))
            .send()
            .await
            .map_err(|e| FilterError(format!("content filter {}: {e}", self.url)))?;
        let status = res.status();
        if !status.is_success() {
            return Err(FilterError(format!("content filter {} answered {status}", self.url)));
        }
        let body: Value = res.json().await.map_err(|e| {
            FilterError(format!("content filter {} answered no JSON: {e}", self.url))
        })?;
        parse_verdict(&body, self.threshold)
            .map_err(|e| FilterError(format!("content filter {}: {e}", self.url)))
    }
}

impl ContentFilter for HttpFilter {
    fn check<'a>(&'a self, text: &'a str, kind: TextKind) -> CheckFuture<'a> {
        Box::pin(self.ask(text, kind))
    }
}

/// The category a service's name stands for (`self_harm`, `SelfHarm`, `self-harm`...).
fn category(name: &str) -> Option<Category> {
    let key: String =
        name.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_lowercase();
    match key.as_str() {
        "hate" => Some(Category::Hate),
        "selfharm" => Some(Category::SelfHarm),
        "sexual" => Some(Category::Sexual),
        "violence" => Some(Category::Violence),
        _ => None,
    }
}

/// A severity given as a name or as Azure AI Content Safety's number (0-7).
fn severity(v: &Value) -> Result<Severity, String> {
    match v {
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "safe" => Ok(Severity::Safe),
            "low" => Ok(Severity::Low),
            "medium" => Ok(Severity::Medium),
            "high" => Ok(Severity::High),
            _ => Err(format!("unknown severity {s:?}")),
        },
        Value::Number(n) => match n.as_u64() {
            Some(0..=1) => Ok(Severity::Safe),
            Some(2..=3) => Ok(Severity::Low),
            Some(4..=5) => Ok(Severity::Medium),
            Some(6..=7) => Ok(Severity::High),
            _ => Err(format!("severity {n} is not 0 to 7")),
        },
        other => Err(format!("severity {other} is neither a name nor a number")),
    }
}

/// Reads a service's answer (either shape of the module's documentation).
pub fn parse_verdict(body: &Value, threshold: Severity) -> Result<FilterVerdict, String> {
    let mut verdict = FilterVerdict::default();
    let mut set = |name: &str, sev: Severity, filtered: Option<bool>| {
        if let Some(c) = category(name) {
            let r = slot(&mut verdict, c);
            r.severity = r.severity.max(sev);
            r.filtered |= filtered.unwrap_or(sev >= threshold);
        }
    };
    let Some(object) = body.as_object() else {
        return Err(format!("the answer {body} is not a JSON object"));
    };
    if let Some(list) = object.get("categoriesAnalysis") {
        let list = list.as_array().ok_or("categoriesAnalysis is not a list")?;
        for entry in list {
            let name =
                entry["category"].as_str().ok_or("a categoriesAnalysis entry has no category")?;
            set(name, severity(&entry["severity"])?, None);
        }
        return Ok(verdict);
    }
    for (name, value) in object {
        match value {
            Value::Object(o) => {
                let sev = o.get("severity").map(severity).transpose()?.unwrap_or_default();
                let filtered = match o.get("filtered") {
                    None | Some(Value::Null) => None,
                    Some(Value::Bool(b)) => Some(*b),
                    Some(other) => {
                        return Err(format!("{name}.filtered is {other}, not a boolean"))
                    }
                };
                set(name, sev, filtered);
            }
            other => set(name, severity(other)?, None),
        }
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use phi_api::CategoryResult;
    use serde_json::json;

    use super::*;

    fn r(filtered: bool, severity: Severity) -> CategoryResult {
        CategoryResult { filtered, severity }
    }

    #[test]
    fn azure_content_safety_answer() {
        let body = json!({"blocklistsMatch": [], "categoriesAnalysis": [
            {"category": "Hate", "severity": 2}, {"category": "SelfHarm", "severity": 0},
            {"category": "Sexual", "severity": 5}, {"category": "Violence", "severity": 6}]});
        let v = parse_verdict(&body, Severity::Medium).unwrap();
        assert_eq!(v.hate, r(false, Severity::Low));
        assert_eq!(v.self_harm, r(false, Severity::Safe));
        assert_eq!(v.sexual, r(true, Severity::Medium));
        assert_eq!(v.violence, r(true, Severity::High));
        let v = parse_verdict(&body, Severity::High).unwrap();
        assert!(!v.sexual.filtered && v.violence.filtered);
    }

    #[test]
    fn annotation_shape_and_the_services_own_decision() {
        let body = json!({"violence": {"severity": "low", "filtered": true}, "hate": "high",
                          "sexual": {"severity": "high", "filtered": false}, "spam": "high"});
        let v = parse_verdict(&body, Severity::Medium).unwrap();
        assert_eq!(v.violence, r(true, Severity::Low));
        assert_eq!(v.hate, r(true, Severity::High));
        assert_eq!(v.sexual, r(false, Severity::High));
        assert_eq!(v.self_harm, r(false, Severity::Safe));
        assert_eq!(parse_verdict(&json!({}), Severity::Low).unwrap(), FilterVerdict::default());
    }

    #[test]
    fn unreadable_answers_are_errors() {
        for body in [
            json!([1]),
            json!({"hate": "extreme"}),
            json!({"hate": 9}),
            json!({"hate": {"filtered": "yes"}}),
            json!({"categoriesAnalysis": [{"severity": 2}]}),
            json!({"categoriesAnalysis": {"Hate": 2}}),
        ] {
            assert!(parse_verdict(&body, Severity::Medium).is_err(), "{body}");
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        let t = Duration::from_secs(1);
        assert!(HttpFilter::new("not a url", Severity::Medium, &[], t).is_err());
        assert!(HttpFilter::new("ftp://x/", Severity::Medium, &[], t).is_err());
        assert!(HttpFilter::new("http://x/", Severity::Safe, &[], t).is_err());
        assert!(HttpFilter::new("http://x/", Severity::Medium, &["nocolon".into()], t).is_err());
        assert!(HttpFilter::new("http://x/", Severity::Medium, &["Api-Key: k".into()], t).is_ok());
    }
}
