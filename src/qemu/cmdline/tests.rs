//! Unit tests of the command line: defaults, a typical PVE config, buses, refusals.

use super::*;

fn base(run: &Path) -> VmSpec {
    let mut s = VmSpec::new(100, run);
    s.accel = Accel::Tcg;
    s
}

/// The value following each occurrence of `flag`.
fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

fn value<'a>(argv: &'a [String], flag: &str) -> &'a str {
    let v = values(argv, flag);
    assert_eq!(v.len(), 1, "{flag} once in {argv:?}");
    v[0]
}

fn device<'a>(argv: &'a [String], id: &str) -> &'a str {
    let want = format!(",id={id}");
    values(argv, "-device")
        .into_iter()
        .find(|d| d.contains(&format!("{want},")) || d.ends_with(&want))
        .unwrap_or_else(|| panic!("no device {id} in {argv:?}"))
}

#[test]
fn defaults_follow_pve() {
    let argv = build_command(&base(Path::new("/r"))).unwrap();
    assert_eq!(value(&argv, "-name"), "vm100,debug-threads=on");
    assert_eq!(value(&argv, "-machine"), "type=pc");
    assert_eq!(value(&argv, "-accel"), "tcg");
    assert_eq!(value(&argv, "-cpu"), "qemu64");
    assert_eq!(value(&argv, "-m"), "512");
    assert_eq!(value(&argv, "-smp"), "1,sockets=1,cores=1,maxcpus=1");
    assert_eq!(value(&argv, "-pidfile"), "/r/100.pid");
    assert_eq!(
        value(&argv, "-chardev"),
        "socket,id=qmp,path=/r/100.qmp,server=on,wait=off"
    );
    assert_eq!(value(&argv, "-mon"), "chardev=qmp,mode=control");
    for f in ["-nodefaults", "-no-user-config"] {
        assert!(argv.iter().any(|a| a == f), "{f}");
    }
    assert_eq!(value(&argv, "-display"), "none");
    assert_eq!(device(&argv, "vga"), "VGA,id=vga,bus=pci.0,addr=0x2");
    assert_eq!(
        device(&argv, "balloon0"),
        "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3,free-page-reporting=on"
    );
    assert!(!argv.iter().any(|a| a == "-incoming"));
}

