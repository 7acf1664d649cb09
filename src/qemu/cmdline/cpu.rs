//! The CPU section of the command line: `-smp` (sockets, cores, vcpus) and `-cpu` (the
//! config's model and flags, PVE's named models, `forcecpu` from a migration source).

use super::{Accel, CmdlineError, VmSpec, invalid, is_word, parse_bool, positive, props};

/// `-smp` and `-cpu`.
pub(super) fn args(spec: &VmSpec, accel: Accel) -> Result<Vec<String>, CmdlineError> {
    let sockets = match spec.options.get("sockets") {
        Some(v) => positive("sockets", v, 16)?,
        None => 1,
    };
    let cores = match spec.options.get("cores") {
        Some(v) => positive("cores", v, 1024)?,
        None => 1,
    };
    let maxcpus = sockets * cores;
    let vcpus = match spec.options.get("vcpus") {
        Some(v) => positive("vcpus", v, maxcpus)?,
        None => maxcpus,
    };
    Ok(vec![
        "-smp".into(),
        format!("{vcpus},sockets={sockets},cores={cores},maxcpus={maxcpus}"),
        "-cpu".into(),
        cpu(spec, accel)?,
    ])
}

/// PVE's named CPU models that are not QEMU models: base model plus flags.
fn pve_cpu_model(name: &str) -> Option<(&'static str, &'static str)> {
    const V2: &str = "+popcnt,+pni,+sse4.1,+sse4.2,+ssse3";
    Some(match name {
        "x86-64-v2" => ("qemu64", V2),
        "x86-64-v2-AES" => ("qemu64", "+aes,+popcnt,+pni,+sse4.1,+sse4.2,+ssse3"),
        "x86-64-v3" => (
            "qemu64",
            "+aes,+popcnt,+pni,+sse4.1,+sse4.2,+ssse3,+avx,+avx2,+bmi1,+bmi2,+f16c,+fma,+abm,+movbe,+xsave",
        ),
        "x86-64-v4" => (
            "qemu64",
            "+aes,+popcnt,+pni,+sse4.1,+sse4.2,+ssse3,+avx,+avx2,+bmi1,+bmi2,+f16c,+fma,+abm,+movbe,+xsave,+avx512f,+avx512bw,+avx512cd,+avx512dq,+avx512vl",
        ),
        _ => return None,
    })
}

/// `-cpu` argument. Default as PVE: `kvm64` with KVM, `qemu64` with TCG. Under TCG `host`
/// (KVM-only) becomes `max`, the closest TCG equivalent.
fn cpu(spec: &VmSpec, accel: Accel) -> Result<String, CmdlineError> {
    if let Some(forced) = &spec.force_cpu {
        if !is_word(forced, "_.+-=,") {
            return Err(invalid("forcecpu", forced, "unexpected characters"));
        }
        return Ok(match (accel, forced.split_once(',')) {
            (Accel::Tcg, Some(("host", rest))) => format!("max,{rest}"),
            (Accel::Tcg, None) if forced == "host" => "max".to_string(),
            _ => forced.clone(),
        });
    }
    let default = if accel == Accel::Kvm {
        "kvm64"
    } else {
        "qemu64"
    };
    let Some(value) = spec.options.get("cpu") else {
        return Ok(default.to_string());
    };
    let props = props("cpu", value, "cputype")?;
    let cputype = props.get("cputype").map(String::as_str).unwrap_or(default);
    if cputype.starts_with("custom-") {
        return Err(CmdlineError::Unsupported {
            key: "cpu".into(),
            why: format!("custom CPU model '{cputype}'"),
        });
    }
    if !is_word(cputype, "_.-") {
        return Err(invalid("cpu", value, "not a CPU model name"));
    }
    let mut out = match (cputype, accel) {
        ("host", Accel::Tcg) => "max".to_string(),
        (t, _) => match pve_cpu_model(t) {
            Some((base, flags)) => format!("{base},{flags}"),
            None => t.to_string(),
        },
    };
    if props.get("hidden").and_then(|h| parse_bool(h)) == Some(true) {
        out.push_str(",kvm=off");
    }
    if let Some(bits) = props.get("phys-bits") {
        if bits == "host" {
            out.push_str(",host-phys-bits=true");
        } else if bits.parse::<u8>().is_ok_and(|b| (8..=64).contains(&b)) {
            out.push_str(&format!(",phys-bits={bits}"));
        } else {
            return Err(invalid("cpu", value, "phys-bits must be 'host' or 8..64"));
        }
    }
    if let Some(flags) = props.get("flags") {
        for flag in flags.split(';').filter(|f| !f.is_empty()) {
            let ok = (flag.starts_with('+') || flag.starts_with('-')) && is_word(&flag[1..], "_.-");
            if !ok {
                return Err(invalid(
                    "cpu",
                    value,
                    format!("bad flag '{flag}' (want +name or -name)"),
                ));
            }
            out.push(',');
            out.push_str(flag);
        }
    }
    Ok(out)
}
