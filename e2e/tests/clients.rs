//! Registry clients other than containerd through an agent: the Docker engine
//! (`--registry-mirror`, Docker Hub only, no `ns`) and podman (a `registries.conf` mirror
//! naming the registry in its location). One node pulls an image through the CRI; the
//! upstream is stopped; the other node's Docker or podman pulls it by tag and by digest
//! from the agents, a miss fails fast, and a registry the image does not belong to never
//! gets it.

use std::time::Duration;

use mirrorlet_e2e::clients::{Dockerd, Podman, expect_ok};
use mirrorlet_e2e::{Cluster, Options, REGISTRY, TestImage};

const PULL: Duration = Duration::from_secs(180);
/// How long a pull that nobody can serve may take to fail (the agent answers 404 at once;
/// the client then tries the registry itself, unreachable here).
const MISS: Duration = Duration::from_secs(60);

fn app() -> TestImage {
    TestImage::single("e2e/clients-app", "v1", &[2_000_000, 700_000])
}

async fn cluster() -> Cluster {
    Cluster::start(Options {
        nodes: 2,
        images: vec![app()],
        ..Options::default()
    })
    .await
    .expect("cluster starts")
}

/// A cluster where only node 1 holds `image` (pulled through the CRI as `registry`'s),
/// the upstream stopped, and node 2's agent able to serve it; the image's digest.
async fn held_by_node_1_only(registry: &str) -> (Cluster, TestImage, mirrorlet_oci::Digest) {
    let mut c = cluster().await;
    let image = app();
    let digest = c
        .upstream_digest(&image.repo, &image.tag)
        .await
        .expect("digest");
    c.node(1)
        .cri
        .pull(&format!("{registry}/{}:{}", image.repo, image.tag), PULL)
        .await
        .expect("node 1 pulls");
    c.upstream.stop();
    c.wait_servable(2, registry, &image)
        .await
        .expect("advertised");
    (c, image, digest)
}

#[tokio::test]
async fn a_docker_pulls_through_the_agent_by_tag_and_by_digest_with_upstream_down() {
    // Node 1's containerd holds it as a Docker Hub image (its docker.io hosts.toml points
    // at the test registry).
    let (c, image, digest) = held_by_node_1_only("docker.io").await;
    let docker = Dockerd::start(c.node(2)).await.expect("dockerd starts");

    let by_tag = docker
        .pull(&format!("{}:{}", image.repo, image.tag), PULL)
        .expect("docker runs");
    expect_ok(&by_tag, "docker pull by tag")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", docker.log_tail()));
    let digests = docker
        .repo_digests(&format!("{}:{}", image.repo, image.tag))
        .expect("inspect");
    assert!(digests.contains(digest.as_str()), "{digests} has {digest}");
    let by_digest = docker
        .pull(&format!("{}@{digest}", image.repo), PULL)
        .expect("docker runs");
    expect_ok(&by_digest, "docker pull by digest").expect("pulled");

    let miss = docker
        .pull("e2e/nobody-has-this:v1", MISS)
        .expect("docker runs");
    assert!(!miss.ok, "a miss fails: {}", miss.output);
    assert!(
        miss.took < MISS,
        "fails fast, not at the limit: {:?}",
        miss.took
    );
    eprintln!("miss failed after {:?}: {}", miss.took, miss.output.trim());

    let from_docker = c
        .node(2)
        .metric(
            "mirrorlet_registry_requests_total",
            &[("requester", "docker")],
        )
        .await
        .expect("metrics");
    assert!(from_docker >= 3.0, "counted as Docker's: {from_docker}");
    drop(docker);
}

#[tokio::test]
async fn b_podman_names_the_registry_in_the_mirror_and_never_gets_another_registrys_image() {
    let (c, image, digest) = held_by_node_1_only(REGISTRY).await;
    let podman = Podman::new(c.node(2), &[REGISTRY, "quay.io"]).expect("podman");

    let name = format!("{REGISTRY}/{}", image.repo);
    expect_ok(
        &podman
            .pull(&format!("{name}:{}", image.tag), PULL)
            .expect("podman runs"),
        "podman pull by tag",
    )
    .expect("pulled");
    expect_ok(
        &podman
            .pull(&format!("{name}@{digest}"), PULL)
            .expect("podman runs"),
        "podman pull by digest",
    )
    .expect("pulled");

    // The same repository and tag under another registry is another image: the agent,
    // asked for quay.io's, must not answer with the one it holds.
    let other = podman
        .pull(&format!("quay.io/{}:{}", image.repo, image.tag), MISS)
        .expect("podman runs");
    assert!(
        !other.ok,
        "another registry's image is not served: {}",
        other.output
    );
    assert!(other.took < MISS, "fails fast: {:?}", other.took);
    let miss = podman
        .pull(&format!("{name}-nobody-has-this:v1"), MISS)
        .expect("podman runs");
    assert!(!miss.ok && miss.took < MISS, "a miss fails fast: {miss:?}");

    let from_podman = c
        .node(2)
        .metric(
            "mirrorlet_registry_requests_total",
            &[("requester", "containers")],
        )
        .await
        .expect("metrics");
    assert!(from_podman >= 3.0, "counted as podman's: {from_podman}");
}