#[test]
fn typical_pve_config() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vm-100-disk-0.qcow2");
    std::fs::write(&disk, b"").unwrap();
    let mut spec = base(Path::new("/run/qemu-server"))
        .option("name", "web1")
        .option("memory", "2048")
        .option("sockets", "2")
        .option("cores", "4")
        .option("cpu", "x86-64-v2-AES,flags=+pdpe1gb;-pcid")
        .option("machine", "pc-q35-9.2+pve0")
        .option("scsihw", "virtio-scsi-single")
        .option(
            "scsi0",
            "local:100/vm-100-disk-0.qcow2,discard=on,iothread=1,size=32G,ssd=1",
        )
        .option("ide2", "none,media=cdrom")
        .option("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1")
        .option("agent", "enabled=1,fstrim_cloned_disks=1")
        .option("serial0", "socket")
        .option("boot", "order=scsi0;ide2;net0")
        .option("vga", "none")
        .option("balloon", "0")
        .option("smbios1", "uuid=6f0e8f4e-0000-4000-8000-000000000001")
        .option("vmgenid", "3ab2f3e5-0000-4000-8000-000000000002")
        .option("meta", "creation-qemu=9.2.0,ctime=1700000000")
        .option("ostype", "l26")
        .disk("scsi0", &disk, DiskFormat::Qcow2);
    spec.incoming = Some("unix:/run/qemu-server/100.migrate".into());
    let argv = build_command(&spec).unwrap();

    assert_eq!(value(&argv, "-name"), "web1,debug-threads=on");
    assert_eq!(value(&argv, "-machine"), "type=pc-q35-9.2");
    assert_eq!(value(&argv, "-m"), "2048");
    assert_eq!(value(&argv, "-smp"), "8,sockets=2,cores=4,maxcpus=8");
    assert_eq!(
        value(&argv, "-cpu"),
        "qemu64,+aes,+popcnt,+pni,+sse4.1,+sse4.2,+ssse3,+pdpe1gb,-pcid"
    );
    assert_eq!(
        value(&argv, "-smbios"),
        "type=1,uuid=6f0e8f4e-0000-4000-8000-000000000001"
    );
    // No VGA, no balloon: the first PCI slot goes to the agent's serial bus.
    assert!(!argv.iter().any(|a| a.contains("id=vga")));
    assert_eq!(
        device(&argv, "qga0"),
        "virtio-serial,id=qga0,bus=pcie.0,addr=0x2"
    );
    assert!(
        values(&argv, "-device")
            .contains(&"virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
    );
    let chardevs = values(&argv, "-chardev");
    assert!(chardevs.contains(&"socket,id=qga0,path=/run/qemu-server/100.qga,server=on,wait=off"));
    assert!(
        chardevs
            .contains(&"socket,id=serial0,path=/run/qemu-server/100.serial0,server=on,wait=off")
    );
    assert_eq!(
        device(&argv, "virtioscsi0"),
        "virtio-scsi-pci,id=virtioscsi0,bus=pcie.0,addr=0x3,iothread=iothread-virtioscsi0"
    );
    assert!(values(&argv, "-object").contains(&"iothread,id=iothread-virtioscsi0"));
    let blockdevs = values(&argv, "-blockdev");
    assert_eq!(blockdevs.len(), 2, "{blockdevs:?}");
    assert!(blockdevs[0].starts_with(&format!(
        "driver=file,node-name=file-scsi0,filename={},cache.direct=on,",
        disk.display()
    )));
    assert!(blockdevs[0].ends_with(",discard=unmap"));
    assert_eq!(
        blockdevs[1],
        "driver=qcow2,node-name=drive-scsi0,file=file-scsi0,cache.direct=on,cache.no-flush=off,read-only=off,detect-zeroes=unmap,discard=unmap"
    );
    assert_eq!(
        device(&argv, "scsi0"),
        "scsi-hd,bus=virtioscsi0.0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0,write-cache=on,rotation_rate=1,bootindex=100"
    );
    // q35: ide2 → AHCI port ide.1, unit 0; empty CD-ROM has no drive.
    assert_eq!(
        device(&argv, "ide2"),
        "ide-cd,bus=ide.1,unit=0,id=ide2,bootindex=101"
    );
    assert_eq!(value(&argv, "-netdev"), "hubport,id=net0,hubid=0");
    assert_eq!(
        device(&argv, "net0"),
        "virtio-net-pci,mac=BC:24:11:00:00:01,netdev=net0,id=net0,bus=pcie.0,addr=0x4,bootindex=102"
    );
    assert!(
        values(&argv, "-device").contains(&"vmgenid,guid=3ab2f3e5-0000-4000-8000-000000000002")
    );
    let n = argv.len();
    assert_eq!(
        &argv[n - 3..],
        ["-incoming", "unix:/run/qemu-server/100.migrate", "-S"]
    );
    // Deterministic: the same spec gives the same argv.
    assert_eq!(argv, build_command(&spec).unwrap());
}

