//! Peer-to-peer benchmark on the namespace cluster (release build; `e2e/bench/p2p.sh`):
//! a 1 GiB single-layer image pulled by node 2 from node 1 through two agents (with
//! `--peer-verify stream`, the default, then `whole`), next to a plain TCP copy of the same
//! blob between the same two namespaces; CRI pulls of the image from peers in both modes
//! next to the pull from the upstream registry; and DHT lookup latency (p50/p99) measured
//! by the agents themselves. Then a blob held by three nodes whose uploads are capped
//! unevenly (one slow, two faster), fetched by a fourth node's agent reading parts from
//! several holders at once (the default) and from one holder at a time
//! (`--peer-parts-from 0`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mirrorlet_e2e::process::{Proc, run};
use mirrorlet_e2e::{Cluster, Options, REGISTRY, TestImage};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// `curl` inside a namespace: returns (bytes, seconds, seconds to the first byte).
fn curl_in(netns: &str, url: &str, extra: &[&str]) -> Result<(f64, f64, f64)> {
    let mut args = vec![
        "netns",
        "exec",
        netns,
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{time_total} %{time_starttransfer}",
    ];
    args.extend(extra);
    args.push(url);
    let out = run("ip", &args)?;
    let mut it = out.split_whitespace();
    let bytes: f64 = it.next().context("size")?.parse()?;
    let secs: f64 = it.next().context("time")?.parse()?;
    let first: f64 = it.next().context("first byte")?.parse()?;
    Ok((bytes, secs, first))
}

