//! The two string formats of the API that carry numbers: durations and decimal money.
//!
//! Each format is defined once here: the pattern that the CRD schema enforces and the parser that
//! the compile step uses. A test checks that both accept exactly the same strings.

use std::time::Duration;

/// Durations as Go and Kubernetes write them, restricted to whole numbers: `800ms`, `2s`, `5m`,
/// `1h30m`. Bounded so that the CEL `duration()` function converts every string this matches
/// (Go's durations end at about 292 years): at most four parts, hours of at most 5 digits (11
/// years), minutes of 7 (19 years), seconds and milliseconds of 9 (31 years, 11 days).
pub const DURATION_PATTERN: &str = duration_pattern!();

/// [`DURATION_PATTERN`] as a literal, for the CEL rules that `concat!` it.
macro_rules! duration_pattern {
    () => {
        "^([0-9]{1,5}h|[0-9]{1,7}m|[0-9]{1,9}s|[0-9]{1,9}ms){1,4}$"
    };
}
pub(crate) use duration_pattern;

/// A CEL condition that holds when both fields are well-formed durations. The API server runs
/// an object's rules even when a field has failed its pattern; a rule that converts durations
/// checks them first, so that a bad duration gets the pattern's message alone, not a
/// conversion error beside it.
macro_rules! durations_valid {
    ($a:literal, $b:literal) => {
        concat!(
            $a,
            ".matches('",
            $crate::api::units::duration_pattern!(),
            "') && ",
            $b,
            ".matches('",
            $crate::api::units::duration_pattern!(),
            "')"
        )
    };
}
pub(crate) use durations_valid;

/// Most digits of a duration's part, by unit, and most parts: what [`DURATION_PATTERN`] says.
const DURATION_DIGITS: [(&str, usize); 4] = [("ms", 9), ("s", 9), ("m", 7), ("h", 5)];
const DURATION_PARTS: usize = 4;

/// Non-negative decimals with at most six fractional digits, so that every value is an exact
/// number of micro-units: `0`, `2.50`, `0.000125`.
pub const DECIMAL_PATTERN: &str = "^[0-9]{1,12}(\\.[0-9]{1,6})?$";

/// One currency unit in micro-units. Money is `u64` micro-units inside the program, never a float.
pub const MICROS_PER_UNIT: u64 = 1_000_000;

/// Parses a duration matching [`DURATION_PATTERN`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "invalid duration {s:?}: expected up to four whole numbers with units (ms, s, m, h), for example \"800ms\", \"2s\" or \"1m30s\"; hours take at most 5 digits, minutes 7, seconds and milliseconds 9"
        )
    };
    if s.is_empty() {
        return Err(invalid());
    }
    let bytes = s.as_bytes();
    let mut total = Duration::ZERO;
    let (mut i, mut parts) = (0, 0);
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = i - start;
        let Some(&(unit, most)) = DURATION_DIGITS.iter().find(|(unit, _)| s[i..].starts_with(unit)) else {
            return Err(invalid());
        };
        parts += 1;
        if digits == 0 || digits > most || parts > DURATION_PARTS {
            return Err(invalid());
        }
        // At most 9 ASCII digits: always fits in a u64.
        let n: u64 = s[start..i].parse().map_err(|_| invalid())?;
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            _ => Duration::from_secs(n * 3600),
        };
        i += unit.len();
        total = total.checked_add(part).ok_or_else(invalid)?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it back (used in messages and tests).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Parses a decimal matching [`DECIMAL_PATTERN`] into micro-units: `"2.50"` is `2_500_000`.
pub fn parse_micros(s: &str) -> Result<u64, String> {
    let invalid =
        || format!("invalid decimal {s:?}: expected digits with at most 6 decimal places, for example \"2.50\"");
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || whole.len() > 12
        || !all_digits(whole)
        || frac.len() > 6
        || (s.contains('.') && frac.is_empty())
        || !all_digits(frac)
    {
        return Err(invalid());
    }
    // 12 digits of units times 10^6 stays below 10^18 < u64::MAX.
    let units: u64 = whole.parse().map_err(|_| invalid())?;
    let mut micros: u64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        micros += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
    }
    Ok(units * MICROS_PER_UNIT + micros)
}

