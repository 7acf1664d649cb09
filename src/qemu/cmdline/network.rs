//! The network section of the command line: every `netN` option parsed into a [`Nic`] (model
//! and MAC kept) and its `-netdev`/`-device` pair; the backend is an unconnected hub port
//! (see the parent module for why).

use super::{CmdlineError, Layout, VmSpec, invalid, props, push};

/// One `netN` option, parsed.
#[derive(Debug)]
pub(super) struct Nic {
    pub(super) key: String,
    model: &'static str,
    mac: String,
}

/// `-netdev` and `-device` arguments of every NIC, by index.
pub(super) fn args(nets: &[Nic], layout: &mut Layout) -> Result<Vec<String>, CmdlineError> {
    let mut a = Vec::new();
    for Nic { key, model, mac } in nets {
        let hub: u32 = key[3..].parse().unwrap_or(0);
        push(
            &mut a,
            &[
                "-netdev",
                &format!("hubport,id={key},hubid={hub}"),
                "-device",
                &format!(
                    "{model},mac={mac},netdev={key},id={key},{}{}",
                    layout.pci.addr()?,
                    layout.bootindex(key)
                ),
            ],
        );
    }
    Ok(a)
}

const NIC_MODELS: &[(&str, &str)] = &[
    ("virtio", "virtio-net-pci"),
    ("e1000", "e1000"),
    ("e1000e", "e1000e"),
    ("rtl8139", "rtl8139"),
    ("vmxnet3", "vmxnet3"),
    ("e1000-82540em", "e1000-82540em"),
    ("e1000-82544gc", "e1000-82544gc"),
    ("e1000-82545em", "e1000-82545em"),
    ("i82551", "i82551"),
    ("i82557b", "i82557b"),
    ("i82559er", "i82559er"),
    ("ne2k_pci", "ne2k_pci"),
    ("pcnet", "pcnet"),
];

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        // multicast bit must be clear
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// Every `netN` option, by index.
pub(super) fn parse(spec: &VmSpec) -> Result<Vec<Nic>, CmdlineError> {
    let mut nets = Vec::new();
    for (key, value) in &spec.options {
        let Some(idx) = key.strip_prefix("net") else {
            continue;
        };
        let Ok(idx) = idx.parse::<u32>() else {
            continue;
        };
        if idx.to_string() != key[3..] || idx > 31 {
            return Err(invalid(key, value, "NICs are net0..net31"));
        }
        let props = props(key, value, "model")?;
        let mut model = None;
        let mut mac = props.get("macaddr").cloned();
        for (m, dev) in NIC_MODELS {
            if let Some(v) = props.get(*m) {
                model = Some(*dev);
                if !v.is_empty() {
                    mac = Some(v.clone());
                }
            }
        }
        if let Some(m) = props.get("model") {
            match NIC_MODELS.iter().find(|(name, _)| name == m) {
                Some((_, dev)) => model = Some(*dev),
                None => return Err(invalid(key, value, format!("unknown NIC model '{m}'"))),
            }
        }
        let model = model.ok_or_else(|| {
            invalid(
                key,
                value,
                "no known NIC model (virtio=MAC, e1000=MAC, ...)",
            )
        })?;
        let mac = mac.ok_or_else(|| {
            invalid(
                key,
                value,
                "no MAC address; write one into the config, e.g. virtio=BC:24:11:00:00:01",
            )
        })?;
        if !is_mac(&mac) {
            return Err(invalid(
                key,
                value,
                format!("'{mac}' is not a unicast MAC address"),
            ));
        }
        nets.push((idx, key.clone(), model, mac));
    }
    nets.sort();
    Ok(nets
        .into_iter()
        .map(|(_, key, model, mac)| Nic { key, model, mac })
        .collect())
}
