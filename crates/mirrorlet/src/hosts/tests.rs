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
    let failed = configure(&opts(tmp.path(), &["docker.io"])).expect_err("invalid TOML");
    let [err] = &failed.errors[..] else {
        panic!("{failed:?}")
    };
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

/// An entry's kind and contents without following links: a link is its target's path.
fn entry(path: &Path) -> String {
    let meta = fs::symlink_metadata(path).expect("entry");
    if meta.file_type().is_symlink() {
        format!("link to {}", fs::read_link(path).expect("link").display())
    } else {
        format!("file {}", fs::read_to_string(path).expect("read"))
    }
}

#[test]
fn a_link_planted_at_the_temporary_name_is_not_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("certs.d");
    let dir = root.join("docker.io");
    fs::create_dir_all(&dir).expect("mkdir");
    let outside = tmp.path().join("shadow");
    fs::write(&outside, "root:x:0:0\n").expect("write");
    std::os::unix::fs::symlink(&outside, dir.join(TEMP)).expect("plant");
    configure(&opts(&root, &["docker.io"])).expect("configure");
    assert_eq!(fs::read_to_string(&outside).expect("read"), "root:x:0:0\n");
    assert!(
        fs::read_to_string(dir.join(HOSTS))
            .expect("read")
            .starts_with(MARKER)
    );
    assert!(!dir.join(TEMP).exists(), "no temporary file left");
}

#[test]
fn a_linked_hosts_toml_is_restored_as_the_same_link_and_its_target_never_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("certs.d");
    let dir = root.join("quay.io");
    fs::create_dir_all(&dir).expect("mkdir");
    let target = tmp.path().join("shared-quay.toml");
    fs::write(&target, USER_FILE).expect("write");
    std::os::unix::fs::symlink(&target, dir.join(HOSTS)).expect("link");
    let before = entry(&dir.join(HOSTS));

    configure(&opts(&root, &["quay.io"])).expect("configure");
    let ours = fs::read_to_string(dir.join(HOSTS)).expect("read");
    assert!(
        ours.contains("corp-mirror.example"),
        "the link's settings kept: {ours}"
    );
    assert!(
        !fs::symlink_metadata(dir.join(HOSTS))
            .expect("meta")
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        entry(&dir.join(BACKUP)),
        before,
        "the backup is the link itself"
    );
    configure(&opts(&root, &["quay.io"])).expect("again");

    cleanup(&root).expect("cleanup");
    assert_eq!(entry(&dir.join(HOSTS)), before);
    assert!(!dir.join(BACKUP).exists(), "no copy left behind");
    assert_eq!(fs::read_to_string(&target).expect("read"), USER_FILE);
    let names: Vec<_> = fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(names, [HOSTS]);
}

#[test]
fn a_registry_directory_that_is_a_link_is_refused_and_the_others_configured() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("certs.d");
    fs::create_dir_all(&root).expect("mkdir");
    let elsewhere = tmp.path().join("etc");
    fs::create_dir_all(&elsewhere).expect("mkdir");
    std::os::unix::fs::symlink(&elsewhere, root.join("quay.io")).expect("link");

    let failed =
        configure(&opts(&root, &["docker.io", "quay.io", "ghcr.io"])).expect_err("refused");
    assert_eq!(failed.done.len(), 2, "{failed:?}");
    let [HostsError::Refused { path, .. }] = &failed.errors[..] else {
        panic!("{failed:?}")
    };
    assert_eq!(path, &root.join("quay.io"));
    assert_eq!(
        fs::read_dir(&elsewhere).expect("dir").count(),
        0,
        "nothing written there"
    );
    assert!(
        root.join("ghcr.io").join(HOSTS).exists(),
        "the registry after it configured"
    );
    // cleanup does not follow the link either.
    fs::write(
        elsewhere.join(HOSTS),
        format!("{MARKER}\n{STATE_PREFIX} original=none dir=created\n"),
    )
    .expect("write");
    assert_eq!(cleanup(&root).expect("cleanup").len(), 2);
    assert!(elsewhere.join(HOSTS).exists());
}

#[test]
fn one_broken_registry_leaves_the_others_configured_and_every_failure_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (registry, text) in [("docker.io", "server = ["), ("quay.io", "host = 1 = 2")] {
        let dir = tmp.path().join(registry);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join(HOSTS), text).expect("write");
    }
    let failed = configure(&opts(
        tmp.path(),
        &["docker.io", "ghcr.io", "quay.io", "gcr.io"],
    ))
    .expect_err("two broken");
    assert_eq!(failed.errors.len(), 2, "{failed:?}");
    assert_eq!(
        failed.done,
        [
            tmp.path().join("ghcr.io/hosts.toml"),
            tmp.path().join("gcr.io/hosts.toml")
        ]
    );
}

