//! Generates the end-to-end test images (random layers, as the namespace suite uses) and
//! pushes them to a registry: `e2e-images <host:port>`. Used by the kind suite.

use anyhow::Result;
use mirrorlet_e2e::{TestImage, deps};

fn main() -> Result<()> {
    let registry = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:5055".to_owned());
    let images = [
        TestImage::single(
            "e2e/multi-layer",
            "v1",
            &[300_000, 1_000_000, 50_000, 2_000_000],
        ),
        TestImage::multi_arch("e2e/multi-arch", "v1", &[200_000, 400_000]),
        TestImage::single("e2e/by-digest", "v1", &[500_000]),
        TestImage::docker("library/e2e-hub", "1", &[250_000]),
        TestImage::single("e2e/p2p-app", "v1", &[3_000_000, 600_000, 9_000_000]),
        TestImage::single("e2e/p2p-other", "v1", &[2_000_000, 500_000]),
        TestImage::single("e2e/big", "v1", &[256 << 20]),
    ];
    let cache = deps::image_cache();
    std::fs::create_dir_all(&cache)?;
    for image in &images {
        image.push(&cache, &registry, None)?;
        println!("pushed {registry}/{}:{}", image.repo, image.tag);
    }
    Ok(())
}
