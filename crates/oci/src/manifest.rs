//! Manifest media types, descriptors, and the small part of manifest parsing a mirror needs:
//! recognising a manifest or index from its bytes and listing the descriptors it points to.

use serde::Deserialize;

use crate::digest::Digest;

/// `application/vnd.oci.image.manifest.v1+json`
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// `application/vnd.oci.image.index.v1+json`
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// `application/vnd.docker.distribution.manifest.v2+json`
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// `application/vnd.docker.distribution.manifest.list.v2+json`
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The media type served for blobs and for content that is not a manifest.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Manifests larger than this are not parsed (the distribution spec's suggested limit).
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// Whether `media_type` is one of the manifest or index types this mirror understands.
pub fn is_manifest_type(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST
    )
}

/// Whether `media_type` is an index (a list of manifests).
pub fn is_index_type(media_type: &str) -> bool {
    matches!(media_type, OCI_INDEX | DOCKER_MANIFEST_LIST)
}

/// A content descriptor: what a digest is, and how large.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// The media type (for manifests, the manifest's own type).
    pub media_type: String,
    /// The content digest.
    pub digest: Digest,
    /// The size in bytes.
    pub size: u64,
}

/// A manifest or index recognised from its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The manifest's media type, from its `mediaType` field or inferred from its shape.
    pub media_type: String,
    /// Everything it points to: config and layers, or the index's manifests.
    pub children: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: u64,
}

impl Manifest {
    /// Recognises a manifest or index. Returns `None` for anything else (layers, configs,
    /// JSON of another shape), so it is safe to call on arbitrary content.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.len() as u64 > MAX_MANIFEST_SIZE || bytes.first() != Some(&b'{') {
            return None;
        }
        let raw: RawManifest = serde_json::from_slice(bytes).ok()?;
        let media_type = match raw.media_type.as_deref() {
            Some(t) if is_manifest_type(t) => t.to_owned(),
            Some(_) => return None,
            None if raw.manifests.is_some() => OCI_INDEX.to_owned(),
            None if raw.config.is_some() && raw.layers.is_some() => OCI_MANIFEST.to_owned(),
            None => return None,
        };
        let raw_children = if is_index_type(&media_type) {
            raw.manifests.unwrap_or_default()
        } else {
            raw.config
                .into_iter()
                .chain(raw.layers.unwrap_or_default())
                .collect()
        };
        let children = raw_children
            .into_iter()
            .filter_map(|d| {
                Some(Descriptor {
                    media_type: d.media_type.unwrap_or_else(|| OCTET_STREAM.to_owned()),
                    digest: Digest::parse(&d.digest).ok()?,
                    size: d.size,
                })
            })
            .collect();
        Some(Self {
            media_type,
            children,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        Digest::sha256_of(&[n]).to_string()
    }

    #[test]
    fn sniffs_each_manifest_kind() {
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[{{"mediaType":"y","digest":"{}","size":2}}]}}"#,
            d(1),
            d(2)
        );
        let m = Manifest::sniff(docker.as_bytes()).expect("manifest");
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        assert_eq!(m.children.len(), 2);
        assert_eq!(m.children[1].size, 2);

        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":3}}]}}"#,
            d(3)
        );
        let m = Manifest::sniff(index.as_bytes()).expect("index");
        assert_eq!(m.media_type, OCI_INDEX);
        assert_eq!(m.children[0].media_type, OCI_MANIFEST);

        let list = format!(r#"{{"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[]}}"#);
        assert_eq!(
            Manifest::sniff(list.as_bytes()).expect("list").media_type,
            DOCKER_MANIFEST_LIST
        );

        let bare = format!(
            r#"{{"config":{{"digest":"{}","size":1}},"layers":[]}}"#,
            d(4)
        );
        assert_eq!(
            Manifest::sniff(bare.as_bytes()).expect("oci").media_type,
            OCI_MANIFEST
        );
    }

    #[test]
    fn other_content_is_not_a_manifest() {
        assert!(Manifest::sniff(b"").is_none());
        assert!(Manifest::sniff(b"\x1f\x8b\x08\x00").is_none());
        assert!(Manifest::sniff(br#"{"architecture":"amd64","os":"linux","rootfs":{}}"#).is_none());
        assert!(
            Manifest::sniff(br#"{"mediaType":"application/vnd.oci.image.config.v1+json"}"#)
                .is_none()
        );
        assert!(Manifest::sniff(b"{not json").is_none());
    }
}
