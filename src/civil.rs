//! UTC calendar dates of instants, for the places that write a time themselves: the
//! access log, the live report's file name and text, the simulated backend's error
//! bodies; and the reverse, for the cache's HTTP-date parser. Proleptic Gregorian
//! calendar, Howard Hinnant's day-count algorithms. A leaf: imports nothing from the crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// An instant as a UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    /// 1 to 12.
    pub month: u32,
    /// 1 to 31.
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millisecond: u32,
}

impl Civil {
    /// The UTC date and time of `time`; an instant before 1970 counts as 1970-01-01.
    pub fn of(time: SystemTime) -> Civil {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let rest = (secs % 86_400) as u32;
        let (year, month, day) = date_of_day((secs / 86_400) as i64);
        Civil {
            year,
            month,
            day,
            hour: rest / 3600,
            minute: rest / 60 % 60,
            second: rest % 60,
            millisecond: since.subsec_millis(),
        }
    }
}

/// The (year, month 1-12, day 1-31) of a count of days since 1970-01-01, which may be
/// negative.
pub fn date_of_day(days: i64) -> (i64, u32, u32) {
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

/// Days since 1970-01-01 of a date (month 1-12), the inverse of [`date_of_day`].
pub fn day_of_date(year: i64, month: u32, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn instants_become_their_utc_dates_and_back() {
        // 2024-02-29T23:59:58.042Z, a leap day.
        let leap = UNIX_EPOCH + Duration::from_millis(1_709_251_198_042);
        let civil = Civil::of(leap);
        assert_eq!(
            (civil.year, civil.month, civil.day),
            (2024, 2, 29),
            "{civil:?}"
        );
        assert_eq!(
            (civil.hour, civil.minute, civil.second, civil.millisecond),
            (23, 59, 58, 42)
        );
        assert_eq!(Civil::of(UNIX_EPOCH).year, 1970);
        for days in [-800_000, -1, 0, 59, 60, 19_782, 2_932_896] {
            let (year, month, day) = date_of_day(days);
            assert_eq!(day_of_date(year, month, i64::from(day)), days, "{days}");
        }
        assert_eq!(date_of_day(-1), (1969, 12, 31));
    }
}