#[test]
fn controllers_and_buses() {
    let d = Path::new("/nonexistent/x.raw");
    let spec = base(Path::new("/r"))
        .option("scsi0", "local:a")
        .option("scsi8", "local:b,cache=unsafe")
        .option("sata1", "local:c,cache=writethrough")
        .option("ide1", "local:d,cache=directsync")
        .option("ide2", "local:iso/x.iso,media=cdrom")
        .option("virtio3", "local:e,iothread=1,aio=native,cache=none")
        .option("net1", "model=e1000,macaddr=02:00:00:00:00:02")
        .option("net0", "e1000=02:00:00:00:00:01")
        .option("boot", "cdn")
        .option("bootdisk", "virtio3")
        .disk("scsi0", d, DiskFormat::Raw)
        .disk("scsi8", d, DiskFormat::Raw)
        .disk("sata1", d, DiskFormat::Raw)
        .disk("ide1", d, DiskFormat::Raw)
        .disk("ide2", d, DiskFormat::Raw)
        .disk("virtio3", d, DiskFormat::Raw);
    let argv = build_command(&spec).unwrap();
    // lsi (PVE default): 7 devices per controller → scsi8 on the second one.
    assert_eq!(
        device(&argv, "scsihw0"),
        "lsi53c895a,id=scsihw0,bus=pci.0,addr=0x4"
    );
    assert_eq!(
        device(&argv, "scsihw1"),
        "lsi53c895a,id=scsihw1,bus=pci.0,addr=0x5"
    );
    assert!(
        device(&argv, "scsi8").starts_with("scsi-hd,bus=scsihw1.0,scsi-id=1,drive=drive-scsi8")
    );
    assert_eq!(
        device(&argv, "ahci0"),
        "ahci,id=ahci0,multifunction=on,bus=pci.0,addr=0x6"
    );
    assert_eq!(
        device(&argv, "sata1"),
        "ide-hd,bus=ahci0.1,drive=drive-sata1,id=sata1,write-cache=off"
    );
    // i440fx: ide1 → ide.0 unit 1
    assert!(device(&argv, "ide1").starts_with("ide-hd,bus=ide.0,unit=1,drive=drive-ide1"));
    assert_eq!(
        device(&argv, "ide2"),
        "ide-cd,bus=ide.1,unit=0,drive=drive-ide2,id=ide2,bootindex=101"
    );
    assert_eq!(
        device(&argv, "virtio3"),
        "virtio-blk-pci,drive=drive-virtio3,id=virtio3,bus=pci.0,addr=0x7,iothread=iothread-virtio3,write-cache=on,bootindex=100"
    );
    // NICs in index order, legacy 'n' boots them after the CD-ROM.
    assert!(device(&argv, "net0").starts_with(
        "e1000,mac=02:00:00:00:00:01,netdev=net0,id=net0,bus=pci.0,addr=0x8,bootindex=102"
    ));
    assert!(device(&argv, "net1").starts_with(
        "e1000,mac=02:00:00:00:00:02,netdev=net1,id=net1,bus=pci.0,addr=0x9,bootindex=103"
    ));
    let bd = values(&argv, "-blockdev");
    assert!(
        bd.iter()
            .any(|b| b.starts_with("driver=file,node-name=file-scsi8,")
                && b.contains("cache.no-flush=on"))
    );
    assert!(
        bd.iter().any(
            |b| b.starts_with("driver=file,node-name=file-ide2,") && b.contains("read-only=on")
        )
    );
    assert!(
        bd.iter()
            .any(|b| b.starts_with("driver=file,node-name=file-virtio3,")
                && b.contains("aio=native")
                && b.contains("cache.direct=on"))
    );
}

#[test]
fn kvm_cpu_and_machine_mapping() {
    let mut spec = base(Path::new("/r")).option("cpu", "host,hidden=1");
    assert_eq!(value(&build_command(&spec).unwrap(), "-cpu"), "max,kvm=off");
    spec.accel = Accel::Kvm;
    let argv = build_command(&spec).unwrap();
    assert_eq!(value(&argv, "-cpu"), "host,kvm=off");
    assert_eq!(value(&argv, "-accel"), "kvm");
    spec.options.remove("cpu");
    assert_eq!(value(&build_command(&spec).unwrap(), "-cpu"), "kvm64");
    // `kvm: 0` forces TCG.
    spec.options.insert("kvm".into(), "0".into());
    assert_eq!(value(&build_command(&spec).unwrap(), "-accel"), "tcg");

    spec.force_machine = Some("pc-i440fx-9.2+pve0".into());
    spec.force_cpu = Some("host,+kvm_pv_eoi".into());
    let argv = build_command(&spec).unwrap();
    assert_eq!(value(&argv, "-machine"), "type=pc-i440fx-9.2");
    assert_eq!(value(&argv, "-cpu"), "max,+kvm_pv_eoi");
    let spec = base(Path::new("/r")).option("machine", "type=q35");
    assert_eq!(
        value(&build_command(&spec).unwrap(), "-machine"),
        "type=q35"
    );
}

