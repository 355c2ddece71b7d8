//! The `Range` request header for blobs: one `bytes=` range in the forms `a-b`, `a-` and
//! `-n` (RFC 9110 section 14.1.2). Anything else is ignored and the whole blob served.

use mirrorlet_oci::ByteRange;

/// What to serve for a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: serve the whole blob with 200.
    Full,
    /// Serve this part with 206.
    Partial(ByteRange),
    /// The range lies outside the blob: 416.
    Unsatisfiable,
}

/// What to serve of a blob of `size` bytes for an optional `Range` header: the range and
/// whether it is partial (206), or the 416 error.
pub fn select(
    header: Option<&str>,
    size: u64,
) -> Result<(ByteRange, bool), crate::error::RegistryError> {
    match header.map(|h| parse(h, size)) {
        None | Some(RangeRequest::Full) => Ok((ByteRange::full(size), false)),
        Some(RangeRequest::Partial(r)) => Ok((r, true)),
        Some(RangeRequest::Unsatisfiable) => {
            Err(crate::error::RegistryError::RangeNotSatisfiable { size })
        }
    }
}

/// Interprets a `Range` header value against a blob of `size` bytes.
pub fn parse(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        // Several ranges: allowed to ignore, and containerd never asks for them.
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), num(first), num(last)) {
        // -n: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial(ByteRange {
                    start: size - n.min(size),
                    end: size,
                })
            }
        }
        // a- : from a to the end.
        (false, Some(a), None) if last.trim().is_empty() => {
            if a >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial(ByteRange {
                    start: a,
                    end: size,
                })
            }
        }
        // a-b
        (false, Some(a), Some(b)) if a <= b => {
            if a >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial(ByteRange {
                    start: a,
                    end: b.saturating_add(1).min(size),
                })
            }
        }
        _ => RangeRequest::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start, end })
    }

    #[test]
    fn the_three_forms() {
        assert_eq!(parse("bytes=0-9", 100), part(0, 10));
        assert_eq!(parse("bytes=90-200", 100), part(90, 100));
        assert_eq!(parse("bytes=10-", 100), part(10, 100));
        assert_eq!(parse("bytes=-10", 100), part(90, 100));
        assert_eq!(parse("bytes=-1000", 100), part(0, 100));
        assert_eq!(parse("bytes=99-99", 100), part(99, 100));
    }

    #[test]
    fn unsatisfiable() {
        assert_eq!(parse("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse("bytes=100-200", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse("bytes=-0", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse("bytes=0-", 0), RangeRequest::Unsatisfiable);
    }

    #[test]
    fn ignored_forms_serve_everything() {
        for h in [
            "items=0-1",
            "bytes=5-1",
            "bytes=0-1,5-6",
            "bytes=a-b",
            "bytes=",
            "bytes=-",
            "bytes=1",
            "bytes=+1-2",
        ] {
            assert_eq!(parse(h, 100), RangeRequest::Full, "{h}");
        }
    }
}
