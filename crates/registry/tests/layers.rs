//! The crate's modules form layers: no two of them use each other, directly or round
//! about. Read from the source: a top-level module uses another when its code (comments
//! aside) names `crate::<other>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `code` names through `crate::`, in `crate::a` and in
/// `crate::{a, b::c}` form.
fn used(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                out.insert(ident(item.trim()));
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| m.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    out
}

/// The code of a file without its line comments (the crate uses no block comments); a
/// `//` inside a string (`"http://..."`) is code.
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let (mut in_string, mut escaped) = (false, false);
        let mut prev = ' ';
        for c in line.chars() {
            if !in_string && prev == '/' && c == '/' {
                out.pop();
                break;
            }
            match c {
                _ if escaped => escaped = false,
                '\\' if in_string => escaped = true,
                '"' => in_string = !in_string,
                _ => {}
            }
            out.push(c);
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// Module -> modules it uses.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component");
        let module = Path::new(first.as_os_str())
            .file_stem()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read");
        let uses = used(&code(&text));
        g.entry(module.clone())
            .or_default()
            .extend(uses.into_iter().filter(|m| *m != module));
    }
    g
}

/// A cycle in `g`, as the modules along it, if there is one.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut c = path[i..].to_vec();
            c.push(m.to_owned());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for next in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
}

#[test]
fn no_two_modules_use_each_other() {
    let g = graph();
    // The reader itself: the crate's modules are found, and what they use.
    assert!(g.len() > 20, "modules found: {:?}", g.keys());
    assert!(g["mirror"].contains("state"), "{:?}", g["mirror"]);
    if let Some(c) = cycle(&g) {
        panic!("modules use each other: {}", c.join(" -> "));
    }
}

#[test]
fn the_reader_finds_cycles_and_grouped_imports() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let file = "use crate::{b, c::X};\n// crate::d is only mentioned\nfn f() { crate::e::g() }\nlet u = \"http://x\"; crate::h::i(); // crate::j";
    g.insert("a".into(), used(&code(file)));
    assert_eq!(
        g["a"],
        ["b", "c", "e", "h"].into_iter().map(String::from).collect()
    );
    assert_eq!(cycle(&g), None);
    g.insert("c".into(), used("use crate::a;"));
    assert_eq!(cycle(&g), Some(vec!["a".into(), "c".into(), "a".into()]));
}
