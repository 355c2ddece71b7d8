//! Property tests for the parsers that see untrusted input: request paths and names,
//! references and digests (from clients and peers), manifests (from peers and upstream).
//! None panics on any input, and what parses prints back to itself.

use mirrorlet_oci::manifest::{OCI_INDEX, OCI_MANIFEST};
use mirrorlet_oci::path::Route;
use mirrorlet_oci::{Digest, ImageName, Manifest, Reference, Registry, Repository};
use proptest::prelude::*;

/// Strings made of what names, tags, digests and paths are made of, and any strings.
fn nearly(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::string::string_regex(&format!("[a-zA-Z0-9._:/@+=%-]{{0,{max}}}"))
            .expect("regex"),
        1 => any::<String>(),
    ]
}

fn digest_text() -> impl Strategy<Value = String> {
    prop_oneof!["sha256:[a-f0-9]{64}", nearly(80)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn digests_parse_back_to_themselves(s in digest_text()) {
        if let Ok(d) = Digest::parse(&s) {
            prop_assert_eq!(&d.to_string(), &s);
            prop_assert_eq!(Digest::parse(&d.to_string()).expect("again"), d);
        }
    }

    #[test]
    fn names_and_references_parse_back_to_themselves(s in nearly(120)) {
        if let Ok(n) = ImageName::parse(&s) {
            prop_assert_eq!(ImageName::parse(&n.to_string()).expect("again"), n);
        }
        if let Ok(n) = ImageName::parse_familiar(&s) {
            prop_assert_eq!(ImageName::parse(&n.to_string()).expect("qualified"), n);
        }
        let _ = Reference::parse(&s);
        if let Ok(r) = Registry::parse(&s) {
            prop_assert_eq!(Registry::parse(r.as_str()).expect("again"), r);
        }
        if let Ok(r) = Repository::parse(&s) {
            prop_assert_eq!(Repository::parse(r.as_str()).expect("again"), r);
        }
    }

    #[test]
    fn request_paths_never_panic(tail in nearly(160), ns in nearly(40)) {
        for path in [format!("/v2/{tail}"), tail.clone()] {
            let _ = Route::locate(&path, None);
            if let Ok(registry) = Registry::parse(&ns) {
                let _ = Route::locate(&path, Some(registry.clone()));
                let _ = Route::parse(&path, &registry);
            }
        }
    }

    #[test]
    fn manifests_never_panic_and_keep_valid_children(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        media_type in prop_oneof![Just(OCI_MANIFEST.to_owned()), Just(OCI_INDEX.to_owned()), nearly(40)],
        digests in proptest::collection::vec(digest_text(), 0..4),
        size in any::<u64>(),
    ) {
        let _ = Manifest::sniff(&bytes);
        let children: Vec<String> = digests
            .iter()
            .map(|d| format!(r#"{{"digest":{},"size":{size}}}"#, serde_json::to_string(d).expect("json")))
            .collect();
        let list = children.join(",");
        let text = format!(
            r#"{{"schemaVersion":2,"mediaType":{},"config":{},"layers":[{list}],"manifests":[{list}]}}"#,
            serde_json::to_string(&media_type).expect("json"),
            children.first().cloned().unwrap_or_else(|| "null".to_owned()),
        );
        if let Some(m) = Manifest::sniff(text.as_bytes()) {
            let valid = digests.iter().filter(|d| Digest::parse(d).is_ok()).count();
            prop_assert!(m.children.len() <= valid + 1);
            for c in &m.children {
                prop_assert!(digests.contains(&c.digest.to_string()));
            }
        }
    }
}
