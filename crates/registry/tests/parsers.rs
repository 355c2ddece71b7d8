//! Property tests for the `Range` header, which comes from any client: never a panic, and
//! a partial answer always lies inside the blob.

use mirrorlet_registry::range::{RangeRequest, parse};
use proptest::prelude::*;

fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        "bytes=[0-9 ]{0,22}-[0-9 ]{0,22}",
        "(bytes=)?[-0-9, =a-z]{0,40}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn a_range_is_inside_the_blob_or_refused(h in header(), size in prop_oneof![Just(0_u64), 0_u64..4096, any::<u64>()]) {
        if let RangeRequest::Partial(r) = parse(&h, size) {
            prop_assert!(r.start < r.end && r.end <= size, "{h:?} of {size}: {r:?}");
        }
    }

    #[test]
    fn numeric_ranges(a in any::<u64>(), b in any::<u64>(), size in 1_u64..1 << 40) {
        for h in [format!("bytes={a}-{b}"), format!("bytes={a}-"), format!("bytes=-{b}")] {
            match parse(&h, size) {
                RangeRequest::Partial(r) => prop_assert!(r.start < r.end && r.end <= size),
                RangeRequest::Unsatisfiable => prop_assert!(a >= size || b == 0 || a > b),
                RangeRequest::Full => {}
            }
        }
    }
}