/// Reads a non-negative JSON number (its source text, as `1.5`, `2`, `2.5e-1`) as micro-units
/// exactly, truncating past the sixth decimal. Request fields that carry prices or seconds are JSON
/// numbers; reading their text keeps them out of floating point.
pub fn parse_json_micros(text: &str) -> Result<u64, String> {
    let invalid = || format!("{text} is not a non-negative number");
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i32>().map_err(|_| invalid())?),
        None => (text, 0),
    };
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    // The digits as an integer, and where the decimal point sits after scaling to micro-units.
    let digits = format!("{whole}{frac}");
    let point = whole.len() as i64 + i64::from(exponent) + 6;
    let too_large = || format!("{text} is too large");
    if point <= 0 {
        return Ok(0);
    }
    let point = point as usize;
    let integer = if point >= digits.len() {
        if point - digits.len() > 18 {
            return Err(too_large());
        }
        format!("{digits}{}", "0".repeat(point - digits.len()))
    } else {
        digits[..point].to_string()
    };
    let integer = integer.trim_start_matches('0');
    if integer.is_empty() {
        return Ok(0);
    }
    integer.parse().map_err(|_| too_large())
}

/// The longest start of `s` of at most `max` bytes that ends on a character boundary.
pub fn prefix(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Formats micro-units as the shortest decimal string that [`parse_micros`] reads back.
/// Written digit by digit: it runs for every metered answer (the cost header and body field),
/// where two `format!`s cost more than the rest of the bill.
pub fn format_micros(micros: u64) -> String {
    // u64::MAX has 20 digits; a point and 6 decimals follow.
    let mut digits = [0u8; 27];
    let mut start = digits.len();
    let mut push = |digit: u8| {
        start -= 1;
        digits[start] = digit;
    };
    let mut frac = micros % MICROS_PER_UNIT;
    if frac != 0 {
        let mut places = 6;
        while frac.is_multiple_of(10) {
            frac /= 10;
            places -= 1;
        }
        for _ in 0..places {
            push(b'0' + (frac % 10) as u8);
            frac /= 10;
        }
        push(b'.');
    }
    let mut units = micros / MICROS_PER_UNIT;
    loop {
        push(b'0' + (units % 10) as u8);
        units /= 10;
        if units == 0 {
            break;
        }
    }
    digits[start..].iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_on_a_character_boundary() {
        assert_eq!(prefix("café au lait", 4), "caf", "é is two bytes: not cut in half");
        assert_eq!(prefix("café", 5), "café");
        assert_eq!(prefix("café", 99), "café");
        assert_eq!(prefix("", 3), "");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("800ms"), Ok(Duration::from_millis(800)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m500ms"), Ok(Duration::from_millis(60_500)));
        for bad in ["", "2", "s", "2 s", "1.5s", "-1s", "2d", "2sec", "1000000000s", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        for d in ["800ms", "2s", "5m", "1h", "0s"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_micros("0"), Ok(0));
        assert_eq!(parse_micros("2.50"), Ok(2_500_000));
        assert_eq!(parse_micros("0.000125"), Ok(125));
        assert_eq!(parse_micros("10"), Ok(10_000_000));
        assert_eq!(parse_micros("999999999999.999999"), Ok(999_999_999_999_999_999));
        for bad in ["", ".5", "5.", "1.1234567", "-1", "1e3", "1,5", " 1", "1 ", "1000000000000"] {
            assert!(parse_micros(bad).is_err(), "{bad:?} should be rejected");
        }
        for s in ["0", "2.5", "0.000125", "10", "1.1", "0.000001", "100.01", "999999999999.999999"] {
            assert_eq!(format_micros(parse_micros(s).unwrap()), s);
        }
        assert_eq!(format_micros(u64::MAX), "18446744073709.551615");
    }

    #[test]
    fn json_numbers() {
        for (text, micros) in [
            ("0", 0),
            ("1", 1_000_000),
            ("2.5", 2_500_000),
            ("0.1", 100_000),
            ("1e3", 1_000_000_000),
            ("2.5E-1", 250_000),
            ("1e-7", 0),
            ("0.0000019", 1),
            ("00012.5", 12_500_000),
        ] {
            assert_eq!(parse_json_micros(text), Ok(micros), "{text}");
        }
        for bad in ["-1", "", ".5", "1e", "x", "1e400", "99999999999999999999"] {
            assert!(parse_json_micros(bad).is_err(), "{bad:?}");
        }
    }
}
