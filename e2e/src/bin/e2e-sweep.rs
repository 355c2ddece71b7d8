//! Removes every end-to-end cluster whose test process is gone (processes, mounts,
//! network namespaces, bridges, files).

fn main() {
    mirrorlet_e2e::net::sweep_stale();
    println!(
        "swept stale e2e clusters under {}",
        mirrorlet_e2e::net::BASE_DIR
    );
}