#[test]
fn memory_forms_and_escaping() {
    let spec = base(Path::new("/r,x"))
        .option("memory", "current=1024")
        .option("name", "a,b");
    let argv = build_command(&spec).unwrap();
    assert_eq!(value(&argv, "-m"), "1024");
    assert_eq!(value(&argv, "-name"), "a,,b,debug-threads=on");
    assert_eq!(
        value(&argv, "-chardev"),
        "socket,id=qmp,path=/r,,x/100.qmp,server=on,wait=off"
    );
}

#[test]
fn refusals_are_actionable() {
    let run = Path::new("/r");
    let err = |spec: VmSpec| build_command(&spec).unwrap_err().to_string();
    let e = err(base(run).option("scsi0", "local:vm-100-disk-0"));
    assert!(
        e.contains("drive 'scsi0'") && e.contains("no local path"),
        "{e}"
    );
    let e = err(base(run).option("hostpci0", "0000:01:00.0"));
    assert!(
        e.contains("'hostpci0'") && e.contains("not supported"),
        "{e}"
    );
    let e = err(base(run).option("net0", "virtio,bridge=vmbr0"));
    assert!(e.contains("no MAC address"), "{e}");
    let e = err(base(run).option("net0", "virtio=01:00:00:00:00:01"));
    assert!(e.contains("not a unicast MAC"), "{e}");
    let e = err(base(run).option("memory", "lots"));
    assert!(e.contains("'memory'"), "{e}");
    let e = err(base(run).option("machine", "microvm"));
    assert!(e.contains("only pc/i440fx and q35"), "{e}");
    let e = err(base(run).option("cpu", "kvm64,flags=+a b"));
    assert!(e.contains("bad flag"), "{e}");
    let e = err(base(run).option("bios", "ovmf"));
    assert!(e.contains("only seabios"), "{e}");
    let e =
        err(base(run)
            .option("scsi0", "local:x,cache=bogus")
            .disk("scsi0", "/x", DiskFormat::Raw));
    assert!(e.contains("cache must be"), "{e}");
    let long = PathBuf::from(format!("/tmp/{}", "x".repeat(100)));
    let e = err(base(&long));
    assert!(e.contains("shorter than 108 bytes"), "{e}");
    assert!("vmdk".parse::<DiskFormat>().is_err());
    // Drive-like keys that are not drives are ignored, not misparsed.
    assert!(build_command(&base(run).option("unused0", "local:x")).is_ok());
    assert!(build_command(&base(run).option("scsi031", "x")).is_ok());
}

