//! Reads the one field of an X.509 certificate that rustls does not check at load: its
//! expiry (`notAfter`), with a minimal DER walk.

/// One DER element: its tag, and its content.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The certificate's `notAfter` as Unix seconds, or `None` if it cannot be read.
pub fn not_after(cert: &[u8]) -> Option<u64> {
    let (SEQUENCE, cert, _) = element(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(cert)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, after) = element(rest)?;
    if tag == VERSION {
        rest = after;
    }
    // serialNumber, signature, issuer, then validity.
    for _ in 0..3 {
        rest = element(rest)?.2;
    }
    let (SEQUENCE, validity, _) = element(rest)? else {
        return None;
    };
    let (_, _, after_not_before) = element(validity)?;
    let (tag, time, _) = element(after_not_before)?;
    unix_time(tag, std::str::from_utf8(time).ok()?)
}

/// A UTCTime or GeneralizedTime as Unix seconds; a time before 1970 (long expired) as 0.
fn unix_time(tag: u8, text: &str) -> Option<u64> {
    let digits = |s: &str| s.parse::<u64>().ok();
    let (year, rest) = match tag {
        UTC_TIME => {
            let yy = digits(text.get(0..2)?)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        GENERALIZED_TIME => (digits(text.get(0..4)?)?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2).and_then(digits);
    let (month, day, hour, min, sec) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if year < 1970 {
        return Some(0);
    }
    Some(days_from_civil(year, month, day)? * 86_400 + hour * 3_600 + min * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> Option<u64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_days() {
        assert_eq!(super::days_from_civil(1970, 1, 1), Some(0));
        assert_eq!(super::days_from_civil(2000, 3, 1), Some(11_017));
        assert_eq!(super::days_from_civil(2026, 11, 29), Some(20_786));
    }

    /// A notAfter before 1970 is long past, not unreadable: the expiry check must see it.
    #[test]
    fn a_time_before_1970_is_the_epoch() {
        assert_eq!(super::unix_time(super::UTC_TIME, "600101000000Z"), Some(0));
        assert_eq!(
            super::unix_time(super::GENERALIZED_TIME, "19600101000000Z"),
            Some(0)
        );
        assert_eq!(
            super::unix_time(super::UTC_TIME, "700102000000Z"),
            Some(86_400)
        );
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(super::not_after(b""), None);
        assert_eq!(super::not_after(&[0x30, 0x82, 0xff]), None);
    }
}
