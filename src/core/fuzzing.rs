//! What the property tests that fuzz the decoders of outside input share: their run settings
//! and generators of near-valid text. Each target's tests sit beside the module it decodes
//! with (a `fuzz` submodule, every test named `fuzz_…`); `scripts/fuzz.sh` runs them all at
//! a high case count, while the default test run keeps to a few cases each.

use proptest::prelude::*;
use proptest::test_runner::Config;

/// The settings of one fuzz target: `PROPTEST_CASES` cases when it is set (as
/// `scripts/fuzz.sh` does), else `default_cases`, few enough to keep the default test run
/// fast. Nothing is persisted: every failure found becomes a unit test of its own.
pub(crate) fn config(default_cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default_cases;
    }
    config.failure_persistence = None;
    config
}

/// Characters that trip parsers: separators of every grammar here, whitespace and control
/// characters, and non-ASCII that looks like ASCII or changes length when case-mapped.
pub(crate) const TRICKY: &[char] = &[
    ':', '/', '.', '*', '@', '[', ']', '%', '#', '?', '=', ',', ';', '-', '_', '+', '"', '\\', '{',
    '}', '`', ' ', '\t', '\n', '\r', '\0', '\u{7f}', '\u{85}', '\u{a0}', '\u{200b}', '\u{feff}',
    'é', 'İ', 'ı', 'K', '\u{212a}', '０', 'ß', '😀', '9', '0', 'A', 'z',
];

/// One tricky character, or any character at all.
pub(crate) fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => proptest::sample::select(TRICKY),
        1 => any::<char>(),
    ]
}

/// One edit to a string.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    Insert(prop::sample::Index, char),
    Delete(prop::sample::Index),
    Replace(prop::sample::Index, char),
    /// Repeat a slice of the text in place (doubled separators, long runs).
    Repeat(prop::sample::Index, prop::sample::Index, u8),
    FlipCase(prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<prop::sample::Index>()
            .prop_flat_map(|i| tricky_char().prop_map(move |c| Edit::Insert(i, c))),
        any::<prop::sample::Index>().prop_map(Edit::Delete),
        any::<prop::sample::Index>()
            .prop_flat_map(|i| tricky_char().prop_map(move |c| Edit::Replace(i, c))),
        (
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            1..40u8
        )
            .prop_map(|(a, b, n)| Edit::Repeat(a, b, n)),
        any::<prop::sample::Index>().prop_map(Edit::FlipCase),
        any::<prop::sample::Index>().prop_map(Edit::Truncate),
    ]
}

/// Apply edits to `text`, on character boundaries.
pub(crate) fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let n = chars.len();
        match e {
            Edit::Insert(i, c) => chars.insert(i.index(n + 1), *c),
            Edit::Delete(i) if n > 0 => {
                chars.remove(i.index(n));
            }
            Edit::Replace(i, c) if n > 0 => chars[i.index(n)] = *c,
            Edit::Repeat(a, b, times) if n > 0 => {
                let (a, b) = (a.index(n), b.index(n));
                let (from, to) = (a.min(b), a.max(b) + 1);
                let slice: Vec<char> = chars[from..to].to_vec();
                for _ in 0..*times {
                    chars.splice(to..to, slice.iter().copied());
                }
            }
            Edit::FlipCase(i) if n > 0 => {
                let at = i.index(n);
                let c = chars[at];
                chars[at] = if c.is_ascii_lowercase() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                };
            }
            Edit::Truncate(i) => chars.truncate(i.index(n + 1)),
            _ => {}
        }
    }
    chars.into_iter().collect()
}

/// `count` edits, to [`apply`] to a text.
pub(crate) fn edits(count: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), count)
}

/// `base`, or `base` with up to three edits: mostly near-valid, sometimes untouched.
pub(crate) fn mutated(base: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (base, edits(0..4)).prop_map(|(text, edits)| apply(&text, &edits))
}

/// Any text at all, weighted towards the tricky characters.
pub(crate) fn garbage(max_len: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(tricky_char(), 0..max_len).prop_map(|c| c.into_iter().collect())
}
