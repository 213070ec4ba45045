//! Numbers for people: what the UI, figure titles, CSV settings and CLI summaries show of a
//! capacity factor, rate or time (`1.25`, not the `1.2500000000000002` that `2.5 / 2` prints).
//! Machine-readable JSON keeps the full-precision number; only text goes through here.

/// `v` with at most `decimals` decimals, trailing zeros dropped: `1.25`, `2`, `0.3333`; `-0`
/// prints as `0`, and NaN and infinities as Rust prints them.
pub fn number_with(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let s = format!("{v:.decimals$}");
    let s = match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => s,
    };
    if s == "-0" { "0".into() } else { s }
}

/// [`number_with`] at 4 decimals: enough for any capacity factor a person types.
pub fn number(v: f64) -> String {
    number_with(v, 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short_and_exact_enough() {
        assert_eq!(number(1.2500000000000002), "1.25");
        assert_eq!(number(2.5 / 2.0), "1.25");
        assert_eq!(number(0.1 + 0.2), "0.3");
        assert_eq!(number(2.0), "2");
        assert_eq!(number(1.0 / 3.0), "0.3333");
        assert_eq!(number(100.0), "100");
        assert_eq!(number(-0.00001), "0");
        assert_eq!(number(-1.5), "-1.5");
        assert_eq!(number(1e-5), "0");
        assert_eq!(number_with(1e-5, 6), "0.00001");
        assert_eq!(number_with(12.345, 1), "12.3");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "inf");
    }
}
