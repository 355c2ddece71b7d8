//! containerd's CRI image service, the API kubelet pulls through: a pull made here goes
//! through the node's registry configuration (hosts.toml, so through the agent) and ends
//! as an image kubelet sees, unpacked.

use std::path::Path;
use std::time::Duration;

use tonic::transport::Channel;

/// Generated CRI types (`runtime.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("runtime.v1");
}

use pb::image_service_client::ImageServiceClient;
use pb::{ImageSpec, ImageStatusRequest, PullImageRequest, RemoveImageRequest};

/// Why a CRI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// It did not answer in time.
    #[error("CRI {what} of {image} did not finish within {limit:?}")]
    Timeout {
        /// `pull`, `status` or `remove`.
        what: &'static str,
        /// The image.
        image: String,
        /// The time allowed.
        limit: Duration,
    },
    /// containerd refused or failed it.
    #[error("CRI {what} of {image}: {}", .status.message())]
    Call {
        /// `pull`, `status` or `remove`.
        what: &'static str,
        /// The image.
        image: String,
        /// containerd's answer.
        status: tonic::Status,
    },
}

/// A CRI image-service client for one containerd.
#[derive(Debug, Clone)]
pub struct Cri {
    client: ImageServiceClient<Channel>,
}

/// How long a status or remove call may take.
const SHORT: Duration = Duration::from_secs(30);

impl Cri {
    /// A client of containerd's socket (connected on first use).
    pub fn new(socket: &Path) -> Self {
        Self {
            client: ImageServiceClient::new(crate::client::channel(socket)),
        }
    }

    fn spec(image: &str) -> Option<ImageSpec> {
        Some(ImageSpec {
            image: image.to_owned(),
            annotations: Default::default(),
        })
    }

    async fn call<T>(
        what: &'static str,
        image: &str,
        limit: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriError> {
        match tokio::time::timeout(limit, call).await {
            Err(_) => Err(CriError::Timeout {
                what,
                image: image.to_owned(),
                limit,
            }),
            Ok(Err(status)) => Err(CriError::Call {
                what,
                image: image.to_owned(),
                status,
            }),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    /// `PullImage`, bounded by `limit`. Returns the image id containerd reports.
    pub async fn pull(&self, image: &str, limit: Duration) -> Result<String, CriError> {
        self.pull_with(image, limit, None).await
    }

    /// `PullImage` with a pull secret's `login`, as kubelet sends it.
    pub async fn pull_with(
        &self,
        image: &str,
        limit: Duration,
        login: Option<(&str, &str)>,
    ) -> Result<String, CriError> {
        let req = PullImageRequest {
            image: Self::spec(image),
            auth: login.map(|(username, password)| pb::AuthConfig {
                username: username.to_owned(),
                password: password.to_owned(),
                ..Default::default()
            }),
        };
        let resp = Self::call("pull", image, limit, self.client.clone().pull_image(req)).await?;
        Ok(resp.image_ref)
    }

    /// Whether the image is present.
    pub async fn has(&self, image: &str) -> Result<bool, CriError> {
        let req = ImageStatusRequest {
            image: Self::spec(image),
            verbose: false,
        };
        let resp = Self::call(
            "status",
            image,
            SHORT,
            self.client.clone().image_status(req),
        )
        .await?;
        Ok(resp.image.is_some())
    }

    /// `RemoveImage`.
    pub async fn remove(&self, image: &str) -> Result<(), CriError> {
        let req = RemoveImageRequest {
            image: Self::spec(image),
        };
        Self::call(
            "remove",
            image,
            SHORT,
            self.client.clone().remove_image(req),
        )
        .await?;
        Ok(())
    }
}
