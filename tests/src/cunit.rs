//! Parses `iscsi-test-cu -v` output into per-test outcomes, counting `[SKIPPED]` tests
//! separately (CUnit itself reports a skipped test as passed).

/// Outcome of one conformance test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed and exercised the target.
    Pass,
    /// Failed.
    Fail,
    /// Passed only because the feature is reported as not implemented (or not applicable).
    Skip,
}

/// One result: `Suite.Test` and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestResult {
    /// `Suite.Test`.
    pub name: String,
    /// Outcome.
    pub outcome: Outcome,
}

/// Parses verbose CUnit output.
pub fn parse(output: &str) -> Vec<TestResult> {
    let mut results = Vec::new();
    let mut suite = String::new();
    let mut rest = output;
    loop {
        let next_suite = rest.find("Suite: ");
        let next_test = rest.find("  Test: ");
        match (next_suite, next_test) {
            (Some(s), t) if t.is_none_or(|t| s < t) => {
                let line = &rest[s + 7..];
                let end = line.find('\n').unwrap_or(line.len());
                suite = line[..end].trim().to_owned();
                rest = &line[end..];
            }
            (_, Some(t)) => {
                let body = &rest[t + 8..];
                let name_end = body.find(" ...").unwrap_or(0);
                let name = body[..name_end].trim().to_owned();
                let after = &body[name_end..];
                let p = after.find("passed");
                let f = after.find("FAILED\n").or_else(|| after.find("FAILED\r"));
                let (end, failed) = match (p, f) {
                    (Some(p), Some(f)) if f < p => (f, true),
                    (Some(p), _) => (p, false),
                    (None, Some(f)) => (f, true),
                    (None, None) => (after.len(), true),
                };
                // `[FAILED]` inside a test's log is a message, not the verdict: the verdict is
                // the bare word at the end of the test's span.
                let span = &after[..end];
                let outcome = if failed {
                    Outcome::Fail
                } else if span.contains("[SKIPPED]") {
                    Outcome::Skip
                } else {
                    Outcome::Pass
                };
                results.push(TestResult {
                    name: format!("{suite}.{name}"),
                    outcome,
                });
                rest = &after[end..];
            }
            _ => break,
        }
    }
    results
}

/// Parses the expected-failures file: `Suite.Test  reason...` per line; `#` comments.
///
/// # Errors
/// A line without a reason.
pub fn parse_expected(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, reason) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("line {}: `{line}` has no reason", i + 1))?;
        if reason.trim().is_empty() {
            return Err(format!("line {}: `{name}` has no reason", i + 1));
        }
        out.push((name.to_owned(), reason.trim().to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r"    [SKIPPED] PERSISTENT RESERVE IN is not implemented.
Suite: Prefetch10
  Test: Simple ...    [SKIPPED] PREFETCH10 is not implemented.
passed
  Test: BeyondEol ...passed    [SKIPPED] PERSISTENT RESERVE IN is not implemented.
Suite: Read10
  Test: Simple ...    [FAILED] READ10 command failed
FAILED
    1. x.c:1 - CU_ASSERT
  Test: Other ...passed
";

    #[test]
    fn outcomes() {
        let r = parse(SAMPLE);
        let got: Vec<(&str, Outcome)> = r.iter().map(|t| (t.name.as_str(), t.outcome)).collect();
        assert_eq!(
            got,
            vec![
                ("Prefetch10.Simple", Outcome::Skip),
                ("Prefetch10.BeyondEol", Outcome::Pass),
                ("Read10.Simple", Outcome::Fail),
                ("Read10.Other", Outcome::Pass),
            ]
        );
    }

    #[test]
    fn expected_file_needs_reasons() {
        assert_eq!(
            parse_expected("# c\nA.B  because\n").unwrap(),
            vec![("A.B".into(), "because".into())]
        );
        assert!(parse_expected("A.B\n").is_err());
    }
}
