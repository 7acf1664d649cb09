//! The scripted backend's [`Storage`] and [`Hypervisor`] impls: each call goes to the
//! script's override when there is one (its reply checked and converted), else to the fake.

use std::path::PathBuf;

use futures_util::future::BoxFuture;
use mlua::Value as LuaValue;
use tokio::io::AsyncRead;

use super::fake::read_stream;
use super::lua_api::{expect_string, expect_u64, started_from_lua};
use super::{IMPORT_CAPTURE_BYTES, ScriptedBackend, clean_error};
use crate::guest::hypervisor::{HvResult, Hypervisor, IncomingStart, IncomingStarted};
use crate::storage::{ImportRequest, Storage, StorageDef, StorageError, StorageResult};

impl Storage for ScriptedBackend {
    fn storage_ids(&self) -> Vec<String> {
        self.fake.storages.keys().cloned().collect()
    }

    fn def(&self, id: &str) -> Option<&StorageDef> {
        self.fake.storages.get(id)
    }

    fn alloc<'a>(
        &'a self,
        storage: &'a str,
        vmid: u32,
        format: &'a str,
        name: Option<&'a str>,
        size_kib: u64,
    ) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.alloc") else {
                return self.fake.alloc(storage, vmid, format, name, size_kib);
            };
            let args = (
                storage.to_string(),
                vmid,
                format.to_string(),
                name.map(str::to_string),
                size_kib,
            );
            let v = self.storage_call(f, args).await?;
            expect_string("storage.alloc", v).map_err(StorageError::Backend)
        })
    }

    fn free<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.free") else {
                return self.fake.free(volid);
            };
            self.storage_call(f, volid.to_string()).await.map(drop)
        })
    }

    fn path(&self, volid: &str) -> StorageResult<PathBuf> {
        let Some(f) = self.enter("storage.path") else {
            return self.fake.resolve(volid).map(|(_, p)| p);
        };
        self.call_sync(&f, volid)
            .and_then(|v| expect_string("storage.path", v))
            .map(PathBuf::from)
            .map_err(StorageError::Backend)
    }

    fn volume_format<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.volume_format") else {
                return self.fake.volume(volid).map(|v| v.format);
            };
            let v = self.storage_call(f, volid.to_string()).await?;
            expect_string("storage.volume_format", v).map_err(StorageError::Backend)
        })
    }

    fn volume_size<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<u64>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.volume_size") else {
                return self.fake.volume(volid).map(|v| v.size);
            };
            let v = self.storage_call(f, volid.to_string()).await?;
            expect_u64("storage.volume_size", v).map_err(StorageError::Backend)
        })
    }

    fn import_formats(&self, storage: &str, format: &str) -> StorageResult<Vec<String>> {
        let Some(f) = self.enter("storage.import_formats") else {
            return self.fake.import_formats(storage, format);
        };
        let v = self
            .call_sync(&f, (storage, format))
            .map_err(StorageError::Backend)?;
        match v {
            LuaValue::String(s) => Ok(vec![s.to_string_lossy()]),
            LuaValue::Table(t) => t
                .sequence_values::<String>()
                .collect::<mlua::Result<Vec<_>>>()
                .map_err(|e| {
                    StorageError::Backend(format!(
                        "storage.import_formats must return a list of strings: {}",
                        clean_error(&e)
                    ))
                }),
            other => Err(StorageError::Backend(format!(
                "storage.import_formats must return a list of strings, got {}",
                other.type_name()
            ))),
        }
    }

    fn import<'a>(
        &'a self,
        req: ImportRequest,
        mut reader: Box<dyn AsyncRead + Send + Unpin>,
    ) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(async move {
            let f = self.enter("storage.import");
            let capture = if f.is_some() { IMPORT_CAPTURE_BYTES } else { 0 };
            let (data, kept) = read_stream(&mut *reader, capture).await?;
            drop(reader);
            let Some(f) = f else {
                return self.fake.import(&req, &data);
            };
            let truncated = (kept.len() as u64) < data.received;
            let args = self
                .import_request(&req, &data, truncated)
                .and_then(|t| Ok((t, self.lua.create_string(&kept)?)))
                .map_err(|e| StorageError::Backend(clean_error(&e)))?;
            drop(kept);
            let v = self.storage_call(f, args).await?;
            expect_string("storage.import", v).map_err(StorageError::Backend)
        })
    }

    fn check_untrusted<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.check_untrusted") else {
                return self.fake.volume(volid).map(drop);
            };
            self.storage_call(f, volid.to_string()).await.map(drop)
        })
    }

    fn bwlimit(
        &self,
        operation: &str,
        storages: &[Option<String>],
        override_kib: Option<u64>,
    ) -> Option<u64> {
        let default = || {
            crate::storage::bwlimit_from_defs(|id| self.def(id), operation, storages, override_kib)
        };
        let Some(f) = self.enter("storage.bwlimit") else {
            return default();
        };
        let listed: Vec<String> = storages.iter().flatten().cloned().collect();
        match self
            .call_sync(&f, (operation, listed, override_kib))
            .and_then(|v| match v {
                LuaValue::Nil => Ok(None),
                v => expect_u64("storage.bwlimit", v).map(Some),
            }) {
            Ok(limit) => limit,
            Err(e) => {
                tracing::warn!("scripted storage.bwlimit failed, using the storage limits: {e}");
                default()
            }
        }
    }
}

impl Hypervisor for ScriptedBackend {
    fn start_incoming(&self, req: IncomingStart) -> BoxFuture<'_, HvResult<IncomingStarted>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.start_incoming") else {
                return self.fake.start_incoming(req.vmid, &req.nbd);
            };
            let args = self
                .start_request(&req)
                .map_err(|e| anyhow::anyhow!("{}", clean_error(&e)))?;
            let v = self.hv_call(f, args).await?;
            started_from_lua(v).map_err(|e| anyhow::anyhow!("{e}"))
        })
    }

    fn resume(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.resume") else {
                return self.fake.require_running(vmid);
            };
            self.hv_call(f, vmid).await.map(drop)
        })
    }

    fn stop(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.stop") else {
                self.fake.stop(vmid);
                return Ok(());
            };
            self.hv_call(f, vmid).await.map(drop)
        })
    }

    fn nbd_stop(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.nbd_stop") else {
                return self.fake.require_running(vmid);
            };
            self.hv_call(f, vmid).await.map(drop)
        })
    }

    fn is_running(&self, vmid: u32) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.is_running") else {
                return self.fake.is_running(vmid);
            };
            match self.call_async(f, vmid).await {
                Ok(v) => !matches!(v, LuaValue::Nil | LuaValue::Boolean(false)),
                Err(e) => {
                    tracing::warn!(
                        "scripted hypervisor.is_running failed (taken as not running): {e}"
                    );
                    false
                }
            }
        })
    }

    fn fstrim(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.fstrim") else {
                return self.fake.require_running(vmid);
            };
            self.hv_call(f, vmid).await.map(drop)
        })
    }

    fn now(&self) -> HvResult<i64> {
        let Some(f) = self.enter("hypervisor.now") else {
            return Ok(crate::guest::hypervisor::system_clock());
        };
        match self.call_sync(&f, ()).map_err(|e| anyhow::anyhow!("{e}"))? {
            LuaValue::Integer(n) => Ok(n),
            other => anyhow::bail!(
                "hypervisor.now must return an integer (seconds since 1970), got {}",
                other.type_name()
            ),
        }
    }
}
