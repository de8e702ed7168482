//! HTTP-date parsing (RFC 9110 §5.6.7) for the cache's freshness and validator
//! arithmetic: the three formats a recipient must accept (IMF-fixdate, the obsolete
//! RFC 850 and asctime forms), read without regard to letter case and without
//! checking the day name against the date, since a wrongly cased `gmt` or a wrong
//! weekday still names one instant. Anything else (another zone such as `UTC`,
//! extra spaces, a missing comma, a two-digit year in IMF-fixdate) is invalid.
//! Pure functions; writing dates is left to `httpdate`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::civil::{date_of_day, day_of_date};

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const LONG_DAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// Parses an HTTP-date; `None` when it is not one.
pub fn parse(value: &str) -> Option<SystemTime> {
    parse_at(value, SystemTime::now())
}

/// Like [`parse`], with `now` deciding the century of an RFC 850 two-digit year.
pub fn parse_at(value: &str, now: SystemTime) -> Option<SystemTime> {
    let lower = value.trim().to_ascii_lowercase();
    match lower.split_once(',') {
        // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
        Some((day, rest)) if DAYS.contains(&day) => {
            let b = rest.as_bytes();
            if b.len() != 25 || b[0] != b' ' || b[3] != b' ' || b[7] != b' ' || b[12] != b' ' {
                return None;
            }
            let year = digits(&rest[8..12])?;
            instant(year, month(&rest[4..7])?, digits(&rest[1..3])?, &rest[13..])
        }
        // RFC 850: "Sunday, 06-Nov-94 08:49:37 GMT"
        Some((day, rest)) if LONG_DAYS.contains(&day) => {
            let b = rest.as_bytes();
            if b.len() != 23 || b[0] != b' ' || b[3] != b'-' || b[7] != b'-' || b[10] != b' ' {
                return None;
            }
            let year = two_digit_year(digits(&rest[8..10])?, now);
            instant(year, month(&rest[4..7])?, digits(&rest[1..3])?, &rest[11..])
        }
        Some(_) => None,
        // asctime: "Sun Nov  6 08:49:37 1994"
        None => {
            let b = lower.as_bytes();
            if b.len() != 24 || b[3] != b' ' || b[7] != b' ' || b[10] != b' ' || b[19] != b' ' {
                return None;
            }
            if !DAYS.contains(&&lower[..3]) {
                return None;
            }
            let day = match &lower[8..10] {
                d if d.starts_with(' ') => digits(&d[1..])?,
                d => digits(d)?,
            };
            let time_and_zone = format!("{} gmt", &lower[11..19]);
            instant(
                digits(&lower[20..])?,
                month(&lower[4..7])?,
                day,
                &time_and_zone,
            )
        }
    }
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn month(s: &str) -> Option<u32> {
    MONTHS.iter().position(|m| *m == s).map(|i| i as u32 + 1)
}

/// RFC 9110 §5.6.7: a two-digit year more than 50 years in the future is the
/// most recent past year with those digits.
fn two_digit_year(yy: i64, now: SystemTime) -> i64 {
    let days = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| (d.as_secs() / 86_400) as i64);
    let this_year = date_of_day(days).0;
    let year = this_year - this_year % 100 + yy;
    if year > this_year + 50 {
        year - 100
    } else {
        year
    }
}

/// `time_zone` is "HH:MM:SS gmt".
fn instant(year: i64, month: u32, day: i64, time_zone: &str) -> Option<SystemTime> {
    let t = time_zone.as_bytes();
    if t.len() != 12 || t[2] != b':' || t[5] != b':' || &time_zone[8..] != " gmt" {
        return None;
    }
    let (h, m, s) = (
        digits(&time_zone[..2])?,
        digits(&time_zone[3..5])?,
        digits(&time_zone[6..8])?,
    );
    if h > 23 || m > 59 || s > 60 || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let secs = day_of_date(year, month, day) * 86_400 + h * 3600 + m * 60 + s;
    Some(if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    })
}

fn days_in_month(year: i64, month: u32) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(value: &str) -> Option<i64> {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 00:00:00 GMT").unwrap();
        parse_at(value, now).map(|t| match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        })
    }

    #[test]
    fn the_three_formats_name_the_same_instant() {
        let expected = Some(784_111_777);
        assert_eq!(secs("Sun, 06 Nov 1994 08:49:37 GMT"), expected);
        assert_eq!(secs("Sunday, 06-Nov-94 08:49:37 GMT"), expected);
        assert_eq!(secs("Sun Nov  6 08:49:37 1994"), expected);
    }

    #[test]
    fn agrees_with_httpdate_on_what_it_writes() {
        for s in [
            0u64,
            951_782_400,
            2_147_483_648,
            4_102_444_800,
            9_999_999_999,
        ] {
            let t = UNIX_EPOCH + Duration::from_secs(s);
            assert_eq!(parse(&httpdate::fmt_http_date(t)), Some(t), "{s}");
        }
        assert_eq!(secs("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(secs("Wed, 31 Dec 1969 23:59:59 GMT"), Some(-1));
    }

    #[test]
    fn case_and_day_name_are_not_checked() {
        let expected = secs("Thu, 18 Aug 2050 02:01:18 GMT");
        assert!(expected.is_some());
        for v in [
            "THU, 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 AUG 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18 gMT",
            "Mon, 18 Aug 2050 02:01:18 GMT",
            "Thursday, 18-Aug-50 02:01:18 GMT",
            "Thu Aug 18 02:01:18 2050",
        ] {
            assert_eq!(secs(v), expected, "{v}");
        }
    }

    #[test]
    fn a_two_digit_year_is_at_most_fifty_years_ahead() {
        assert_eq!(secs("Saturday, 01-Jan-77 00:00:00 GMT"), Some(220_924_800));
        assert!(secs("Saturday, 01-Jan-50 00:00:00 GMT").unwrap() > 2_500_000_000);
    }

    #[test]
    fn everything_else_is_invalid() {
        for v in [
            "0",
            "",
            "foo",
            "Thu, 18 Aug 2050 02:01:18 UTC",
            "Thu, 18 Aug 2050 02:01:18 AEST",
            "Thu, 18 Aug 50 02:01:18 GMT",
            "Thu 18 Aug 2050 02:01:18 GMT",
            "Thu, 18  Aug  2050 02:01:18 GMT",
            "Thu, 18-Aug-2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02.01.18 GMT",
            "Thu, 18 Aug 2050 2:01:18 GMT",
            "Thu, 31 Feb 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 24:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18",
            "Xyz, 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 Aug -050 02:01:18 GMT",
        ] {
            assert_eq!(secs(v), None, "{v:?}");
        }
    }
}
