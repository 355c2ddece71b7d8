//! Generates the end-to-end test images (random layers, as the namespace suite uses) and
//! pushes them to a registry. Used by the kind suite:
//!
//! `e2e-images <host:port> [set] [user:password]`, where `set` is `base` (default: the
//! node-local and peer-to-peer scenarios') or the name of a pull-through scenario's set.

use anyhow::Result;
use mirrorlet_e2e::{TestImage, deps};

fn set(name: &str) -> Result<Vec<TestImage>> {
    Ok(match name {
        "base" => vec![
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
        ],
        // The same images as e2e/tests/pullthrough.rs.
        "pullthrough" => vec![
            TestImage::single(
                "e2e/pt-burst",
                "v1",
                &[4_000_000, 8_000_000, 2_000_000, 6_000_000],
            ),
            TestImage::single("e2e/pt-owner-dies", "v1", &[160 << 20]),
            TestImage::single("e2e/pt-moving", "stable", &[1_000_000]),
            TestImage::single("e2e/pt-held", "v1", &[2_000_000, 700_000]),
            TestImage::single("e2e/pt-never", "v1", &[500_000]),
            TestImage::single("e2e/pt-flowing", "v1", &[128 << 20]),
        ],
        "moved" => vec![TestImage::single(
            "e2e/pt-moving",
            "stable",
            &[1_200_000, 300_000],
        )],
        "hub" => vec![
            TestImage::single("e2e/pt-hub", "v1", &[3_000_000, 5_000_000]),
            TestImage::single("e2e/pt-hub-other", "v1", &[1_000_000]),
            TestImage::single("e2e/pt-corrupt", "v1", &[16 << 20]),
        ],
        "private" => vec![
            TestImage::single("e2e/pt-private", "v1", &[2_000_000]),
            TestImage::single("e2e/pt-private-2", "v1", &[1_500_000]),
        ],
        other => anyhow::bail!("no image set {other:?} (base, pullthrough, moved, hub, private)"),
    })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let registry = args.next().unwrap_or_else(|| "127.0.0.1:5055".to_owned());
    let images = set(&args.next().unwrap_or_else(|| "base".to_owned()))?;
    let login = args
        .next()
        .and_then(|l| l.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    let cache = deps::image_cache();
    std::fs::create_dir_all(&cache)?;
    for image in &images {
        image.push(&cache, &registry, login.as_ref())?;
        println!("pushed {registry}/{}:{}", image.repo, image.tag);
    }
    Ok(())
}
