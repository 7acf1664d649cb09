//! `qemu-img` and the checks of images received from elsewhere: [`qemu_img`] runs it,
//! [`check_untrusted_image`] (PVE's "untrusted" `qemu-img info`: no backing file, no
//! external data file, the qcow2 header inspected before `qemu-img` opens anything) and
//! [`check_qcow2_complete`] (a qcow2 stream cut short). Shared by every storage plugin.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::process::Stdio;

use serde_json::Value;
use tokio::fs;
use tokio::process::Command;

use super::{ImageFormat, StorageError, StorageResult};

/// Runs `qemu-img` with `args`; a failure carries its exit status and stderr.
pub(super) async fn qemu_img(
    op: &'static str,
    args: &[&OsStr],
    path: &Path,
) -> StorageResult<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            StorageError::io(format!("running qemu-img {op} for '{}'", path.display()), e)
        })?;
    if !out.status.success() {
        return Err(StorageError::QemuImg {
            op,
            path: path.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// `qemu-img info --output=json -f <fmt>`: the format is always forced, so a raw disk whose
/// guest wrote a qcow2 header is never probed as qcow2.
pub(super) async fn qemu_img_info(
    path: &Path,
    fmt: ImageFormat,
    force_share: bool,
) -> StorageResult<Value> {
    let mut args = vec![
        OsStr::new("info"),
        OsStr::new("--output=json"),
        OsStr::new("-f"),
        OsStr::new(fmt.as_str()),
    ];
    if force_share {
        args.push(OsStr::new("-U"));
    }
    args.push(path.as_os_str());
    let out = qemu_img("info", &args, path).await?;
    serde_json::from_slice(&out).map_err(|e| StorageError::QemuImgOutput {
        path: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}

pub(super) fn info_str<'v>(info: &'v Value, key: &str, path: &Path) -> StorageResult<&'v str> {
    info.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| StorageError::QemuImgOutput {
            path: path.to_path_buf(),
            reason: format!("no '{key}' string"),
        })
}

pub(super) fn info_virtual_size(info: &Value, path: &Path) -> StorageResult<u64> {
    info.get("virtual-size")
        .and_then(Value::as_u64)
        .ok_or_else(|| StorageError::QemuImgOutput {
            path: path.to_path_buf(),
            reason: "no 'virtual-size' number".to_string(),
        })
}

/// Checks an image received from elsewhere (PVE's "untrusted" `qemu-img info`): it must
/// open as `fmt`, and must not refer to other files — no backing file, no external data
/// file, no child nodes besides its own file. For qcow2 the header is inspected first, so
/// such references are refused before `qemu-img` would open them.
pub async fn check_untrusted_image(path: &Path, fmt: ImageFormat) -> StorageResult<()> {
    if fmt == ImageFormat::Qcow2 {
        let header = read_head(path, QCOW2_HEADER_V3_LEN).await?;
        check_qcow2_header(&header, path)?;
    }
    let info = qemu_img_info(path, fmt, false).await?;
    check_info(&info, fmt, path)
}

pub(super) async fn read_head(path: &Path, len: usize) -> StorageResult<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let file = fs::File::open(path)
        .await
        .map_err(|e| StorageError::io(format!("opening image '{}'", path.display()), e))?;
    let mut head = Vec::with_capacity(len);
    file.take(len as u64)
        .read_to_end(&mut head)
        .await
        .map_err(|e| StorageError::io(format!("reading image '{}'", path.display()), e))?;
    Ok(head)
}

pub(super) const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
pub(super) const QCOW2_HEADER_V2_LEN: usize = 72;
pub(super) const QCOW2_HEADER_V3_LEN: usize = 104;
/// Incompatible feature bit 2: the guest data lives in an external data file.
pub(super) const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;

pub(super) fn check_qcow2_header(h: &[u8], path: &Path) -> StorageResult<()> {
    let wrong = |reason: &str| StorageError::WrongFormat {
        path: path.to_path_buf(),
        expected: "qcow2".to_string(),
        reason: reason.to_string(),
    };
    let be_u32 = |at: usize| {
        h.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    let be_u64 = |at: usize| {
        h.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    };
    if h.len() < QCOW2_HEADER_V2_LEN {
        return Err(wrong("file too short for a qcow2 header"));
    }
    if &h[..4] != QCOW2_MAGIC {
        return Err(wrong("no qcow2 magic"));
    }
    let version = be_u32(4).unwrap_or(0);
    if version != 2 && version != 3 {
        return Err(wrong(&format!("unsupported qcow2 version {version}")));
    }
    if be_u64(8).unwrap_or(0) != 0 {
        return Err(StorageError::BackingFile {
            path: path.to_path_buf(),
        });
    }
    if version == 3 {
        let incompat = be_u64(72).ok_or_else(|| wrong("truncated qcow2 v3 header"))?;
        if incompat & QCOW2_INCOMPAT_DATA_FILE != 0 {
            return Err(StorageError::DataFile {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Checks that a received qcow2 image arrived whole and is consistent. A `qcow2+size`
/// stream carries no payload length, so a stream cut short only shows in the image: data
/// or metadata clusters that start past the end of the file (`file_len`), or corruption
/// found by `qemu-img check`. Leaked clusters alone only waste space and are accepted.
pub async fn check_qcow2_complete(path: &Path, file_len: u64) -> StorageResult<()> {
    let report = qemu_img_check(path).await?;
    match qcow2_required_len(path, report.image_end).await {
        Ok(needed) if needed > file_len => {
            return Err(StorageError::IncompleteImage {
                path: path.to_path_buf(),
                got: file_len,
                needed,
            });
        }
        // An image qemu-img cannot check cannot be mapped either: report the check.
        Err(e) if report.passed() => return Err(e),
        _ => {}
    }
    report.into_result(path)
}

/// What `qemu-img check --output=json` said.
struct CheckReport {
    /// Exit code: 0 clean, 1 check failed, 2 corrupt, 3 leaks only.
    code: Option<i32>,
    status: String,
    /// End of the highest allocated cluster.
    image_end: Option<u64>,
    corruptions: u64,
    check_errors: u64,
    stderr: String,
}

impl CheckReport {
    fn passed(&self) -> bool {
        matches!(self.code, Some(0) | Some(3))
    }

    fn into_result(self, path: &Path) -> StorageResult<()> {
        if self.passed() {
            if self.code == Some(3) {
                tracing::warn!("image '{}' has leaked clusters (harmless)", path.display());
            }
            return Ok(());
        }
        let summary = if self.corruptions > 0 {
            format!("{} corruptions", self.corruptions)
        } else if self.check_errors > 0 {
            format!("{} check errors", self.check_errors)
        } else {
            self.status
        };
        let mut lines = self.stderr.lines().map(str::trim);
        let line = lines
            .clone()
            .find(|l| l.starts_with("ERROR"))
            .or_else(|| lines.find(|l| !l.is_empty()))
            .unwrap_or("no error output")
            .to_string();
        Err(StorageError::ImageCheck {
            path: path.to_path_buf(),
            line,
            summary,
        })
    }
}

async fn qemu_img_check(path: &Path) -> StorageResult<CheckReport> {
    let out = Command::new("qemu-img")
        .args([OsStr::new("check"), OsStr::new("--output=json")])
        .args([OsStr::new("-f"), OsStr::new("qcow2"), path.as_os_str()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            StorageError::io(
                format!("running qemu-img check for '{}'", path.display()),
                e,
            )
        })?;
    let json: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    let num = |key: &str| {
        json.as_ref()
            .and_then(|j| j.get(key))
            .and_then(Value::as_u64)
    };
    Ok(CheckReport {
        code: out.status.code(),
        status: out.status.to_string(),
        image_end: num("image-end-offset"),
        corruptions: num("corruptions").unwrap_or(0),
        check_errors: num("check-errors").unwrap_or(0),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The least file length a complete qcow2 image needs: every allocated cluster must start
/// inside the file (only the last one may be partial, as qemu writes tables short), and
/// the guest data the active layer maps must be there in full.
pub(super) async fn qcow2_required_len(path: &Path, image_end: Option<u64>) -> StorageResult<u64> {
    let header = read_head(path, QCOW2_HEADER_V2_LEN).await?;
    let cluster_bits = header
        .get(20..24)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .filter(|bits| (9..=21).contains(bits))
        .ok_or_else(|| StorageError::WrongFormat {
            path: path.to_path_buf(),
            expected: "qcow2".to_string(),
            reason: "invalid cluster size".to_string(),
        })?;
    let last_cluster_start = image_end
        .map(|end| end.saturating_sub(1u64 << cluster_bits) + 1)
        .unwrap_or(0);
    Ok(last_cluster_start.max(qcow2_mapped_end(path).await?))
}

/// The end of the last guest data extent in the file, from `qemu-img map`, read line by
/// line (one extent per line) so a fragmented image does not need its whole map in memory.
pub(super) async fn qcow2_mapped_end(path: &Path) -> StorageResult<u64> {
    use tokio::io::AsyncBufReadExt;
    let ctx = || format!("running qemu-img map for '{}'", path.display());
    let mut child = Command::new("qemu-img")
        .args([OsStr::new("map"), OsStr::new("--output=json")])
        .args([OsStr::new("-f"), OsStr::new("qcow2"), path.as_os_str()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| StorageError::io(ctx(), e))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| StorageError::io(ctx(), io::Error::other("no stdout pipe")))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut end = 0u64;
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| StorageError::io(ctx(), e))?
    {
        let entry = line.trim().trim_start_matches('[');
        let entry = entry.trim_end_matches([',', ']']);
        let Ok(extent) = serde_json::from_str::<Value>(entry) else {
            continue;
        };
        let field = |k: &str| extent.get(k).and_then(Value::as_u64);
        if let (Some(offset), Some(length)) = (field("offset"), field("length")) {
            end = end.max(offset.saturating_add(length));
        }
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| StorageError::io(ctx(), e))?;
    if !out.status.success() {
        return Err(StorageError::QemuImg {
            op: "map",
            path: path.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(end)
}

/// The checks on `qemu-img info` output.
pub(super) fn check_info(info: &Value, fmt: ImageFormat, path: &Path) -> StorageResult<()> {
    let found = info_str(info, "format", path)?;
    if found != fmt.as_str() {
        return Err(StorageError::WrongFormat {
            path: path.to_path_buf(),
            expected: fmt.as_str().to_string(),
            reason: format!("qemu-img reports format '{found}'"),
        });
    }
    if [
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
    ]
    .iter()
    .any(|k| info.get(*k).is_some())
    {
        return Err(StorageError::BackingFile {
            path: path.to_path_buf(),
        });
    }
    let specific = info.pointer("/format-specific/data");
    if specific.and_then(|d| d.get("data-file")).is_some() {
        return Err(StorageError::DataFile {
            path: path.to_path_buf(),
        });
    }
    if let Some(children) = info.get("children").and_then(Value::as_array) {
        for child in children {
            let name = child.get("name").and_then(Value::as_str).unwrap_or("?");
            if name != "file" {
                return Err(StorageError::WrongFormat {
                    path: path.to_path_buf(),
                    expected: fmt.as_str().to_string(),
                    reason: format!("refers to another image (child node '{name}')"),
                });
            }
        }
    }
    info_virtual_size(info, path).map(|_| ())
}
