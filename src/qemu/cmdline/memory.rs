//! The memory section of the command line: `-m` from the config's `memory` option and the
//! balloon device PVE adds unless `balloon: 0`.

use super::{CmdlineError, Layout, VmSpec, positive, props, push};

/// `-m` in MiB (PVE's default 512).
pub(super) fn args(spec: &VmSpec) -> Result<Vec<String>, CmdlineError> {
    Ok(vec!["-m".into(), memory_mib(spec)?.to_string()])
}

/// The balloon device (PVE adds it unless `balloon: 0`).
pub(super) fn balloon(spec: &VmSpec, layout: &mut Layout) -> Result<Vec<String>, CmdlineError> {
    let mut a = Vec::new();
    if spec.options.get("balloon").map(String::as_str) != Some("0") {
        push(
            &mut a,
            &[
                "-device",
                &format!(
                    "virtio-balloon-pci,id=balloon0,{},free-page-reporting=on",
                    layout.pci.addr()?
                ),
            ],
        );
    }
    Ok(a)
}

fn memory_mib(spec: &VmSpec) -> Result<u64, CmdlineError> {
    let Some(v) = spec.options.get("memory") else {
        return Ok(512);
    };
    let props = props("memory", v, "current")?;
    match props.get("current") {
        Some(c) => positive("memory", c, 64 * 1024 * 1024),
        None => Ok(512),
    }
}