#[test]
fn cleanup_goes_on_past_a_directory_it_cannot_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for registry in ["docker.io", "quay.io"] {
        let dir = tmp.path().join(registry);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join(HOSTS), USER_FILE).expect("write");
    }
    configure(&opts(tmp.path(), &["docker.io", "ghcr.io", "quay.io"])).expect("configure");
    // docker.io's original is gone: it cannot be put back.
    fs::remove_file(tmp.path().join("docker.io").join(BACKUP)).expect("rm");
    let failed = cleanup(tmp.path()).expect_err("docker.io fails");
    assert_eq!(failed.errors.len(), 1, "{failed:?}");
    assert!(
        failed.errors[0].to_string().contains("docker.io"),
        "{}",
        failed.errors[0]
    );
    assert_eq!(
        failed.done,
        [tmp.path().join("ghcr.io"), tmp.path().join("quay.io")]
    );
    assert_eq!(
        fs::read_to_string(tmp.path().join("quay.io").join(HOSTS)).expect("read"),
        USER_FILE
    );
}

#[test]
fn a_fifo_or_huge_file_at_hosts_toml_is_refused_without_hanging() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fifo = tmp.path().join("docker.io");
    fs::create_dir_all(&fifo).expect("mkdir");
    let made = std::process::Command::new("mkfifo")
        .arg(fifo.join(HOSTS))
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let big = tmp.path().join("quay.io");
    fs::create_dir_all(&big).expect("mkdir");
    fs::write(big.join(HOSTS), vec![b'#'; 2 << 20]).expect("write");
    let failed = configure(&opts(tmp.path(), &["docker.io", "quay.io"])).expect_err("refused");
    assert_eq!(failed.errors.len(), 2, "{failed:?}");
    for e in &failed.errors {
        assert!(matches!(e, HostsError::Refused { .. }), "{e}");
    }
}

#[test]
fn an_error_names_its_cause_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("docker.io");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join(HOSTS), "server = [").expect("write");
    let failed = configure(&opts(tmp.path(), &["docker.io"])).expect_err("invalid");
    let err = failed.errors.into_iter().next().expect("one");
    let cause = std::error::Error::source(&err)
        .expect("a cause")
        .to_string();
    let shown = format!("{:#}", anyhow::Error::from(err));
    assert_eq!(shown.matches(cause.trim()).count(), 1, "{shown}");
}

mod props {
    use proptest::prelude::*;

    use super::*;

    /// hosts.toml texts a user might have: real settings in any order, and any text.
    fn user_file() -> impl Strategy<Value = String> {
        let line = prop_oneof![
            Just("server = \"https://registry.example\"".to_owned()),
            Just("skip_verify = true".to_owned()),
            "\\[host\\.\"https?://[a-z0-9.:\\[\\]]{1,20}\"\\]",
            "  capabilities = \\[(\"pull\"|\"resolve\"|, ){0,4}\\]",
            "  ca = \"/[a-z/]{0,12}\"",
            "# [^\n]{0,30}",
            "[a-z_]{1,8} = \"[^\"\n\\\\]{0,10}\"",
            Just(String::new()),
        ];
        prop_oneof![
            4 => proptest::collection::vec(line, 0..8).prop_map(|l| l.join("\n")),
            1 => any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever the user's file holds: configure refuses it with an error naming it,
        /// or configures it twice to the same bytes with the mirror first; cleanup then
        /// gives back the user's exact bytes.
        #[test]
        fn configure_then_cleanup_gives_back_the_users_bytes(text in user_file()) {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path().join("registry.example");
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join(HOSTS), &text).expect("write");
            let o = opts(tmp.path(), &["registry.example"]);
            match configure(&o) {
                Err(failed) => {
                    let [err] = &failed.errors[..] else { panic!("{failed:?}") };
                    prop_assert!(err.to_string().contains("registry.example"), "{err}");
                    prop_assert_eq!(fs::read_to_string(dir.join(HOSTS)).expect("read"), text);
                    prop_assert!(!dir.join(BACKUP).exists(), "a refused file leaves no backup");
                }
                Ok(_) => {
                    let first = fs::read_to_string(dir.join(HOSTS)).expect("read");
                    prop_assert!(first.starts_with(MARKER));
                    let doc: DocumentMut = first.parse().expect("what we write is TOML");
                    let hosts = doc["host"].as_table_like().expect("a host table");
                    prop_assert_eq!(hosts.iter().next().map(|(k, _)| k), Some("http://127.0.0.1:5000"));
                    configure(&o).expect("again");
                    prop_assert_eq!(&fs::read_to_string(dir.join(HOSTS)).expect("read"), &first);
                    cleanup(tmp.path()).expect("cleanup");
                    prop_assert_eq!(fs::read_to_string(dir.join(HOSTS)).expect("read"), text);
                }
            }
        }
    }
}

#[test]
fn the_users_permissions_are_kept_and_a_refused_file_leaves_no_backup() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("quay.io");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join(HOSTS), USER_FILE).expect("write");
    fs::set_permissions(dir.join(HOSTS), fs::Permissions::from_mode(0o600)).expect("chmod");
    configure(&opts(tmp.path(), &["quay.io"])).expect("configure");
    let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(
        mode(&dir.join(HOSTS)),
        0o600,
        "ours is as private as theirs"
    );

    let bad = tmp.path().join("ghcr.io");
    fs::create_dir_all(&bad).expect("mkdir");
    fs::write(bad.join(HOSTS), "server = [").expect("write");
    configure(&opts(tmp.path(), &["ghcr.io"])).expect_err("refused");
    assert!(
        !bad.join(BACKUP).exists(),
        "no backup left by a refused file"
    );
}
