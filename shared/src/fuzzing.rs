//! Fuzz targets' harnesses for this crate's parsers, and the replay of every fuzz
//! target's corpus as a test.
//!
//! `fuzz/` (cargo-fuzz, nightly) calls the harnesses of each crate's `fuzzing` module;
//! the crates' own tests, on stable, call the same harnesses on every input kept in
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` (see docs/testing.md). A
//! harness panics when a property it checks does not hold, which is how the fuzzer
//! reports a finding.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use crate::json;

/// The repository's `fuzz/` directory.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every kept input of `target`: its corpus and the findings kept as regressions.
/// Panics if there are none, so a moved or emptied corpus fails the test that replays it.
pub fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a corpus entry").path();
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            out.push((path, bytes));
        }
    }
    assert!(
        !out.is_empty(),
        "no inputs for fuzz target {target} under {}",
        fuzz_dir().display()
    );
    out.sort();
    out
}

/// Runs `harness` on every kept input of `target`, naming each input that fails.
pub fn replay(target: &str, harness: impl Fn(&[u8])) {
    let inputs = inputs(target);
    let failed: Vec<String> = inputs
        .iter()
        .filter(|(_, bytes)| catch_unwind(AssertUnwindSafe(|| harness(bytes))).is_err())
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} inputs of fuzz target {target} fail: {failed:?}",
        failed.len(),
        inputs.len()
    );
}

/// Fuzz target `json_text`: [`json::compact`], [`json::members`] and
/// [`json::push_member`] on any text. Where the text is JSON, compacting keeps the
/// document (same members in the same order, duplicates included, and the same value
/// where `serde_json` can build one), is idempotent, and leaves no whitespace between
/// tokens.
///
/// "JSON" is JSON's grammar, as both sides check it: a string may hold a lone surrogate
/// escape (`"\ud83d"`), which RFC 8259 allows and `serde_json::Value` refuses (found by
/// this target; fuzz/regressions/json_text/lone-surrogate-escape).
pub fn json_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let members = json::members(text);
    let is_json = |t: &str| serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok();
    if !is_json(text) {
        assert!(members.is_err(), "members() of non-JSON {text:?}");
        return;
    }
    let compacted = json::compact(text);
    assert!(
        is_json(&compacted),
        "compact({text:?}) = {compacted:?} is not JSON"
    );
    assert_eq!(
        json::compact(&compacted),
        compacted,
        "compact is not idempotent"
    );
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&compacted)
                .ok()
                .as_ref(),
            Some(&value),
            "compact({text:?}) = {compacted:?} is another document"
        );
    }
    let is_object = text.trim_start().starts_with('{');
    match (is_object, members) {
        (true, Ok(members)) => {
            let again = json::members(&compacted).expect("members of the compacted object");
            let names = |m: &[(std::borrow::Cow<'_, str>, &serde_json::value::RawValue)]| {
                m.iter()
                    .map(|(n, v)| (n.to_string(), json::compact(v.get()).into_owned()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(&members), names(&again), "members changed by compact");
            // Splicing a member into the object keeps it JSON with that member last.
            let mut spliced = compacted.as_bytes().to_vec();
            json::push_member(&mut spliced, "data", "[1]");
            let spliced = std::str::from_utf8(&spliced).expect("UTF-8");
            let last = json::members(spliced).expect("spliced object").pop();
            assert_eq!(
                last.map(|(n, v)| (n.into_owned(), v.get().to_owned())),
                Some(("data".to_owned(), "[1]".to_owned()))
            );
        }
        // A member name with a lone surrogate escape: no `str` can hold it (an event's
        // attribute names are a-z0-9 anyway).
        (true, Err(e)) => assert!(
            serde_json::from_str::<serde_json::Value>(text).is_err(),
            "members() of object {text:?}: {e}"
        ),
        (false, Ok(_)) => panic!("members() of non-object {text:?}"),
        (false, Err(_)) => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_text_corpus() {
        super::replay("json_text", super::json_text);
    }
}
