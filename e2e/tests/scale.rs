//! Sixty agents on this machine (the scale harness, `mirrorlet_e2e::scale`): real routers
//! and registries in worker processes, pulling through with the real upstream client from
//! a counting registry on loopback. Keys announced by every node at once are found; a key
//! one node adds is found by every other; every node asking for one new blob at once costs
//! one upstream download (the owner found through redirects, the rest reading copies of
//! copies; two are allowed, for nodes whose views of a young cluster disagree), and again
//! after 10% of the nodes were killed.

use std::path::Path;

use mirrorlet_e2e::scale::driver::check;

#[tokio::test]
async fn sixty_agents_find_what_every_node_announced_and_fetch_a_new_blob_once() {
    let exe = Path::new(env!("CARGO_BIN_EXE_p2p-scale"));
    let c = check(60, exe).await.expect("the harness runs");
    eprintln!("{c:#?}");
    assert!(c.found >= 96.0, "found {}%", c.found);
    assert!(c.findable_s.is_some(), "a new key is found by every node");
    for (what, f) in [
        ("at first", c.fetch),
        ("after the kill", c.fetch_after_kill),
    ] {
        assert_eq!(f.served, f.asked, "{what}: every node served: {f:?}");
        assert!(
            f.upstream_gets <= 2,
            "{what}: one upstream download (two if views of the cluster disagree): {f:?}"
        );
    }
    assert!(c.found_after_kill >= 96.0, "{}%", c.found_after_kill);
    assert_eq!(c.without_address, 0);
}
