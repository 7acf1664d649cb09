//! `mtunnel vm create|start|stop|status|list|destroy|unlock`: the node's local VMs through
//! `mtunnel::client::vm`, refusing to touch a VM an open tunnel holds.

use super::{VmCommand, load_config};

/// `mtunnel vm ...`: the node's local VMs.
pub async fn run(cmd: VmCommand) -> anyhow::Result<()> {
    use mtunnel::client::vm::{CreateArgs, LocalVms};
    let node_args = match &cmd {
        VmCommand::Create { node, .. }
        | VmCommand::Start { node, .. }
        | VmCommand::Stop { node, .. }
        | VmCommand::Status { node, .. }
        | VmCommand::List { node }
        | VmCommand::Unlock { node, .. }
        | VmCommand::Destroy { node, .. } => node.clone(),
    };
    let vms = LocalVms::open(load_config(&node_args, None)?)?;
    match cmd {
        VmCommand::Create {
            vmid,
            name,
            memory,
            cores,
            disks,
            bridge,
            agent,
            ..
        } => {
            let args = CreateArgs {
                name,
                memory_mib: memory,
                cores,
                disks,
                bridge,
                agent,
            };
            let conf = vms.create(vmid, &args).await?;
            print!("{}", conf.write());
        }
        VmCommand::Start {
            vmid, qemu_args, ..
        } => {
            let pid = vms.start(vmid, &qemu_args).await?;
            println!("VM {vmid} started (pid {pid})");
        }
        VmCommand::Stop { vmid, .. } => {
            if vms.stop(vmid).await? {
                println!("VM {vmid} stopped");
            } else {
                println!("VM {vmid} was not running");
            }
        }
        VmCommand::Status { vmid, .. } => println!("status: {}", vms.status(vmid).await?),
        VmCommand::List { .. } => {
            println!("{:>10} {:<20} {:<10} LOCK", "VMID", "NAME", "STATUS");
            for (vmid, name, status, lock) in vms.list().await {
                println!("{vmid:>10} {name:<20} {status:<10} {lock}");
            }
        }
        VmCommand::Unlock { vmid, .. } => {
            refuse_if_tunnel_open(&vms.cfg, vmid)?;
            match vms.unlock(vmid).await? {
                Some(lock) => println!("VM {vmid}: removed lock '{lock}'"),
                None => println!("VM {vmid} was not locked"),
            }
            retire_journals(&vms.cfg, vmid, "an operator unlocked the VM");
        }
        VmCommand::Destroy { vmid, skiplock, .. } => {
            refuse_if_tunnel_open(&vms.cfg, vmid)?;
            for volid in vms.destroy(vmid, skiplock).await? {
                println!("freed {volid}");
            }
            println!("VM {vmid} destroyed");
            retire_journals(&vms.cfg, vmid, "an operator destroyed the VM");
        }
    }
    Ok(())
}

/// What tunnels of `vmid` left in their journals is over once an operator destroyed or
/// unlocked the VM: recovery must never act on it (on a later VM of the same VMID).
pub(super) fn retire_journals(cfg: &mtunnel::config::NodeConfig, vmid: u32, why: &str) {
    let journals = mtunnel::script::journal::retire(&cfg.journal_dir(), &cfg.run_dir, vmid, why);
    for line in journals {
        println!("{line}");
    }
}

/// An open tunnel of a running serve works on `vmid`: an operator's change would race it.
pub(super) fn refuse_if_tunnel_open(
    cfg: &mtunnel::config::NodeConfig,
    vmid: u32,
) -> anyhow::Result<()> {
    let (journals, _) = mtunnel::script::journal::load_all(&cfg.journal_dir(), &cfg.run_dir);
    if let Some(open) = journals
        .iter()
        .find(|c| c.vmid == vmid && !c.released && !c.abandoned && c.owner.is_alive())
    {
        anyhow::bail!(
            "VM {vmid} is in use by the open tunnel {} - stop that task first \
             (DELETE /nodes/{}/tasks/<upid>, or stop mtunnel serve)",
            open.upid,
            cfg.node
        );
    }
    Ok(())
}
