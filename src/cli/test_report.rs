//! What `arbiter test` writes for machines: JUnit XML (`--junit FILE`) and
//! a JSON summary (`--format json`), from a [`Summary`] of the run. Plain
//! data in, text out: this module knows nothing of how fixtures run.

use serde::Serialize;

/// One run of the fixtures.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Fixture files, in the order they ran.
    pub files: Vec<String>,
    pub passed: usize,
    pub failed: usize,
    pub cases: Vec<CaseReport>,
    /// Policies no passing case made determining, in the set's order.
    pub never_exercised: Vec<String>,
}

/// One fixture case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub file: String,
    pub name: String,
    pub passed: bool,
    pub expected_decision: &'static str,
    pub expected_reasons: Vec<String>,
    /// `allow` or `deny`; absent when the request itself was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub got_decision: Option<&'static str>,
    pub got_reasons: Vec<String>,
    /// Policies whose evaluation errored (`id: message`).
    pub errors: Vec<String>,
    /// Why the request was refused before any decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_error: Option<String>,
}

impl CaseReport {
    /// `allow [a,b]`, or the request error.
    fn got(&self) -> String {
        match (&self.got_decision, &self.request_error) {
            (Some(decision), _) => {
                let mut got = format!("{decision} [{}]", self.got_reasons.join(","));
                if !self.errors.is_empty() {
                    got.push_str(&format!(" (evaluation errors: {})", self.errors.join("; ")));
                }
                got
            }
            (None, Some(error)) => format!("request error: {error}"),
            (None, None) => "no decision".to_owned(),
        }
    }

    fn expected(&self) -> String {
        format!(
            "{} [{}]",
            self.expected_decision,
            self.expected_reasons.join(",")
        )
    }
}

impl Summary {
    /// `never exercised: p1, p7` (or `none`).
    pub fn coverage_line(&self) -> String {
        if self.never_exercised.is_empty() {
            "never exercised: none".to_owned()
        } else {
            format!("never exercised: {}", self.never_exercised.join(", "))
        }
    }

    /// The JSON summary (one object).
    pub fn json(&self) -> String {
        // Serialising plain strings, numbers and booleans cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|error| {
            format!(
                "{{\"error\": {}}}",
                serde_json::Value::from(error.to_string())
            )
        })
    }

    /// JUnit XML: one `testsuite` per fixture file, one `testcase` per
    /// case, a `failure` with expected and got for each failing one; the
    /// coverage line as the run's `system-out`.
    pub fn junit(&self) -> String {
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        out.push_str(&format!(
            "<testsuites name=\"arbiter test\" tests=\"{}\" failures=\"{}\">\n",
            self.cases.len(),
            self.failed
        ));
        for file in &self.files {
            let cases: Vec<&CaseReport> = self
                .cases
                .iter()
                .filter(|case| &case.file == file)
                .collect();
            let failures = cases.iter().filter(|case| !case.passed).count();
            out.push_str(&format!(
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\">\n",
                escape(file),
                cases.len()
            ));
            for case in cases {
                out.push_str(&format!(
                    "    <testcase classname=\"{}\" name=\"{}\"",
                    escape(file),
                    escape(&case.name)
                ));
                if case.passed {
                    out.push_str("/>\n");
                    continue;
                }
                let message = format!("expected {}, got {}", case.expected(), case.got());
                out.push_str(&format!(
                    ">\n      <failure message=\"{}\" type=\"mismatch\">expected: {}\ngot: {}</failure>\n    </testcase>\n",
                    escape(&message),
                    escape(&case.expected()),
                    escape(&case.got())
                ));
            }
            out.push_str("  </testsuite>\n");
        }
        out.push_str(&format!(
            "  <system-out>{}</system-out>\n</testsuites>\n",
            escape(&self.coverage_line())
        ));
        out
    }
}

/// Text for an XML attribute or element: the five markup characters
/// escaped, and characters XML 1.0 cannot carry at all (most control
/// characters) replaced by U+FFFD.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_control_characters() {
        assert_eq!(
            escape("a<b>&\"c\"'d'\u{1}\n"),
            "a&lt;b&gt;&amp;&quot;c&quot;&apos;d&apos;\u{FFFD}\n"
        );
    }
}
