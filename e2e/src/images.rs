//! Test images, generated here (random layers, nothing from the internet) as OCI layouts
//! and pushed to the upstream registry with skopeo. Content is derived from the image's
//! name, so a generated layout is cached and reused across runs.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::process::run;

/// The shape of a test image.
#[derive(Debug, Clone)]
pub enum Shape {
    /// One linux/amd64 image with layers of these sizes (bytes of file content).
    Single {
        /// Layer sizes.
        layers: Vec<u64>,
        /// Push as a Docker schema 2 manifest instead of OCI.
        docker: bool,
    },
    /// An OCI index over linux/amd64 and linux/arm64 images, each with layers of these sizes.
    MultiArch {
        /// Layer sizes per platform.
        layers: Vec<u64>,
    },
}

/// A test image: repository, tag and shape.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// Repository in the upstream registry, e.g. `e2e/multi-layer`.
    pub repo: String,
    /// Tag pushed.
    pub tag: String,
    /// What it contains.
    pub shape: Shape,
}

impl TestImage {
    /// A linux/amd64 OCI image.
    pub fn single(repo: &str, tag: &str, layers: &[u64]) -> Self {
        Self {
            repo: repo.into(),
            tag: tag.into(),
            shape: Shape::Single {
                layers: layers.to_vec(),
                docker: false,
            },
        }
    }

    /// A linux/amd64 Docker schema 2 image.
    pub fn docker(repo: &str, tag: &str, layers: &[u64]) -> Self {
        Self {
            repo: repo.into(),
            tag: tag.into(),
            shape: Shape::Single {
                layers: layers.to_vec(),
                docker: true,
            },
        }
    }

    /// An amd64 + arm64 index.
    pub fn multi_arch(repo: &str, tag: &str, layers: &[u64]) -> Self {
        Self {
            repo: repo.into(),
            tag: tag.into(),
            shape: Shape::MultiArch {
                layers: layers.to_vec(),
            },
        }
    }

    fn seed(&self) -> u64 {
        let h = Sha256::digest(format!("{}:{}:{:?}", self.repo, self.tag, self.shape).as_bytes());
        u64::from_le_bytes(h[..8].try_into().unwrap_or([1; 8]))
    }

    fn cache_name(&self) -> String {
        format!(
            "{}-{}-{:016x}",
            self.repo.replace('/', "_"),
            self.tag,
            self.seed()
        )
    }

    /// Generates the OCI layout (or reuses the cached one) and returns its directory.
    pub fn layout(&self, cache: &Path) -> Result<PathBuf> {
        write_layout(cache, &self.cache_name(), std::slice::from_ref(self))
    }

    /// The image's top descriptor (manifest or index), its blobs written into `dir`.
    fn write_into(&self, dir: &Path) -> Result<serde_json::Value> {
        let seed = self.seed();
        let mut top = match &self.shape {
            Shape::Single { layers, .. } => write_image(dir, seed, "amd64", layers)?,
            Shape::MultiArch { layers } => {
                let amd = write_image(dir, seed, "amd64", layers)?;
                let arm = write_image(dir, seed ^ 0xA5A5_A5A5, "arm64", layers)?;
                let with_platform = |mut d: serde_json::Value, arch: &str| {
                    d["platform"] = json!({"architecture": arch, "os": "linux"});
                    d
                };
                let index = json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [with_platform(amd, "amd64"), with_platform(arm, "arm64")],
                });
                write_json_blob(dir, &index, "application/vnd.oci.image.index.v1+json")?
            }
        };
        top["annotations"] = json!({"org.opencontainers.image.ref.name": self.tag});
        Ok(top)
    }

    /// Pushes the image to `registry` (`host:port`, plain HTTP) with skopeo, with `login`
    /// if the registry wants one.
    pub fn push(
        &self,
        cache: &Path,
        registry: &str,
        login: Option<&(String, String)>,
    ) -> Result<()> {
        let layout = self.layout(cache)?;
        let src = format!("oci:{}:{}", layout.display(), self.tag);
        let dst = format!("docker://{registry}/{}:{}", self.repo, self.tag);
        let mut args = vec![
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--retry-times",
            "2",
        ];
        match self.shape {
            Shape::Single { docker: true, .. } => args.extend(["--format", "v2s2"]),
            Shape::MultiArch { .. } => args.push("--all"),
            Shape::Single { .. } => {}
        }
        let creds = login.map(|(u, p)| format!("{u}:{p}"));
        if let Some(c) = &creds {
            args.extend(["--dest-creds", c.as_str()]);
        }
        args.extend([src.as_str(), dst.as_str()]);
        run("skopeo", &args).with_context(|| format!("pushing {}:{}", self.repo, self.tag))?;
        Ok(())
    }
}