/// Issue 9: the config parser read `serial="a,file=..."` as one quoted value while the
/// command line split it at every comma ("duplicate property 'file'"). One parser now:
/// the quoted value is the serial, and its check names the drive.
#[test]
fn quoted_values_read_as_the_config_parser_reads_them() {
    let spec = base(Path::new("/r"))
        .option("scsi0", r#"local:x,serial="a,file=/etc/shadow""#)
        .disk("scsi0", "/x", DiskFormat::Raw);
    assert_eq!(
        build_command(&spec).unwrap_err().to_string(),
        "config option 'scsi0': invalid value 'a,file=/etc/shadow': serial: up to 20 of \
         [A-Za-z0-9_- ]"
    );
    let spec = base(Path::new("/r"))
        .option("scsi0", r#"local:x,serial="ab 12""#)
        .disk("scsi0", "/x", DiskFormat::Raw);
    let argv = build_command(&spec).unwrap();
    assert!(device(&argv, "scsi0").contains(",serial=ab 12"), "{argv:?}");
}

/// Issue 9: `scsi0: volume=<path>` is a drive whose volume is `<path>` (PVE's alias), not
/// a drive without a volume ("no volume").
#[test]
fn volume_alias_is_the_drive_file() {
    let spec = base(Path::new("/r"))
        .option(
            "scsi0",
            "volume=local:100/vm-100-disk-0.raw,cache=writeback",
        )
        .disk("scsi0", "/images/x.raw", DiskFormat::Raw);
    let argv = build_command(&spec).unwrap();
    assert!(
        values(&argv, "-blockdev")
            .iter()
            .any(|b| b.contains("filename=/images/x.raw")),
        "{argv:?}"
    );
    let e = build_command(&base(Path::new("/r")).option("scsi0", "volume=local:y"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("refers to 'local:y'"), "{e}");
}

/// Issue 9: what `start` refuses, `config` refuses at once with the same message.
#[test]
fn check_options_refuses_what_build_command_refuses() {
    let run = Path::new("/r");
    for (key, value) in [
        ("args", "-device foo"),
        ("hostpci0", "0000:01:00.0"),
        ("usb0", "host=1234:5678"),
        ("serial0", "/dev/ttyS0"),
        ("memory", "99999999"),
        ("net0", "virtio=01:00:00:00:00:01"),
        ("scsi0", "local:x,cache=bogus"),
        ("ide0", "cdrom,media=cdrom"),
        ("vga", "qxl"),
        ("cores", "0"),
    ] {
        let options = BTreeMap::from([(key.to_string(), value.to_string())]);
        let checked = check_options(&options).unwrap_err().to_string();
        let mut spec = base(run).option(key, value);
        spec.disks = BTreeMap::from([(key.to_string(), DiskSource::new("/x", DiskFormat::Raw))]);
        let started = build_command(&spec).unwrap_err().to_string();
        assert_eq!(checked, started, "{key}: {value}");
        assert!(checked.contains(&format!("'{key}'")), "{checked}");
    }
    assert_eq!(
        check_options(&BTreeMap::from([("memory".into(), "99999999".into())]))
            .unwrap_err()
            .to_string(),
        "config option 'memory': invalid value '99999999': want an integer 1..67108864"
    );
}

#[test]
fn check_options_accepts_a_typical_config_without_disks_or_host() {
    let options: BTreeMap<String, String> = [
        ("name", "web1"),
        ("memory", "2048"),
        ("cores", "4"),
        ("cpu", "host"),
        ("machine", "pc-q35-9.2+pve0"),
        ("scsihw", "virtio-scsi-single"),
        // PVE's default cache=none is assumed to work: no file to ask yet
        (
            "scsi0",
            "local:100/vm-100-disk-0.raw,aio=native,iothread=1,size=32G",
        ),
        ("virtio1", "volume=local:100/vm-100-disk-1.raw,size=1G"),
        ("cdrom", "none,media=cdrom"),
        ("unused0", "local:100/vm-100-disk-2.raw"),
        ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0"),
        ("serial0", "socket"),
        ("boot", "order=scsi0;net0"),
        ("lock", "migrate"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    check_options(&options).unwrap();
}

#[test]
fn agent_option_forms() {
    let mut o = BTreeMap::new();
    assert!(!agent_enabled(&o));
    o.insert("agent".to_string(), "1".to_string());
    assert!(agent_enabled(&o));
    o.insert(
        "agent".to_string(),
        "enabled=0,fstrim_cloned_disks=1".to_string(),
    );
    assert!(!agent_enabled(&o));
    o.insert("agent".to_string(), "enabled=1,type=isa".to_string());
    assert!(agent_enabled(&o));
}
