//! Errors of the engine layer: a request that cannot be evaluated
//! ([`RequestError`], the caller's fault) and a policy set, schema or entity
//! file that cannot be loaded ([`LoadError`], the operator's fault).

use std::fmt;

/// Which part of a request was malformed. The adapter turns this into the
/// name of the wire field (`principal`, `context_json`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestField {
    Principal,
    Action,
    Resource,
    Context,
    Entities,
    /// The request as a whole (schema validation of the principal, action,
    /// resource and context together).
    Request,
}

impl RequestField {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestField::Principal => "principal",
            RequestField::Action => "action",
            RequestField::Resource => "resource",
            RequestField::Context => "context_json",
            RequestField::Entities => "entities_json",
            RequestField::Request => "request",
        }
    }
}

impl fmt::Display for RequestField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest message a [`RequestError::Invalid`] carries: Cedar's
/// diagnostics quote the input, and a 3 MB value must not come back as a
/// 3 MB status.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1_024;

/// `text`, or its first `max` bytes (cut at a character boundary) and its
/// length: how any input value is quoted in a message.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len()).into()
}

/// A request that cannot be evaluated. Never becomes an allow.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("`{field}` is invalid: {message}")]
    Invalid {
        field: RequestField,
        message: String,
    },
    #[error("no policy set is loaded yet")]
    NotReady,
    /// Arbiter's own fault (e.g. stored data it could not hand to Cedar);
    /// the decision fails closed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    pub(crate) fn invalid(field: RequestField, message: impl fmt::Display) -> Self {
        let message = message.to_string();
        let message = match bounded(&message, MAX_ERROR_MESSAGE_BYTES) {
            std::borrow::Cow::Borrowed(_) => message,
            std::borrow::Cow::Owned(cut) => cut,
        };
        RequestError::Invalid { field, message }
    }

    /// An invalid field, described by an error and everything that caused it.
    pub(crate) fn invalid_because(field: RequestField, error: &dyn std::error::Error) -> Self {
        RequestError::invalid(field, error_chain(error))
    }
}

/// An error's message followed by its causes, `: `-separated. Cedar often
/// puts the useful part ("attribute `level` should be a Long") in a cause
/// under a generic top line ("entity does not conform to the schema").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let text = next.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = next.source();
    }
    message
}

/// One problem found while loading, located in a file where possible.
#[derive(Debug, Clone)]
pub struct LoadDiagnostic {
    /// File the problem is in (`<embedded>/...` for the built-in default).
    pub file: String,
    /// 1-based line and column, when the problem has a source location.
    pub location: Option<(usize, usize)>,
    pub message: String,
    /// Cedar's full diagnostic rendered with the offending source and a caret.
    pub rendered: String,
}

impl fmt::Display for LoadDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// A policy set, schema or entities file that cannot be loaded; carries every
/// problem found, not just the first.
#[derive(Debug, thiserror::Error)]
pub struct LoadError {
    pub diagnostics: Vec<LoadDiagnostic>,
}

impl LoadError {
    pub(crate) fn one(file: impl Into<String>, message: impl fmt::Display) -> Self {
        let message = message.to_string();
        LoadError {
            diagnostics: vec![LoadDiagnostic {
                file: file.into(),
                location: None,
                rendered: message.clone(),
                message,
            }],
        }
    }

    /// The rendered diagnostics, one after another, for terminals and logs.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for diagnostic in &self.diagnostics {
            out.push_str(&diagnostic.to_string());
            out.push('\n');
            if diagnostic.rendered != diagnostic.message {
                out.push_str(&diagnostic.rendered);
                out.push('\n');
            }
        }
        out
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for diagnostic in &self.diagnostics {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}
