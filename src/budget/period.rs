//! UTC calendar boundaries for budget periods and usage windows, on Unix seconds.

use crate::api::Period;

const DAY: u64 = 86_400;

/// The civil date of a day number (days since 1970-01-01), after Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The day number of a civil date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn day_start(t: u64) -> u64 {
    t - t % DAY
}

/// Monday 00:00 UTC of the week of `t` (1970-01-01 was a Thursday).
pub fn week_start(t: u64) -> u64 {
    let days = t / DAY;
    (days - (days + 3) % 7) * DAY
}

pub fn month_start(t: u64) -> u64 {
    let (y, m, _) = civil_from_days((t / DAY) as i64);
    (days_from_civil(y, m, 1).max(0) as u64) * DAY
}

/// When the period containing `t` started; 0 for `never`.
pub fn period_start(period: Period, t: u64) -> u64 {
    match period {
        Period::Daily => day_start(t),
        Period::Weekly => week_start(t),
        Period::Monthly => month_start(t),
        Period::Never => 0,
    }
}

/// When the period containing `t` ends (the next one starts); `None` for `never`.
pub fn period_end(period: Period, t: u64) -> Option<u64> {
    match period {
        Period::Daily => Some(day_start(t) + DAY),
        Period::Weekly => Some(week_start(t) + 7 * DAY),
        // The 32nd day after the first is always in the next month.
        Period::Monthly => Some(month_start(month_start(t) + 32 * DAY)),
        Period::Never => None,
    }
}

/// `2026-11-25T00:00:00Z`.
pub fn rfc3339(t: u64) -> String {
    let (y, m, d) = civil_from_days((t / DAY) as i64);
    let s = t % DAY;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s % 3600 / 60, s % 60)
}

/// Reads back what [`rfc3339`] writes: `YYYY-MM-DDTHH:MM:SSZ`, UTC, from 1970 on. `None` for
/// anything else.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z'
    {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = text.get(range)?;
        digits.bytes().all(|c| c.is_ascii_digit()).then(|| digits.parse().ok())?
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    if civil_from_days(days) != (i64::from(year), month, day) {
        return None; // 31 April and the like
    }
    let days = u64::try_from(days).ok()?;
    Some(days * DAY + u64::from(hour) * 3600 + u64::from(minute) * 60 + u64::from(second))
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-25 13:45:10 UTC, a Wednesday.
    const T: u64 = 1_795_614_310;

    #[test]
    fn boundaries() {
        assert_eq!(rfc3339(T), "2026-11-25T13:45:10Z");
        assert_eq!(rfc3339(day_start(T)), "2026-11-25T00:00:00Z");
        assert_eq!(rfc3339(week_start(T)), "2026-11-23T00:00:00Z", "the Monday before");
        assert_eq!(rfc3339(month_start(T)), "2026-11-01T00:00:00Z");
        assert_eq!(period_start(Period::Never, T), 0);
        assert_eq!(period_end(Period::Daily, T).map(rfc3339).as_deref(), Some("2026-11-26T00:00:00Z"));
        assert_eq!(period_end(Period::Weekly, T).map(rfc3339).as_deref(), Some("2026-11-30T00:00:00Z"));
        assert_eq!(period_end(Period::Monthly, T).map(rfc3339).as_deref(), Some("2026-12-01T00:00:00Z"));
        let december = parse_rfc3339("2026-12-31T23:59:59Z").unwrap();
        assert_eq!(period_end(Period::Monthly, december).map(rfc3339).as_deref(), Some("2027-01-01T00:00:00Z"));
        assert_eq!(period_end(Period::Never, T), None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn rfc3339_reads_back() {
        for t in [0, T, day_start(T), month_start(T), 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        for bad in [
            "",
            "2026-11-25",
            "2026-11-25T13:45:10",
            "2026-04-31T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-11-25T24:00:00Z",
            "2026-11-2xT00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn weeks_start_on_monday_even_at_the_boundary() {
        let monday = week_start(T);
        assert_eq!(week_start(monday), monday);
        assert_eq!(week_start(monday - 1), monday - 7 * DAY, "Sunday 23:59:59 is the week before");
    }

    #[test]
    fn months_and_leap_years() {
        for (date, first) in [
            (days_from_civil(2024, 2, 29), days_from_civil(2024, 2, 1)),
            (days_from_civil(2024, 3, 1), days_from_civil(2024, 3, 1)),
            (days_from_civil(2026, 12, 31), days_from_civil(2026, 12, 1)),
            (days_from_civil(2027, 1, 1), days_from_civil(2027, 1, 1)),
        ] {
            assert_eq!(month_start(date as u64 * DAY + 5), first as u64 * DAY);
        }
        for days in [-1000i64, 0, 19_000, 20_000, 60_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