/// Through two agents: node 2's agent takes the blob from node 1's, then serves node 2's
/// client. Node 2 holds nothing, so every run is a full peer fetch. GB/s, seconds per GiB
/// and seconds to the first byte, per run.
fn two_agents(c: &Cluster, url: &str, runs: usize) -> Result<[Vec<f64>; 3]> {
    let n2 = c.node(2).host.netns.clone();
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..runs {
        let (bytes, secs, first) = curl_in(&n2, url, &[])?;
        anyhow::ensure!(
            (bytes - GIB).abs() < 1e6 || bytes > GIB,
            "short body: {bytes}"
        );
        out[0].push(bytes / secs / 1e9);
        out[1].push(secs);
        out[2].push(first);
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let image = TestImage::single("bench/big", "v1", &[1 << 30]);
    let agent_args = [
        "--log-format",
        "json",
        "--log-level",
        "info,mirrorlet_registry::peers=debug",
    ]
    .map(String::from)
    .to_vec();
    println!("cluster: 4 nodes; image: one 1 GiB layer; {runs} runs per measurement");
    let mut c = Cluster::start(Options {
        nodes: 4,
        images: vec![image.clone()],
        agent_args: agent_args.clone(),
        ..Options::default()
    })
    .await?;
    let name = Cluster::image_ref(&image);
    let manifest: serde_json::Value = c
        .upstream_get(&format!("/v2/{}/manifests/{}", image.repo, image.tag))
        .await?
        .json()
        .await?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer")?
        .to_owned();

    let t = Instant::now();
    c.node(1).cri.pull(&name, Duration::from_secs(600)).await?;
    println!(
        "node 1: CRI pull from the upstream registry (Distribution 2.8): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    c.upstream.stop();

    // Plain TCP: a zero-copy sendfile server in node 1's namespace, curl in node 2's.
    let file = c
        .node(1)
        .content_dir()
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let server = format!(
        "import socket,os\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{}',6000));s.listen(4)\nwhile True:\n c,_=s.accept();c.recv(65536);f=open('{}','rb');n=os.fstat(f.fileno()).st_size\n c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n'%n);c.sendfile(f);c.close();f.close()\n",
        c.node(1).host.addr,
        file.display()
    );
    let script = c.dir().join("sendfile.py");
    std::fs::write(&script, server)?;
    let _tcp = Proc::spawn(
        "sendfile",
        Some(&c.node(1).host.netns),
        std::path::Path::new("/usr/bin/python3"),
        &[script.display().to_string()],
        &c.dir().join("sendfile.log"),
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = std::fs::read(&file)?; // warm node 1's page cache
    let n2 = c.node(2).host.netns.clone();
    let mut tcp = Vec::new();
    for _ in 0..runs {
        let (bytes, secs, _) = curl_in(&n2, &format!("http://{}:6000/", c.node(1).host.addr), &[])?;
        tcp.push(bytes / secs / 1e9);
    }

    // One agent: node 1's agent straight to curl in node 2's namespace (as a peer asks).
    let direct = format!(
        "{}/v2/{}/blobs/{layer}?ns={REGISTRY}",
        c.node(1).agent_url(),
        image.repo
    );
    let mut one_agent = Vec::new();
    for _ in 0..runs {
        let (bytes, secs, _) = curl_in(&n2, &direct, &["-H", "x-mirrorlet-peer: 1"])?;
        one_agent.push(bytes / secs / 1e9);
    }

    let url = format!(
        "{}/v2/{}/blobs/{layer}?ns={REGISTRY}",
        c.node(2).agent_url(),
        image.repo
    );
    let [mut stream, mut stream_secs, mut stream_first] = two_agents(&c, &url, runs)?;
    // The same with node 2's agent verifying whole before sending.
    let mut whole_args = agent_args.clone();
    whole_args.extend(["--peer-verify".into(), "whole".into()]);
    c.node_mut(2).restart_agent_with(whole_args).await?;
    c.wait_members().await?;
    let [mut whole, mut whole_secs, mut whole_first] = two_agents(&c, &url, runs)?;

    // Lookups: HEADs from node 3 for the image's digests (each one a DHT lookup at node 3).
    let digests: Vec<String> = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&manifest["config"]))
        .filter_map(|d| d["digest"].as_str().map(str::to_owned))
        .collect();
    for i in 0..2000 {
        let d = &digests[i % digests.len()];
        let u = format!(
            "{}/v2/{}/blobs/{d}?ns={REGISTRY}",
            c.node(3).agent_url(),
            image.repo
        );
        let r = c.http.head(&u).send().await?;
        anyhow::ensure!(r.status().is_success(), "HEAD {u}: {}", r.status());
    }
    let log = std::fs::read_to_string(c.node(3).dir.join("agent.log"))?;
    let mut lookups: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "lookup" && v["outcome"] == "found")
        .filter_map(|v| v["lookup_us"].as_f64())
        .collect();
    lookups.sort_by(f64::total_cmp);
    anyhow::ensure!(!lookups.is_empty(), "no lookups logged");

    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(v, 0.5)
    };
    println!(
        "plain TCP copy node 1 -> node 2 (sendfile server, curl): median {:.2} GB/s",
        med(&mut tcp)
    );
    println!(
        "one agent (node 1's agent -> curl in node 2): median {:.2} GB/s",
        med(&mut one_agent)
    );
    println!(
        "through two agents, --peer-verify stream: median {:.2} GB/s, {:.2} s per GiB, first byte after {:.0} ms",
        med(&mut stream),
        med(&mut stream_secs),
        med(&mut stream_first) * 1000.0
    );
    println!(
        "through two agents, --peer-verify whole: median {:.2} GB/s, {:.2} s per GiB, first byte after {:.0} ms",
        med(&mut whole),
        med(&mut whole_secs),
        med(&mut whole_first) * 1000.0
    );
    println!(
        "DHT lookups at node 3 ({} lookups): p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        lookups.len(),
        percentile(&lookups, 0.5),
        percentile(&lookups, 0.99),
        lookups[lookups.len() - 1]
    );
    // CRI pulls from peers (containerd's write and unpack included): node 2 verifying
    // whole, node 3 streaming (the default).
    let t = Instant::now();
    c.node(2).cri.pull(&name, Duration::from_secs(600)).await?;
    let cri_whole = t.elapsed().as_secs_f64();
    let t = Instant::now();
    c.node(3).cri.pull(&name, Duration::from_secs(600)).await?;
    let cri_stream = t.elapsed().as_secs_f64();
    println!(
        "CRI pull of the 1 GiB image from peers: {cri_stream:.2} s streaming (node 3), {cri_whole:.2} s verifying whole (node 2)"
    );

    // Parts from several holders: nodes 1-3 hold the blob now; node 1 sends at 400 Mbit/s
    // (a busy or distant peer), nodes 2 and 3 at 1.6 Gbit/s. Node 4's agent keeps nothing
    // it took whole from holders, so every run is a full fetch.
    for (node, rate) in [(1, "400mbit"), (2, "1600mbit"), (3, "1600mbit")] {
        c.node(node).host.cap_upload(rate)?;
    }
    let url4 = format!(
        "{}/v2/{}/blobs/{layer}?ns={REGISTRY}",
        c.node(4).agent_url(),
        image.repo
    );
    let n4 = c.node(4).host.netns.clone();
    let fetch4 = || -> Result<Vec<f64>> {
        (0..runs)
            .map(|_| {
                let (bytes, secs, _) = curl_in(&n4, &url4, &[])?;
                anyhow::ensure!(bytes >= GIB, "short body: {bytes}");
                Ok(secs)
            })
            .collect()
    };
    let parts = fetch4()?;
    let mut one_args = agent_args.clone();
    one_args.extend(["--peer-parts-from".into(), "0".into()]);
    c.node_mut(4).restart_agent_with(one_args).await?;
    c.wait_members().await?;
    let one = fetch4()?;
    let show = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "1 GiB held by nodes 1-3 (uploads capped at 400 Mbit/s, 1.6 Gbit/s, 1.6 Gbit/s), fetched by node 4: parts from several holders median {:.2} s ({} s), one holder at a time median {:.2} s ({} s)",
        med(&mut parts.clone()),
        show(&parts),
        med(&mut one.clone()),
        show(&one)
    );
    let left = c.teardown();
    anyhow::ensure!(left.is_empty(), "teardown left {left:?}");
    Ok(())
}
