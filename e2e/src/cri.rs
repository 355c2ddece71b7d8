//! A CRI image-service client over containerd's unix socket: pulls go the way kubelet's do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Generated CRI types (`runtime.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("runtime.v1");
}

use pb::image_service_client::ImageServiceClient;
use pb::{ImageSpec, ImageStatusRequest, PullImageRequest, RemoveImageRequest};

/// A CRI client for one containerd.
#[derive(Debug, Clone)]
pub struct Cri {
    client: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects (lazily) to containerd's socket.
    pub fn new(socket: &Path) -> Result<Self> {
        let socket: PathBuf = socket.to_owned();
        let channel = Endpoint::from_static("http://cri.sock")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }));
        Ok(Self {
            client: ImageServiceClient::new(channel),
        })
    }

    fn spec(image: &str) -> Option<ImageSpec> {
        Some(ImageSpec {
            image: image.to_owned(),
            annotations: Default::default(),
        })
    }

    /// `PullImage`, bounded by `limit`. Returns the image ref containerd reports.
    pub async fn pull(&self, image: &str, limit: Duration) -> Result<String> {
        self.pull_with(image, limit, None).await
    }

    /// `PullImage` with a pod's pull secret (`login`), as kubelet sends it.
    pub async fn pull_with(
        &self,
        image: &str,
        limit: Duration,
        login: Option<(&str, &str)>,
    ) -> Result<String> {
        let req = PullImageRequest {
            image: Self::spec(image),
            auth: login.map(|(username, password)| pb::AuthConfig {
                username: username.to_owned(),
                password: password.to_owned(),
                ..Default::default()
            }),
        };
        let resp = tokio::time::timeout(limit, self.client.clone().pull_image(req))
            .await
            .with_context(|| format!("CRI pull of {image} did not finish within {limit:?}"))?
            .with_context(|| format!("CRI pull of {image}"))?;
        Ok(resp.into_inner().image_ref)
    }

    /// Whether the image is present.
    pub async fn has(&self, image: &str) -> Result<bool> {
        let req = ImageStatusRequest {
            image: Self::spec(image),
            verbose: false,
        };
        let resp = self
            .client
            .clone()
            .image_status(req)
            .await
            .context("CRI image status")?;
        Ok(resp.into_inner().image.is_some())
    }

    /// `RemoveImage`.
    pub async fn remove(&self, image: &str) -> Result<()> {
        let req = RemoveImageRequest {
            image: Self::spec(image),
        };
        self.client
            .clone()
            .remove_image(req)
            .await
            .with_context(|| format!("CRI remove of {image}"))?;
        Ok(())
    }
}
