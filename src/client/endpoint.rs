//! What `mtunnel migrate` is told on its command line: the PVE-style `target-endpoint`
//! property string and the `source:target` id maps for storages and bridges.

use std::collections::BTreeMap;
use std::str::FromStr;

/// `host=..[,port=..],apitoken=PVEAPIToken=..[,fingerprint=..]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetEndpoint {
    pub host: String,
    pub port: u16,
    /// The full header value, `PVEAPIToken=user@realm!id=secret`.
    pub apitoken: String,
    pub fingerprint: Option<String>,
}

impl FromStr for TargetEndpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut host = None;
        let mut port = 8006;
        let mut apitoken = None;
        let mut fingerprint = None;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("invalid target endpoint part '{part}' (expected key=value)")
            })?;
            match key {
                "host" => host = Some(value.to_string()),
                "port" => {
                    port = value
                        .parse()
                        .map_err(|_| format!("invalid port '{value}' in target endpoint"))?
                }
                "apitoken" => apitoken = Some(value.to_string()),
                "fingerprint" => {
                    if crate::net::tls::normalize_fingerprint(value).is_none() {
                        return Err(format!(
                            "invalid fingerprint '{value}' (expected 32 AA:BB pairs)"
                        ));
                    }
                    fingerprint = Some(value.to_string())
                }
                other => return Err(format!("unknown target endpoint key '{other}'")),
            }
        }
        let apitoken =
            apitoken.ok_or("target endpoint needs apitoken=PVEAPIToken=user@realm!id=secret")?;
        if !apitoken.starts_with("PVEAPIToken=") {
            return Err(
                "apitoken must start with 'PVEAPIToken=' (as PVE's target-endpoint)".into(),
            );
        }
        Ok(TargetEndpoint {
            host: host.ok_or("target endpoint needs host=")?,
            port,
            apitoken,
            fingerprint,
        })
    }
}

/// A `storage-pair-list` / `bridge-pair-list`: `source:target` pairs and at most one bare
/// `target` as default for everything else; `1` maps every id to itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    pub pairs: BTreeMap<String, String>,
    pub default: Option<String>,
    pub identity: bool,
}

impl FromStr for IdMap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut map = IdMap::default();
        for item in crate::storage::split_id_list(s) {
            if item == "1" {
                map.identity = true;
                continue;
            }
            match item.split_once(':') {
                Some((from, to)) => {
                    if map.pairs.insert(from.to_string(), to.to_string()).is_some() {
                        return Err(format!("duplicate mapping for '{from}'"));
                    }
                }
                None => {
                    if map.default.replace(item.to_string()).is_some() {
                        return Err("more than one default mapping".into());
                    }
                }
            }
        }
        Ok(map)
    }
}

impl IdMap {
    /// The target id for `source`, if the map says one.
    pub fn map(&self, source: &str) -> Option<String> {
        self.pairs
            .get(source)
            .or(self.default.as_ref())
            .cloned()
            .or_else(|| self.identity.then(|| source.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parses_like_pve() {
        let fp = "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99";
        let e: TargetEndpoint = format!(
            "host=192.0.2.10,port=8007,apitoken=PVEAPIToken=root@pam!m=abc-def,fingerprint={fp}"
        )
        .parse()
        .unwrap();
        assert_eq!(e.host, "192.0.2.10");
        assert_eq!(e.port, 8007);
        assert_eq!(e.apitoken, "PVEAPIToken=root@pam!m=abc-def");
        assert_eq!(e.fingerprint.as_deref(), Some(fp));
        let e: TargetEndpoint = "host=h,apitoken=PVEAPIToken=a@b!c=d".parse().unwrap();
        assert_eq!(e.port, 8006);
        assert!("host=h".parse::<TargetEndpoint>().is_err());
        assert!(
            "host=h,apitoken=root@pam!c=d"
                .parse::<TargetEndpoint>()
                .is_err()
        );
        assert!(
            "host=h,apitoken=PVEAPIToken=a@b!c=d,fingerprint=xx"
                .parse::<TargetEndpoint>()
                .is_err()
        );
    }

    #[test]
    fn id_maps() {
        let m: IdMap = "local:fast, slow".parse().unwrap();
        assert_eq!(m.map("local").as_deref(), Some("fast"));
        assert_eq!(m.map("other").as_deref(), Some("slow"));
        let m: IdMap = "vmbr0:vmbr1".parse().unwrap();
        assert_eq!(m.map("vmbr2"), None);
        let m: IdMap = "1".parse().unwrap();
        assert_eq!(m.map("vmbr2").as_deref(), Some("vmbr2"));
        assert!("a,b".parse::<IdMap>().is_err());
    }
}
