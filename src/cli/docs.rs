//! `mtunnel generate-docs DIR` (hidden): writes the man pages and shell completions that
//! the Debian package installs (`scripts/build-deb.sh` runs it before `cargo deb`). They
//! are made from what the binary itself holds, so they cannot drift from it: `mtunnel(1)`
//! and one page per subcommand (`mtunnel-migrate(1)`, `mtunnel-vm-create(1)`, ...) and the
//! bash, zsh and fish completions from the clap definition ([`Cli`]); `mtunnel.toml(5)`
//! from the packaged config file `packaging/mtunnel.toml`, whose keys and defaults
//! `tests/packaging.rs` checks against the code.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// The packaged config file: every key of the config file with its default, commented.
const PACKAGED_CONFIG: &str = include_str!("../../packaging/mtunnel.toml");

/// The man pages' header (centre): which manual they belong to.
const MANUAL: &str = "mtunnel manual";

/// Writes `DIR/man/man1/*.1`, `DIR/man/man5/mtunnel.toml.5` and `DIR/completions/`
/// (`mtunnel.bash`, `_mtunnel`, `mtunnel.fish`); creates the directories.
pub fn generate(dir: &Path) -> anyhow::Result<()> {
    let man1 = dir.join("man/man1");
    let man5 = dir.join("man/man5");
    let completions = dir.join("completions");
    for d in [&man1, &man5, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = Cli::command()
        .disable_help_subcommand(true)
        .long_about(DESCRIPTION);
    cmd.build();
    write_man_pages(&cmd, &man1, true)?;
    let version = cmd.get_version().unwrap_or_default();
    write(
        &man5.join("mtunnel.toml.5"),
        config_man_page(version).as_bytes(),
    )?;
    for (shell, name) in [
        (Shell::Bash, "mtunnel.bash"),
        (Shell::Zsh, "_mtunnel"),
        (Shell::Fish, "mtunnel.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut visible_commands(), "mtunnel", &mut out);
        write(&completions.join(name), &out)?;
    }
    println!("wrote man pages and completions to {}", dir.display());
    Ok(())
}

/// The command line without its hidden commands (`bench-relay`, `generate-docs`), which
/// the completion generators would otherwise offer. The top level has no arguments of its
/// own, so its subcommands are all there is to copy.
fn visible_commands() -> clap::Command {
    let cmd = Cli::command();
    clap::Command::new("mtunnel")
        .version(env!("CARGO_PKG_VERSION"))
        .about(cmd.get_about().cloned().unwrap_or_default())
        .subcommand_required(true)
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// The DESCRIPTION of `mtunnel(1)` (the one-line `about` is its NAME line).
const DESCRIPTION: &str = "\
mtunnel receives running VMs over an authenticated WebSocket tunnel that speaks the \
Proxmox VE remote-migration protocol (qm remote-migrate can target it), and moves VMs \
between mtunnel hosts. `mtunnel serve` runs the target node: the HTTPS API, the tunnels \
and their tasks; `mtunnel migrate` sends a VM of this node to a target. Every tunnel \
command is a Lua handler that site admins can read and override.

Each command has its own page, e.g. mtunnel-migrate(1), and its own --help.";

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// One page for `cmd` and one for each of its visible subcommands, recursively.
fn write_man_pages(cmd: &clap::Command, dir: &Path, top: bool) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub, dir, false)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .manual(MANUAL)
        .date(page_date());
    let mut page = Vec::new();
    man.render(&mut page)
        .with_context(|| format!("rendering the man page of {}", cmd.get_name()))?;
    if top {
        page.extend_from_slice(TOP_PAGE_SECTIONS.as_bytes());
    } else {
        page.extend_from_slice(b".SH \"SEE ALSO\"\n\\fBmtunnel\\fR(1), \\fBmtunnel.toml\\fR(5)\n");
    }
    write(&dir.join(man.get_filename()), &page)
}

/// What `mtunnel(1)` adds to the clap-generated sections.
const TOP_PAGE_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/mtunnel/mtunnel.toml\fR
The config file read when no \fB\-\-config\fR is given; see \fBmtunnel.toml\fR(5).
.TP
\fI/var/lib/mtunnel\fR
The data directory of a node run as root: API secrets (\fIpriv/\fR), task logs, tunnel
journals, VM configs and the default storage \fBlocal\fR.
.TP
\fI/var/lib/mtunnel/handlers\fR
Overrides of the built-in tunnel command handlers (Lua); the built-in ones are in
\fI/usr/share/mtunnel/handlers\fR, for reading.
.TP
\fI/usr/share/doc/mtunnel/README.md\fR
How to migrate a VM, run mtunnel as a service and configure it.
.SH ENVIRONMENT
.TP
\fBMTUNNEL_LOG\fR
Log filter (tracing's env-filter syntax, e.g. \fBdebug\fR or \fBmtunnel=debug\fR); the
log goes to standard error.
.SH "SEE ALSO"
\fBmtunnel\-serve\fR(1), \fBmtunnel\-migrate\fR(1), \fBmtunnel.toml\fR(5), \fBqm\fR(1)
"#;

/// `mtunnel.toml(5)`: a fixed head, then the packaged config file rendered key by key.
fn config_man_page(version: &str) -> String {
    let mut out = format!(
        ".TH MTUNNEL.TOML 5 \"{}\" \"mtunnel {version}\" \"{MANUAL}\"\n\
         .SH NAME\nmtunnel.toml \\- configuration file of mtunnel\n\
         .SH SYNOPSIS\n\\fI/etc/mtunnel/mtunnel.toml\\fR\n\
         .SH DESCRIPTION\n{CONFIG_DESCRIPTION}.SH KEYS\n",
        page_date()
    );
    // The file's own opening paragraph says what DESCRIPTION says.
    let keys = PACKAGED_CONFIG
        .split_once("\n\n")
        .map_or("", |(_, rest)| rest);
    out.push_str(&config_keys_roff(keys));
    out.push_str(".SH \"SEE ALSO\"\n\\fBmtunnel\\fR(1), \\fBmtunnel\\-serve\\fR(1)\n");
    out
}

const CONFIG_DESCRIPTION: &str = "\
A TOML file. \\fBmtunnel serve\\fR reads the file given with \\fB\\-\\-config\\fR, else
\\fI/etc/mtunnel/mtunnel.toml\\fR if it exists. Every key is optional: a key that is absent
takes its built-in default, and the flags \\fB\\-\\-node\\fR, \\fB\\-\\-data\\-dir\\fR,
\\fB\\-\\-run\\-dir\\fR and \\fB\\-\\-listen\\fR win over the file. An unknown key is an error.
Commands other than \\fBserve\\fR read the file that the data directory's \\fBserve\\fR
read. The file is read at start; restart the service after a change.
.PP
Below, each key is shown with its default as in the packaged file, where all but
\\fBmetrics_listen\\fR are commented out.
";

/// Renders the packaged config file as roff: a comment paragraph followed by a blank line
/// is prose, comment lines right above a `key = value` line describe that key, and a
/// `[table]` line starts a subsection.
fn config_keys_roff(file: &str) -> String {
    let mut out = String::new();
    let mut prose: Vec<&str> = Vec::new();
    for line in file.lines() {
        let text = line.trim_start_matches('#').trim();
        let (entry, note) = match text.split_once(" # ") {
            Some((entry, note)) => (entry.trim(), Some(note.trim())),
            None => (text, None),
        };
        if text.is_empty() {
            if !prose.is_empty() {
                out.push_str(&format!(".PP\n{}\n", roff_text(&prose.join(" "))));
                prose.clear();
            }
        } else if entry.starts_with('[') && entry.ends_with(']') {
            out.push_str(&format!(".SS \"{}\"\n", roff_text(entry)));
            prose.extend(note);
            if !prose.is_empty() {
                out.push_str(&format!("{}\n", roff_text(&prose.join(" "))));
                prose.clear();
            }
        } else if is_key_line(entry) {
            let note = note
                .map(|n| format!(" ({})", roff_text(n)))
                .unwrap_or_default();
            out.push_str(&format!(".TP\n\\fB{}\\fR{note}\n", roff_text(entry)));
            if !prose.is_empty() {
                out.push_str(&format!("{}\n", roff_text(&prose.join(" "))));
            }
            prose.clear();
        } else {
            prose.push(text);
        }
    }
    if !prose.is_empty() {
        out.push_str(&format!(".PP\n{}\n", roff_text(&prose.join(" "))));
    }
    out
}

/// The pages' date (YYYY-MM-DD, UTC): `SOURCE_DATE_EPOCH` when set (reproducible builds),
/// else today. An empty date would shift the .TH fields (clap_mangen drops it).
fn page_date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// `key = value` with a lower-case key: a setting, not prose.
fn is_key_line(text: &str) -> bool {
    text.split_once(" = ").is_some_and(|(key, _)| {
        !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// Text safe inside a roff line: backslashes escaped, no control character at the start.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_875), (2024, 6, 1));
    }

    #[test]
    fn config_page_renders_prose_tables_and_keys() {
        let file = "# Intro line one\n# line two.\n\n# The port.\n# listen = \"127.0.0.1:8006\"   # or 0.0.0.0\n\n# [cluster]   # etcd\n# .name = x\n";
        assert_eq!(
            config_keys_roff(file),
            ".PP\nIntro line one line two.\n\
             .TP\n\\fBlisten = \"127.0.0.1:8006\"\\fR (or 0.0.0.0)\nThe port.\n\
             .SS \"[cluster]\"\netcd\n\
             .PP\n\\&.name = x\n"
        );
    }
}
