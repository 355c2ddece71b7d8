use std::fs;

use super::*;

fn opts(root: &Path, registries: &[&str]) -> ConfigureOptions {
    ConfigureOptions {
        config_path: root.to_owned(),
        registries: registries.iter().map(|s| (*s).to_owned()).collect(),
        mirrors: vec!["http://127.0.0.1:5000".to_owned()],
        dial_timeout: "200ms".to_owned(),
    }
}

/// Every file under `root` with its bytes, and every directory.
fn snapshot(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("read dir") {
            let p = e.expect("entry").path();
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            if p.is_dir() {
                out.push((rel, None));
                stack.push(p);
            } else {
                out.push((rel, Some(fs::read(&p).expect("read"))));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn fresh_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    configure(&opts(tmp.path(), &["docker.io", "_default"])).expect("configure");
    let hub = fs::read_to_string(tmp.path().join("docker.io/hosts.toml")).expect("read");
    assert_eq!(
        hub,
        "# Written by mirrorlet configure; `mirrorlet cleanup` restores the original.\n\
         # mirrorlet-state: original=none dir=created\n\
         \n\
         server = \"https://registry-1.docker.io\"\n\
         \n\
         [host.\"http://127.0.0.1:5000\"]\n\
         capabilities = [\"pull\", \"resolve\"]\n\
         dial_timeout = \"200ms\"\n"
    );
    let default = fs::read_to_string(tmp.path().join("_default/hosts.toml")).expect("read");
    assert_eq!(
        default,
        "# Written by mirrorlet configure; `mirrorlet cleanup` restores the original.\n\
         # mirrorlet-state: original=none dir=created\n\
         \n\
         [host.\"http://127.0.0.1:5000\"]\n\
         capabilities = [\"pull\", \"resolve\"]\n\
         dial_timeout = \"200ms\"\n"
    );
}

const USER_FILE: &str = "# my registry settings\n\
server = \"http://198.18.0.254:5000\"\n\
skip_verify = true\n\
\n\
[host.\"https://corp-mirror.example\"]\n  capabilities = [\"pull\"]\n  ca = \"/etc/ca.pem\"\n";

#[test]
fn existing_user_file_is_kept_after_the_mirror() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("registry.e2e.test");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("hosts.toml"), USER_FILE).expect("write");
    configure(&opts(tmp.path(), &["registry.e2e.test"])).expect("configure");
    let out = fs::read_to_string(dir.join("hosts.toml")).expect("read");
    assert_eq!(
        out,
        "# Written by mirrorlet configure; `mirrorlet cleanup` restores the original.\n\
         # mirrorlet-state: original=backup dir=existed\n\
         \n\
         # my registry settings\n\
         server = \"http://198.18.0.254:5000\"\n\
         skip_verify = true\n\
         \n\
         [host.\"http://127.0.0.1:5000\"]\n\
         capabilities = [\"pull\", \"resolve\"]\n\
         dial_timeout = \"200ms\"\n\
         \n\
         [host.\"https://corp-mirror.example\"]\n  capabilities = [\"pull\"]\n  ca = \"/etc/ca.pem\"\n"
    );
    assert_eq!(
        fs::read_to_string(dir.join(BACKUP)).expect("backup"),
        USER_FILE
    );
}

#[test]
fn repeated_run_gives_the_same_bytes_and_cleanup_restores_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let user = tmp.path().join("quay.io");
    fs::create_dir_all(&user).expect("mkdir");
    fs::write(user.join("hosts.toml"), USER_FILE).expect("write");
    fs::create_dir_all(tmp.path().join("ghcr.io")).expect("mkdir empty dir");
    fs::write(tmp.path().join("unrelated.txt"), "x").expect("write");
    let before = snapshot(tmp.path());

    let o = opts(tmp.path(), &["docker.io", "quay.io", "ghcr.io"]);
    configure(&o).expect("first");
    let first = snapshot(tmp.path());
    configure(&o).expect("second");
    assert_eq!(snapshot(tmp.path()), first, "configure is idempotent");

    let restored = cleanup(tmp.path()).expect("cleanup");
    assert_eq!(restored.len(), 3);
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "cleanup restores the original tree"
    );
    assert!(cleanup(tmp.path()).expect("cleanup twice").is_empty());
}

