//! The machine section of the command line: the VM's identity (`-name`, SMBIOS UUID), its
//! pidfile and QMP monitor, the machine type (chipset) and the accelerator. It decides the
//! [`Chipset`] the device sections lay their buses out on; it adds no device itself.

use super::{
    Accel, CmdlineError, VmPaths, VmSpec, esc, esc_path, invalid, is_uuid, is_word, parse_bool,
    props, push,
};

/// The accelerator for this VM: the spec's, resolved on this host, and TCG whatever it says
/// when the config has `kvm: 0`.
pub(super) fn accel(spec: &VmSpec) -> Accel {
    let mut accel = spec.accel.resolve();
    if spec.options.get("kvm").and_then(|v| parse_bool(v)) == Some(false) {
        accel = Accel::Tcg;
    }
    accel
}

/// `-name`, the fixed defaults, the pidfile, the QMP monitor, `-machine`/`-accel` and the
/// SMBIOS UUID, in that order.
pub(super) fn args(
    spec: &VmSpec,
    paths: &VmPaths,
    machine: &str,
    accel: Accel,
) -> Result<Vec<String>, CmdlineError> {
    let mut a: Vec<String> = Vec::new();

    let name = match &spec.name {
        Some(n) => n.clone(),
        None => spec
            .options
            .get("name")
            .cloned()
            .unwrap_or_else(|| format!("vm{}", spec.vmid)),
    };
    if name.is_empty() || name.chars().any(|c| c.is_control()) {
        return Err(invalid(
            "name",
            &name,
            "empty or contains control characters",
        ));
    }
    push(
        &mut a,
        &["-name", &format!("{},debug-threads=on", esc(&name))],
    );
    push(
        &mut a,
        &["-nodefaults", "-no-user-config", "-display", "none"],
    );
    push(&mut a, &["-pidfile", &paths.pid.to_string_lossy()]);
    push(
        &mut a,
        &[
            "-chardev",
            &format!(
                "socket,id=qmp,path={},server=on,wait=off",
                esc_path(&paths.qmp)
            ),
            "-mon",
            "chardev=qmp,mode=control",
        ],
    );
    push(
        &mut a,
        &[
            "-machine",
            &format!("type={machine}"),
            "-accel",
            if accel == Accel::Kvm { "kvm" } else { "tcg" },
        ],
    );
    if let Some(uuid) = smbios_uuid(spec)? {
        push(&mut a, &["-smbios", &format!("type=1,uuid={uuid}")]);
    }
    Ok(a)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chipset {
    I440fx,
    Q35,
}

/// The machine type from `force_machine` or the `machine` option, `+pveN` stripped.
pub(super) fn machine(spec: &VmSpec) -> Result<(String, Chipset), CmdlineError> {
    let (key, raw) = match (&spec.force_machine, spec.options.get("machine")) {
        (Some(m), _) => ("forcemachine", m.clone()),
        (None, Some(m)) => {
            let props = props("machine", m, "type")?;
            if let Some(v) = props.get("viommu") {
                return Err(CmdlineError::Unsupported {
                    key: "machine".into(),
                    why: format!("viommu={v}"),
                });
            }
            match props.get("type") {
                Some(t) => ("machine", t.clone()),
                None => ("machine", "pc".to_string()),
            }
        }
        (None, None) => ("machine", "pc".to_string()),
    };
    let base = match raw.split_once("+pve") {
        Some((b, n)) if n.chars().all(|c| c.is_ascii_digit()) => b.to_string(),
        Some(_) => return Err(invalid(key, &raw, "unknown '+pve' suffix")),
        None => raw.clone(),
    };
    if !is_word(&base, ".-_") {
        return Err(invalid(key, &raw, "not a machine type name"));
    }
    let chipset = if base == "q35" || base.starts_with("pc-q35-") {
        Chipset::Q35
    } else if base == "pc" || base.starts_with("pc-i440fx-") || base.starts_with("pc-") {
        Chipset::I440fx
    } else {
        return Err(CmdlineError::Unsupported {
            key: key.into(),
            why: format!("machine '{base}' (only pc/i440fx and q35 machines)"),
        });
    };
    Ok((base, chipset))
}

fn smbios_uuid(spec: &VmSpec) -> Result<Option<String>, CmdlineError> {
    let Some(v) = spec.options.get("smbios1") else {
        return Ok(None);
    };
    let props = props("smbios1", v, "uuid")?;
    match props.get("uuid") {
        Some(u) if is_uuid(u) => Ok(Some(u.clone())),
        Some(u) => Err(invalid("smbios1", u, "uuid is not a UUID")),
        None => Ok(None),
    }
}
