//! Scale harness (`make bench-scale`, `e2e/bench/scale.sh`): see `mirrorlet_e2e::scale`.
//! For each node count it measures, prints as three tables and writes to OUT_DIR/scale.md,
//! with a plot of found share and lookup latency in OUT_DIR/scale.svg:
//! 1. every node announces 20 keys at the same moment (a DaemonSet rollout); 100 lookups
//!    of a random key from a random other node 15 s and 45 s later: the share found (by
//!    the holder's peer id), the share within the registry's 20 ms lookup budget, latency;
//!    then how long a key one node adds takes to be found by every other node;
//! 2. connections, routing-table entries, descriptors and memory per node;
//! 3. the single flight: every node asking its own registry for the same new blob at once
//!    (upstream GETs counted by the upstream registry), and the same after killing 10% of
//!    the nodes, with lookups of keys the dead nodes held (are they still offered?).
//!
//! Usage: p2p-scale [NODES,...] [OUT_DIR] (default 10,50,100)
//!        p2p-scale --worker FIRST END SEEDS UPSTREAM_URL (started by the above)

use std::io::Write as _;

use anyhow::{Context, Result, bail};
use mirrorlet_e2e::scale::{KEYS, driver, report, worker};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worker") {
        let [_, first, end, seeds, upstream] = args.as_slice() else {
            bail!("usage: p2p-scale --worker FIRST END SEEDS UPSTREAM_URL");
        };
        return worker::run(first.parse()?, end.parse()?, seeds, upstream).await;
    }
    let counts: Vec<usize> = match args.first() {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().parse().context("node counts, e.g. 10,100,1000"))
            .collect::<Result<_>>()?,
        None => vec![10, 50, 100],
    };
    anyhow::ensure!(
        counts.iter().all(|&n| (2..=1000).contains(&n)),
        "node counts from 2 to 1000"
    );
    let out = args.get(1).map(std::path::PathBuf::from);
    let exe = std::env::current_exe()?;
    println!(
        "{KEYS} keys per node, announced by every node at once; 100 lookups of a random key from a random other node, found within {:?}",
        mirrorlet_e2e::scale::LOOKUP_LIMIT
    );
    let mut rows = Vec::new();
    for n in counts {
        rows.push(driver::measure(n, &exe).await?);
    }
    let text = report::tables(&rows);
    println!("\n{text}");
    std::io::stdout().flush()?;
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("scale.md"), &text)?;
        report::plot(&rows, &dir.join("scale.svg"))?;
        println!(
            "wrote {} and {}",
            dir.join("scale.md").display(),
            dir.join("scale.svg").display()
        );
    }
    Ok(())
}
