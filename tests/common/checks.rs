//! Small checks on what the hub answered: a close code and reason (`assert_close`), and event
//! ids compared in order (`parse_event_id`).

/// Assert a close `(code, reason)` equals the expected one, with context.
#[track_caller]
pub fn assert_close(got: (u16, String), code: u16, reason: &str, what: &str) {
    assert_eq!(
        (got.0, got.1.as_str()),
        (code, reason),
        "{what}: expected close {code} {reason:?}, got {} {:?}",
        got.0,
        got.1
    );
}

/// A `"<ms>-<seq>"` event id as a comparable pair.
pub fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}
