//! The link an emulator builds: `RTT,RATE[,...]` parsed, checked and printed back.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use super::MTU;

/// A link: `RTT,RATE[,loss=P][,flowcap=RATE][,queue=BYTES]`, e.g. `20ms,1gbit`,
/// `50ms,1gbit,loss=0.1%`, `20ms,10gbit,flowcap=1gbit`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkSpec {
    pub rtt: Duration,
    /// Bottleneck rate, bits per second.
    pub rate_bps: u64,
    /// Probability of dropping a packet at random (0..1).
    pub loss: f64,
    /// Rate cap per flow (5-tuple), bits per second.
    pub flowcap_bps: Option<u64>,
    /// Bottleneck queue in bytes (default: one bandwidth-delay product, at least 64 packets).
    pub queue_bytes: u64,
    /// `buffers=host`: both namespaces keep the host's TCP buffer limits (a new namespace
    /// copies `tcp_rmem`/`tcp_wmem` from the host) instead of ones tuned for the path.
    pub host_buffers: bool,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("bps")
        .map(|x| format!("{x}bit"))
        .unwrap_or(t);
    let (num, mult) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.to_string(), *m)))
        .ok_or_else(|| format!("rate '{s}': give a unit, e.g. 200mbit, 1gbit, 10gbit"))?;
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("rate '{s}': not a number"))?;
    let bps = v * mult;
    if !(1e3..=1e12).contains(&bps) {
        return Err(format!("rate '{s}': out of range (1kbit..1000gbit)"));
    }
    Ok(bps as u64)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, unit_s) = [("us", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.to_string(), *m)))
        .ok_or_else(|| format!("RTT '{s}': give a unit, e.g. 20ms, 0.5ms, 1s"))?;
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("RTT '{s}': not a number"))?;
    let secs = v * unit_s;
    if !(0.0..=10.0).contains(&secs) {
        return Err(format!("RTT '{s}': out of range (0..10 s)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_loss(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("loss '{s}': e.g. 0.1% or 0.001"))?;
    if !(0.0..0.5).contains(&v) {
        return Err(format!("loss '{s}': must be below 50%"));
    }
    Ok(v)
}

impl LinkSpec {
    /// Bandwidth-delay product in bytes.
    pub fn bdp_bytes(&self) -> u64 {
        (self.rate_bps as f64 / 8.0 * self.rtt.as_secs_f64()) as u64
    }

    /// The TCP buffer maximum set in both namespaces (unless [`Self::host_buffers`]).
    pub fn tcp_buffer_max(&self) -> u64 {
        (4 * (self.bdp_bytes() + self.queue_bytes)).max(32 << 20)
    }
}

impl FromStr for LinkSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',').map(str::trim);
        let rtt = parse_duration(parts.next().unwrap_or(""))?;
        let rate_bps = parse_rate(
            parts
                .next()
                .ok_or_else(|| format!("link '{s}': expected RTT,RATE e.g. 20ms,1gbit"))?,
        )?;
        let mut spec = LinkSpec {
            rtt,
            rate_bps,
            loss: 0.0,
            flowcap_bps: None,
            queue_bytes: 0,
            host_buffers: false,
        };
        let mut queue = None;
        for kv in parts {
            match kv.split_once('=') {
                Some(("loss", v)) => spec.loss = parse_loss(v)?,
                Some(("flowcap", v)) => spec.flowcap_bps = Some(parse_rate(v)?),
                Some(("queue", v)) => {
                    queue = Some(super::super::parse_size(v).map_err(|e| format!("queue: {e}"))?)
                }
                Some(("buffers", "host")) => spec.host_buffers = true,
                Some(("buffers", "tuned")) => spec.host_buffers = false,
                _ => {
                    return Err(format!(
                        "link '{s}': unknown option '{kv}' (loss=P, flowcap=RATE, queue=BYTES, \
                         buffers=host|tuned)"
                    ));
                }
            }
        }
        spec.queue_bytes = queue.unwrap_or_else(|| spec.bdp_bytes().max(64 * MTU as u64));
        Ok(spec)
    }
}

fn rate_text(bps: u64) -> String {
    let (v, u) = if bps >= 1_000_000_000 {
        (bps as f64 / 1e9, "gbit")
    } else if bps >= 1_000_000 {
        (bps as f64 / 1e6, "mbit")
    } else {
        (bps as f64 / 1e3, "kbit")
    };
    format!("{}{u}", (v * 1000.0).round() / 1000.0)
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.rtt.as_secs_f64() * 1e3;
        write!(
            f,
            "{}ms,{}",
            (ms * 1000.0).round() / 1000.0,
            rate_text(self.rate_bps)
        )?;
        if self.loss > 0.0 {
            write!(f, ",loss={}%", (self.loss * 1e6).round() / 1e4)?;
        }
        if let Some(cap) = self.flowcap_bps {
            write!(f, ",flowcap={}", rate_text(cap))?;
        }
        if self.host_buffers {
            write!(f, ",buffers=host")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_parse_and_print() {
        let l: LinkSpec = "20ms,1gbit".parse().unwrap();
        assert_eq!(l.rtt, Duration::from_millis(20));
        assert_eq!(l.rate_bps, 1_000_000_000);
        assert_eq!(l.bdp_bytes(), 2_500_000);
        assert_eq!(l.queue_bytes, 2_500_000);
        assert_eq!(l.to_string(), "20ms,1gbit");
        let l: LinkSpec = "50ms,1gbit,loss=0.1%".parse().unwrap();
        assert!((l.loss - 0.001).abs() < 1e-12);
        assert_eq!(l.to_string(), "50ms,1gbit,loss=0.1%");
        let l: LinkSpec = "20ms,10gbit,flowcap=1gbit".parse().unwrap();
        assert_eq!(l.flowcap_bps, Some(1_000_000_000));
        assert_eq!(l.to_string(), "20ms,10gbit,flowcap=1gbit");
        let l: LinkSpec = "5ms,200mbit,queue=1M".parse().unwrap();
        assert_eq!(l.queue_bytes, 1 << 20);
        assert_eq!(l.to_string(), "5ms,200mbit");
        let l: LinkSpec = "100ms,500mbit,buffers=host".parse().unwrap();
        assert!(l.host_buffers);
        assert_eq!(l.bdp_bytes(), 6_250_000);
        assert_eq!(l.to_string(), "100ms,500mbit,buffers=host");
        for bad in [
            "",
            "20ms",
            "20,1gbit",
            "20ms,1g",
            "20ms,1gbit,loss=60%",
            "20ms,1gbit,x=1",
            "20ms,1gbit,buffers=big",
        ] {
            assert!(bad.parse::<LinkSpec>().is_err(), "{bad}");
        }
    }
}
