//! `mtunnel handlers check` and `mtunnel handlers test` run as a site admin runs them: the
//! built-in specs pass; an edited copy of the handlers directory takes effect (and the
//! built-ins stay as they were); a handler with a syntax error is reported with its file
//! and line; the cookbook (`examples/handlers/`) passes recipe by recipe, each recipe
//! tested against its own overrides only. Only the binary is driven, from the outside.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mtunnel");

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn mtunnel(args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running mtunnel");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or("")
}

fn copy_handlers(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("handlers");
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "lua") {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// Cases per built-in spec file. Adding, removing or renaming a case or a file means
/// updating this table: a case that silently stops running is a check that cannot fail.
const SPEC_CASES: &[(&str, usize)] = &[
    ("bwlimit_spec.lua", 16),
    ("clock_spec.lua", 6),
    ("config_spec.lua", 20),
    ("disk-import_spec.lua", 12),
    ("disk_spec.lua", 19),
    ("fstrim_spec.lua", 4),
    ("mtunnel-features_spec.lua", 2),
    ("nbdstop_spec.lua", 4),
    ("protocol_spec.lua", 10),
    ("query-disk-import_spec.lua", 13),
    ("quit_spec.lua", 12),
    ("replica-commit_spec.lua", 2),
    ("replica-cutover_spec.lua", 4),
    ("replica-export_spec.lua", 1),
    ("replica-hashes_spec.lua", 3),
    ("replica-prepare_spec.lua", 7),
    ("resume_spec.lua", 5),
    ("schema_spec.lua", 9),
    ("start_spec.lua", 19),
    ("stop_spec.lua", 4),
    ("ticket_spec.lua", 5),
    ("unlock_spec.lua", 6),
    ("version_spec.lua", 4),
];

/// `ok    <file>: <case>` lines counted per file.
fn passed_per_file(stdout: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in stdout.lines() {
        if let Some((file, _case)) = line.strip_prefix("ok    ").and_then(|l| l.split_once(": ")) {
            *counts.entry(file.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn built_in_specs_pass_with_the_exact_number_of_cases_per_file() {
    // The table lists exactly the spec files of the source tree.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("handlers");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_spec.lua"))
        .collect();
    on_disk.sort();
    let table: Vec<String> = SPEC_CASES.iter().map(|(f, _)| f.to_string()).collect();
    assert_eq!(
        on_disk, table,
        "handlers/*_spec.lua and SPEC_CASES in this test differ: add the new spec file (and \
         its case count) to SPEC_CASES, and to BUILTIN_SPECS in src/script/spec/mod.rs"
    );

    let run = mtunnel(&["handlers", "test"]);
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
    let want: BTreeMap<String, usize> = SPEC_CASES
        .iter()
        .map(|(f, n)| (f.to_string(), *n))
        .collect();
    assert_eq!(
        passed_per_file(&run.stdout),
        want,
        "cases per spec file (passed) differ from SPEC_CASES:\n{}",
        run.stdout
    );
    let total: usize = want.values().sum();
    assert_eq!(last_line(&run.stdout), format!("{total} passed, 0 failed"));
}

#[test]
fn a_run_that_checks_nothing_fails() {
    // A filter that matches no case.
    let run = mtunnel(&["handlers", "test", "--filter", "nosuchcase"]);
    assert!(!run.ok, "{}", run.stdout);
    let total: usize = SPEC_CASES.iter().map(|(_, n)| n).sum();
    assert_eq!(
        run.stdout,
        format!(
            "FAIL  no spec case ran: --filter 'nosuchcase' matches none of the {total} cases\n\
             0 passed, 1 failed\n"
        )
    );
    assert!(
        run.stderr.contains("1 spec case(s) failed"),
        "{}",
        run.stderr
    );

    // A spec file that returns no cases, and a case without an assertion.
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    std::fs::write(dir.path().join("empty_spec.lua"), "return {}\n").unwrap();
    std::fs::write(
        dir.path().join("lazy_spec.lua"),
        "return {\n  [\"checks nothing\"] = function(t) t:open{} end,\n  \
         [\"checks\"] = function(t) t:ok(t:open{}) end,\n}\n",
    )
    .unwrap();
    let run = mtunnel(&["handlers", "test", dir_s]);
    assert!(!run.ok, "{}", run.stdout);
    assert_eq!(
        run.stdout,
        "FAIL  empty_spec.lua: (loading the spec file)\n      \
         the file defines no cases: it must return {[\"case name\"] = function(t) ... end, ...}\n\
         ok    lazy_spec.lua: checks\n\
         FAIL  lazy_spec.lua: checks nothing\n      \
         the case made no assertion: check its result with t:eq, t:ok, t:match, t:succeeds, \
         t:fail_contains or t:raises\n\
         1 passed, 2 failed\n"
    );

    // Only the empty file: nothing ran at all.
    std::fs::remove_file(dir.path().join("lazy_spec.lua")).unwrap();
    let run = mtunnel(&["handlers", "test", dir_s]);
    assert!(!run.ok, "{}", run.stdout);
    assert_eq!(last_line(&run.stdout), "0 passed, 1 failed");
}

#[test]
fn an_edited_handler_takes_effect() {
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    copy_handlers(dir.path());
    // A site rule: live-migrated disks get cache=none unless the source set a cache mode.
    let disk = dir.path().join("disk.lua");
    let code = std::fs::read_to_string(&disk).unwrap();
    let rule = "    drive.format = format\n";
    assert!(code.contains(rule), "disk.lua changed; adapt this test");
    std::fs::write(
        &disk,
        code.replace(
            rule,
            "    drive.format = format\n    drive.cache = drive.cache or \"none\"\n",
        ),
    )
    .unwrap();

    let check = mtunnel(&["handlers", "check", dir_s]);
    assert!(check.ok, "{}\n{}", check.stdout, check.stderr);
    assert!(
        check
            .stdout
            .contains(&format!("ok    disk: Allocate an empty volume for a live (NBD) storage migration. ({dir_s}/disk.lua)")),
        "{}",
        check.stdout
    );

    // The shipped disk spec now fails, and says why.
    let run = mtunnel(&["handlers", "test", dir_s, "--filter", "disk_spec.lua"]);
    assert!(!run.ok);
    assert!(
        run.stdout
            .contains("FAIL  disk_spec.lua: allocates a volume and returns its drive string"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("got \"local:100/vm-100-disk-0.raw,cache=none,discard=on,format=raw,iothread=1,size=64M\""),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("ok    disk_spec.lua: file, volume and format in the drive are ignored"),
        "a drive with its own cache mode keeps it:\n{}",
        run.stdout
    );

    // A site spec for the site rule passes.
    std::fs::write(
        dir.path().join("site_spec.lua"),
        r#"
        return {
          ["disks get cache=none"] = function(t)
            local tun = t:open{}
            t:eq(tun:send{cmd = "disk", format = "raw", storage = "local",
                          drive = {interface = "scsi", index = 0, size = 1024 * 1024}}, {
              success = true,
              volid = "local:100/vm-100-disk-0.raw",
              drivestr = "local:100/vm-100-disk-0.raw,cache=none,format=raw,size=1M",
            })
          end,
        }
        "#,
    )
    .unwrap();
    let run = mtunnel(&["handlers", "test", dir_s, "--filter", "site_spec"]);
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(
        run.stdout,
        "ok    site_spec.lua: disks get cache=none\n1 passed, 0 failed\n"
    );

    // The built-in handlers are untouched.
    let run = mtunnel(&["handlers", "test", "--filter", "disk_spec.lua"]);
    assert!(run.ok, "{}", run.stdout);
}

#[test]
fn a_broken_handler_is_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    std::fs::write(
        dir.path().join("disk.lua"),
        "return {\n  description = \"broken\",\n  params = { storage = { type = \"string\" },, },\n  run = function(ctx, p) end,\n}\n",
    )
    .unwrap();

    let check = mtunnel(&["handlers", "check", dir_s]);
    assert!(!check.ok);
    let line = check
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL  disk: "))
        .unwrap_or_else(|| panic!("{}", check.stdout));
    assert!(
        line.starts_with(&format!("FAIL  disk: {dir_s}/disk.lua:3: ")),
        "{line}"
    );
    assert_eq!(last_line(&check.stdout), "20 handlers, 1 refused");
    assert!(
        check.stderr.contains("1 handler(s) refused"),
        "{}",
        check.stderr
    );

    // The spec run fails on it (a refused handler is a failure, not a warning), and the
    // disk command answers with the load error.
    let run = mtunnel(&["handlers", "test", dir_s, "--filter", "disk_spec.lua"]);
    assert!(!run.ok);
    assert!(
        run.stdout.starts_with(&format!(
            "FAIL  handler 'disk' refused: {dir_s}/disk.lua:3: "
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("failed to handle 'disk' command - handler not loaded: "),
        "{}",
        run.stdout
    );
}

#[test]
fn a_broken_spec_file_is_one_failure() {
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    std::fs::write(
        dir.path().join("x_spec.lua"),
        "return {\n  [\"a\"] = function(t)\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("y_spec.lua"),
        "return {\n  [\"fails\"] = function(t) t:eq(1, 2, \"numbers\") end,\n  [\"passes\"] = function(t) t:ok(true) end,\n}\n",
    )
    .unwrap();
    let run = mtunnel(&["handlers", "test", dir_s]);
    assert!(!run.ok);
    assert_eq!(
        run.stdout,
        "FAIL  x_spec.lua: (loading the spec file)\n      \
         x_spec.lua:3: 'end' expected (to close 'function' at line 2) near <eof>\n\
         FAIL  y_spec.lua: fails\n      \
         y_spec.lua:2: numbers: values differ: expected 2, got 1\n\
         ok    y_spec.lua: passes\n\
         1 passed, 2 failed\n"
    );
    assert!(
        run.stderr.contains("2 spec case(s) failed"),
        "{}",
        run.stderr
    );
}

/// The recipes of examples/handlers and their spec files.
fn cookbook() -> (std::path::PathBuf, BTreeMap<String, usize>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/handlers");
    let mut specs = BTreeMap::new();
    for recipe in std::fs::read_dir(&dir).unwrap() {
        let recipe = recipe.unwrap().path();
        for file in std::fs::read_dir(&recipe).unwrap() {
            let name = file.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with("_spec.lua") {
                let recipe = recipe.file_name().unwrap().to_string_lossy();
                specs.insert(format!("{recipe}/{name}"), 0);
            }
        }
    }
    (dir, specs)
}

#[test]
fn the_cookbook_passes_recipe_by_recipe() {
    let (dir, specs) = cookbook();
    assert!(
        specs.len() >= 6,
        "the cookbook has at least six recipes: {specs:?}"
    );
    let run = mtunnel(&["handlers", "test", dir.to_str().unwrap()]);
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
    let passed = passed_per_file(&run.stdout);
    let files: Vec<&String> = passed.keys().collect();
    assert_eq!(
        files,
        specs.keys().collect::<Vec<_>>(),
        "every recipe's spec file ran, named <recipe>/<file>:\n{}",
        run.stdout
    );
    let total: usize = passed.values().sum();
    assert_eq!(last_line(&run.stdout), format!("{total} passed, 0 failed"));

    let run = mtunnel(&["handlers", "check", dir.to_str().unwrap()]);
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    let headers = run.stdout.lines().filter(|l| l.starts_with("== ")).count();
    assert_eq!(
        headers,
        specs.len(),
        "one section per recipe:\n{}",
        run.stdout
    );
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
}

#[test]
fn a_cookbook_recipe_is_tested_against_its_own_overrides_only() {
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    let version_spec = |api: u32| {
        format!(
            "return {{\n  [\"api\"] = function(t)\n    \
             t:eq(t:open{{}}:send{{cmd = \"version\"}}.api, {api})\n  end,\n}}\n"
        )
    };
    // `a` overrides version; `b` has only a spec and must see the built-in version.
    std::fs::create_dir(dir.path().join("a")).unwrap();
    std::fs::write(
        dir.path().join("a/version.lua"),
        "return { description = \"v3\", params = false, lock = false,\n  \
         run = function() return { api = 3, age = 1 } end }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("a/version_spec.lua"), version_spec(3)).unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    std::fs::write(dir.path().join("b/site_spec.lua"), version_spec(2)).unwrap();
    // `c` has a handler but no spec of its own.
    std::fs::create_dir(dir.path().join("c")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("handlers/stop.lua"),
        dir.path().join("c/stop.lua"),
    )
    .unwrap();
    // a directory without Lua files is not a recipe
    std::fs::create_dir(dir.path().join("notes")).unwrap();

    let run = mtunnel(&["handlers", "test", dir_s]);
    assert!(!run.ok, "{}", run.stdout);
    assert_eq!(
        run.stdout,
        "ok    a/version_spec.lua: api\n\
         ok    b/site_spec.lua: api\n\
         FAIL  c: the recipe has no *_spec.lua of its own\n\
         2 passed, 1 failed\n"
    );
    let run = mtunnel(&["handlers", "test", dir_s, "--filter", "b/"]);
    assert_eq!(
        run.stdout,
        "ok    b/site_spec.lua: api\n\
         FAIL  c: the recipe has no *_spec.lua of its own\n\
         1 passed, 1 failed\n"
    );

    std::fs::remove_dir_all(dir.path().join("c")).unwrap();
    let run = mtunnel(&["handlers", "check", dir_s]);
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    let a = format!("== {dir_s}/a\n");
    assert!(run.stdout.starts_with(&a), "{}", run.stdout);
    assert!(run.stdout.contains("ok    version: v3 ("), "{}", run.stdout);
    assert!(
        run.stdout.contains(&format!("== {dir_s}/b\n")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(
            "ok    version: Protocol version of this end (api 2, age 0). (built-in:version.lua)"
        ),
        "b checks the built-in version:\n{}",
        run.stdout
    );

    // A handler file at the top makes it a plain handlers directory again.
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("handlers/stop.lua"),
        dir.path().join("stop.lua"),
    )
    .unwrap();
    let run = mtunnel(&["handlers", "check", dir_s]);
    assert!(!run.stdout.contains("== "), "{}", run.stdout);
}
