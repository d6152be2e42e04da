//! Prints iscsi-test-cu pass/fail/skip counts side by side for several targets.
//!
//! Usage: `conformance-report NAME=LOG [NAME=LOG ...]`, where each LOG is the output of
//! `iscsi-test-cu --verbose`. Used by `scripts/conformance-vs-tgt.sh`.

use std::process::ExitCode;
use tests::cunit::{parse, Outcome};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: conformance-report NAME=LOG [NAME=LOG ...]");
        return ExitCode::FAILURE;
    }
    println!("| target | tests | passed | failed | skipped |");
    println!("| --- | --- | --- | --- | --- |");
    let mut details = String::new();
    for a in &args {
        let Some((name, path)) = a.split_once('=') else {
            eprintln!("error: `{a}` is not NAME=LOG");
            return ExitCode::FAILURE;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot read {path}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let r = parse(&text);
        let count = |o| r.iter().filter(|t| t.outcome == o).count();
        println!(
            "| {name} | {} | {} | {} | {} |",
            r.len(),
            count(Outcome::Pass),
            count(Outcome::Fail),
            count(Outcome::Skip)
        );
        let failed: Vec<&str> = r
            .iter()
            .filter(|t| t.outcome == Outcome::Fail)
            .map(|t| t.name.as_str())
            .collect();
        details.push_str(&format!(
            "\n{name} failures ({}): {}\n",
            failed.len(),
            failed.join(", ")
        ));
    }
    print!("{details}");
    ExitCode::SUCCESS
}
