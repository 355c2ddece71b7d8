//! Walking an image's tree (index -> manifests -> config and layers) to find the content
//! of it that a store actually holds. Shared by every [`Store`](crate::store::Store).

use std::collections::HashSet;
use std::future::Future;

use crate::digest::Digest;
use crate::manifest::{self, Descriptor, Manifest};

/// Upper bound on the nodes visited in one image tree, against malicious or cyclic content.
const MAX_NODES: usize = 100_000;

/// Walks the tree under `target`, keeping only descriptors for which `present` is true, and
/// returns their digests, `target` first. `read_manifest` returns a manifest's bytes (or
/// `None` if it cannot be read); it is called only for present manifest-typed descriptors,
/// with the descriptor (so the reader knows the size without asking the store).
pub async fn present_digests<P, R, Fut, E>(
    target: &Descriptor,
    present: P,
    mut read_manifest: R,
) -> Result<Vec<Digest>, E>
where
    P: Fn(&Digest) -> bool,
    R: FnMut(Descriptor) -> Fut,
    Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
{
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut queue = vec![target.clone()];
    while let Some(desc) = queue.pop() {
        if seen.len() >= MAX_NODES || !seen.insert(desc.digest.clone()) || !present(&desc.digest) {
            continue;
        }
        out.push(desc.digest.clone());
        let maybe_manifest = manifest::is_manifest_type(&desc.media_type)
            || (desc.media_type == manifest::OCTET_STREAM
                && desc.size <= manifest::MAX_MANIFEST_SIZE);
        if !maybe_manifest || desc.size > manifest::MAX_MANIFEST_SIZE {
            continue;
        }
        if let Some(m) = read_manifest(desc.clone())
            .await?
            .as_deref()
            .and_then(Manifest::sniff)
        {
            // Reverse so that children come out in document order.
            queue.extend(m.children.into_iter().rev());
        }
    }
    Ok(out)
}
