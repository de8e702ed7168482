//! Byte ranges served from a stored complete response (RFC 9110 §14): a single
//! `bytes` range is answered with a `206` cut from the stored body. Anything the
//! cache does not answer itself (several ranges, another unit, an unsatisfiable or
//! malformed range) goes to the origin as it came. Pure functions.

/// The first and last byte offsets (inclusive) a `Range` field value selects in a
/// body of `len` bytes; `None` when the cache should not answer it itself.
pub fn single(value: &str, len: u64) -> Option<(u64, u64)> {
    let (unit, set) = value.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') || len == 0 {
        return None;
    }
    let (first, last) = set.trim().split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if first.trim().is_empty() {
        // suffix-range: the last N bytes
        let n = number(last)?;
        return (n > 0).then(|| (len.saturating_sub(n), len - 1));
    }
    let first = number(first)?;
    let last = if last.trim().is_empty() {
        len - 1
    } else {
        number(last)?.min(len - 1)
    };
    (first <= last && first < len).then_some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_byte_range_of_each_form() {
        assert_eq!(single("bytes=0-1", 11), Some((0, 1)));
        assert_eq!(single("bytes=1-", 11), Some((1, 10)));
        assert_eq!(single("bytes=-1", 11), Some((10, 10)));
        assert_eq!(single("bytes=-20", 11), Some((0, 10)));
        assert_eq!(single("bytes=5-100", 11), Some((5, 10)));
        assert_eq!(single("Bytes = 2-3", 11), Some((2, 3)));
    }

    #[test]
    fn everything_else_goes_to_the_origin() {
        for value in [
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=3-2",
            "bytes=11-",
            "bytes=-0",
            "bytes=a-b",
            "bytes=-",
            "bytes 0-1",
        ] {
            assert_eq!(single(value, 11), None, "{value}");
        }
        assert_eq!(single("bytes=0-1", 0), None);
    }
}