#[test]
fn user_edits_after_configure_become_the_new_original() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = opts(tmp.path(), &["docker.io"]);
    configure(&o).expect("configure");
    let file = tmp.path().join("docker.io/hosts.toml");
    fs::write(&file, USER_FILE).expect("user replaces the file");
    configure(&o).expect("configure again");
    cleanup(tmp.path()).expect("cleanup");
    assert_eq!(fs::read_to_string(&file).expect("read"), USER_FILE);
}

#[test]
fn invalid_existing_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("docker.io");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("hosts.toml"), "server = [").expect("write");
    let err = configure(&opts(tmp.path(), &["docker.io"])).expect_err("invalid TOML");
    assert!(err.to_string().contains("docker.io/hosts.toml"), "{err}");
    assert!(matches!(err, HostsError::Parse { .. }));
}

#[test]
fn missing_config_path_cleans_up_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert!(
        cleanup(&tmp.path().join("absent"))
            .expect("cleanup")
            .is_empty()
    );
}

#[test]
fn narrowing_the_list_restores_what_is_no_longer_mirrored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    fs::create_dir_all(root.join("quay.io")).expect("mkdir");
    fs::write(
        root.join("quay.io/hosts.toml"),
        "server = \"https://quay.io\"\n",
    )
    .expect("write");
    let before = snapshot(root);
    configure(&opts(root, &["docker.io", "quay.io", "ghcr.io"])).expect("configure");
    // An upgrade drops two registries (and changes the agent's port).
    let mut narrower = opts(root, &["docker.io"]);
    narrower.mirrors = vec!["http://127.0.0.1:6000".into()];
    configure(&narrower).expect("configure again");
    assert!(
        !root.join("ghcr.io").exists(),
        "the directory it created is gone"
    );
    assert_eq!(
        fs::read_to_string(root.join("quay.io/hosts.toml")).expect("read"),
        "server = \"https://quay.io\"\n",
        "the user's file is back"
    );
    let hub = fs::read_to_string(root.join("docker.io/hosts.toml")).expect("read");
    assert!(
        hub.contains("http://127.0.0.1:6000") && !hub.contains(":5000"),
        "{hub}"
    );
    cleanup(root).expect("cleanup");
    assert_eq!(snapshot(root), before);
}

#[test]
fn ipv6_hosts_are_dotted_keys_that_containerd_1_6_reads_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("registry.e2e.test");
    fs::create_dir_all(&dir).expect("mkdir");
    let user = "server = \"http://[fd00::fe]:5000\"\n\n[host.\"http://[fd00::fe]:5000\"]\n  capabilities = [\"pull\"]\n\n[host.\"https://corp-mirror.example\"]\n  ca = \"/etc/ca.pem\"\n";
    fs::write(dir.join("hosts.toml"), user).expect("write");
    let mut o = opts(tmp.path(), &["registry.e2e.test"]);
    o.mirrors = vec!["http://[fd00::1]:30020".to_owned()];
    configure(&o).expect("configure");
    let out = fs::read_to_string(dir.join("hosts.toml")).expect("read");
    // No `]` inside a table header; every host as dotted keys under [host], the mirror first.
    assert!(
        out.ends_with(
            "[host]\n\
             \"http://[fd00::1]:30020\".capabilities = [\"pull\", \"resolve\"]\n\
             \"http://[fd00::1]:30020\".dial_timeout = \"200ms\"\n\
             \"http://[fd00::fe]:5000\".capabilities = [\"pull\"]\n\
             \"https://corp-mirror.example\".ca = \"/etc/ca.pem\"\n"
        ),
        "{out}"
    );
    // Same bytes when run again, and cleanup restores the user's file.
    configure(&o).expect("configure again");
    assert_eq!(
        fs::read_to_string(dir.join("hosts.toml")).expect("read"),
        out
    );
    cleanup(tmp.path()).expect("cleanup");
    assert_eq!(
        fs::read_to_string(dir.join("hosts.toml")).expect("read"),
        user
    );
}