/// One OCI layout named `name` in `cache` holding `images` (each under its tag), generated
/// once and reused; its directory. Several images' layout is named after their content too
/// (one image's name already is), so a changed set is generated anew.
pub fn write_layout(cache: &Path, name: &str, images: &[TestImage]) -> Result<PathBuf> {
    let name = match images {
        [_] => name.to_owned(),
        _ => {
            let seeds = images
                .iter()
                .fold(0_u64, |h, i| h.rotate_left(5) ^ i.seed());
            format!("{name}-{seeds:016x}")
        }
    };
    let name = name.as_str();
    let dir = cache.join(name);
    if dir.join("index.json").exists() {
        return Ok(dir);
    }
    let tmp = cache.join(format!("{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("blobs/sha256"))?;
    std::fs::write(tmp.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let manifests = images
        .iter()
        .map(|i| i.write_into(&tmp))
        .collect::<Result<Vec<_>>>()?;
    let index_json = json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(tmp.join("index.json"), serde_json::to_vec(&index_json)?)?;
    std::fs::rename(&tmp, &dir).or_else(|e| if dir.exists() { Ok(()) } else { Err(e) })?;
    Ok(dir)
}

/// Writes layers, config and manifest for one platform; returns the manifest descriptor.
fn write_image(dir: &Path, seed: u64, arch: &str, layers: &[u64]) -> Result<serde_json::Value> {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, size) in layers.iter().enumerate() {
        let (desc, diff_id) = write_layer(dir, seed.wrapping_add(i as u64 * 7919), *size, i)?;
        descs.push(desc);
        diff_ids.push(diff_id);
    }
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_desc = write_json_blob(dir, &config, "application/vnd.oci.image.config.v1+json")?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": descs,
    });
    write_json_blob(dir, &manifest, "application/vnd.oci.image.manifest.v1+json")
}

fn write_json_blob(
    dir: &Path,
    value: &serde_json::Value,
    media_type: &str,
) -> Result<serde_json::Value> {
    let bytes = serde_json::to_vec(value)?;
    let hex = hex::encode(Sha256::digest(&bytes));
    std::fs::write(dir.join("blobs/sha256").join(&hex), &bytes)?;
    Ok(json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()}))
}

/// Pseudo-random bytes (xorshift), incompressible like real binaries.
struct Noise {
    state: u64,
    left: u64,
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Hashes what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a gzip'd tar layer holding one file of `size` random bytes. Returns the layer
/// descriptor and its diff id (digest of the uncompressed tar).
fn write_layer(
    dir: &Path,
    seed: u64,
    size: u64,
    index: usize,
) -> Result<(serde_json::Value, String)> {
    let tmp = dir.join(format!("layer-{seed:x}.tmp"));
    let file = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let compressed = Hashing {
        inner: file,
        hash: Sha256::new(),
        len: 0,
    };
    // Random data does not compress: store it (fast) when large.
    let level = if size > 16 << 20 {
        Compression::none()
    } else {
        Compression::fast()
    };
    let gz = GzEncoder::new(compressed, level);
    let tar_stream = Hashing {
        inner: gz,
        hash: Sha256::new(),
        len: 0,
    };
    let mut tar = tar::Builder::new(tar_stream);
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    let path = format!("layer{index}/data-{seed:016x}.bin");
    tar.append_data(
        &mut header,
        path,
        Noise {
            state: seed | 1,
            left: size,
        },
    )?;
    let tar_stream = tar.into_inner()?;
    let diff_id = format!("sha256:{}", hex::encode(tar_stream.hash.finalize()));
    let mut compressed = tar_stream.inner.finish()?;
    compressed.flush()?;
    let hex = hex::encode(compressed.hash.finalize());
    let len = compressed.len;
    drop(compressed.inner);
    std::fs::rename(&tmp, dir.join("blobs/sha256").join(&hex))?;
    Ok((
        json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{hex}"), "size": len}),
        diff_id,
    ))
}
