//! Attacks on the qemu boundary, run for real: root inside real microVMs
//! (`qemu-system-x86_64 -M microvm`, the image baked by `hearth-image` with
//! the real guest agent as `/init`, TCG where KVM does not work) tries to
//! reach the host's files, the other VM's disk and secrets, the secret on
//! any command line, and to exhaust the host (disk, memory, CPU, pids, the
//! console log, the control plane's memory). Beside each attack the
//! legitimate path is shown to still work.
//!
//! Boots cost seconds under TCG, so the attacks share few VMs: two in
//! [`root_in_a_vm_reaches_nothing_of_the_host_or_the_other_vm`], one in
//! [`a_console_flood_and_a_hostile_agent_stay_bounded`].
//!
//! **Requirements:** those of `tests/qemu.rs` (qemu, and the image it bakes
//! under `target/tmp/hearth-qemu-images`, shared with it); `HEARTH_TEST_ACCEL`
//! (`kvm`, `tcg`) skips the KVM probe.

mod support;

use hearth_core::ids::{TenantId, VmId};
use hearth_drivers::qemu::{Accel, QemuConfig, QemuDriver, limits};
use hearth_drivers::{Driver, DriverError, ExecRequest, ImageSpec, OutputChunk, Stream, VmSpec};
use hearth_image::{BakeOptions, BakedImage, FileDigest, Manifest};
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::mpsc;

/// How long a VM may take from `create` to a healthy agent.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(120);
/// The disk limit of the attack VMs, in MiB.
const DISK_MIB: u64 = 64;
/// The output limit of one command in the attack VMs.
const OUTPUT_LIMIT: u64 = 8 << 20;

/// The minimal test image of `tests/qemu.rs` (same folder, same reuse
/// rule: this agent binary and every module the baker puts in).
fn image() -> &'static BakedImage {
    static IMAGE: OnceLock<BakedImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        assert!(
            Command::new("qemu-system-x86_64")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "the qemu attack tests need qemu-system-x86_64 (apt-get install qemu-system-x86 qemu-utils)"
        );
        let agent = agent_binary();
        let images = target_tmp().join("hearth-qemu-images");
        let agent_sha = FileDigest::of_bytes(&fs::read(&agent).unwrap()).sha256;
        if let Ok(Some(latest)) = BakedImage::latest(&images, "test-minimal")
            && Manifest::read(&latest.dir).is_ok_and(|m| {
                m.inputs.get("agent").is_some_and(|a| a.sha256 == agent_sha)
                    && hearth_image::kernel::GUEST_MODULES
                        .iter()
                        .all(|wanted| m.modules.iter().any(|have| have == wanted))
            })
        {
            return latest;
        }
        let opts = BakeOptions::new(
            &images,
            "test-minimal",
            &agent,
            target_tmp().join("hearth-image-cache"),
        );
        hearth_image::bake(&opts, |m| eprintln!("bake: {m}")).expect("bake the test image")
    })
}

fn accel() -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| match std::env::var("HEARTH_TEST_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("tcg") => Accel::Tcg,
        _ => {
            let dir = tempfile::tempdir_in(target_tmp()).unwrap();
            let driver = QemuDriver::new(QemuConfig::new(dir.path().join("state")));
            let image = image();
            driver
                .resolve_accel(&ImageSpec {
                    root_dir: None,
                    kernel: Some(image.kernel.clone()),
                    initrd: Some(image.initrd.clone()),
                    disk: None,
                    ..Default::default()
                })
                .unwrap()
        }
    })
}

/// A driver on a state folder of its own (and cgroups of its own), cleaned
/// up on drop, panics included.
struct Env {
    driver: QemuDriver,
    base: PathBuf,
}

impl Env {
    fn new(configure: impl FnOnce(&mut QemuConfig)) -> Self {
        let accel = accel();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let base = target_tmp().join(format!("qa-{}", &tag[..10]));
        fs::create_dir_all(&base).unwrap();
        let mut config = QemuConfig::new(base.join("state"));
        config.accel = accel;
        configure(&mut config);
        Env {
            driver: QemuDriver::new(config),
            base,
        }
    }

    /// A VM with a disk of its own: a 1 MiB raw image disk holding
    /// `marker` at its start, under a disk limit of [`DISK_MIB`].
    fn spec(&self, marker: Option<&str>) -> VmSpec {
        let image = image();
        let disk = marker.map(|marker| {
            let disk = self.base.join(format!("disk-{marker}.raw"));
            let mut bytes = marker.as_bytes().to_vec();
            bytes.resize(1 << 20, 0);
            fs::write(&disk, bytes).unwrap();
            disk
        });
        VmSpec {
            id: VmId::new(),
            tenant: TenantId::new(),
            workspace: "web".into(),
            cpus: 1,
            memory_mib: 256,
            image: ImageSpec {
                root_dir: None,
                kernel: Some(image.kernel.clone()),
                initrd: Some(image.initrd.clone()),
                disk,
                ..Default::default()
            },
            network: hearth_drivers::NetworkSpec::none(),
            disk_mib: DISK_MIB,
        }
    }

    async fn boot(&self, spec: VmSpec) -> VmId {
        self.driver.create(&spec).await.expect("create");
        wait_healthy(&self.driver, spec.id).await;
        spec.id
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let driver = self.driver.clone();
        let base = self.base.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                for vm in driver.list().await.unwrap_or_default() {
                    if let Err(e) = driver.destroy(vm.id).await {
                        eprintln!("cleanup: destroy {}: {e}", vm.id);
                    }
                }
            });
            let _ = fs::remove_dir_all(base);
        });
        let _ = cleanup.join();
    }
}

async fn wait_healthy(driver: &QemuDriver, id: VmId) {
    let started = Instant::now();
    loop {
        match driver.health(id).await {
            Ok(_) => return,
            Err(e) if started.elapsed() > HEALTH_TIMEOUT => {
                let console =
                    fs::read_to_string(driver.vm_dir(id).join("console.log")).unwrap_or_default();
                panic!("VM {id} never became healthy: {e}\nconsole:\n{console}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[derive(Debug)]
struct Ran {
    exit_code: i32,
    stdout: String,
    stderr: String,
}

async fn run_with(driver: &QemuDriver, id: VmId, request: ExecRequest) -> Ran {
    let (tx, mut rx) = mpsc::unbounded_channel::<OutputChunk>();
    let result = driver
        .exec(id, &request, Some(tx))
        .await
        .unwrap_or_else(|e| panic!("exec {:?}: {e}", request.command));
    let (mut stdout, mut stderr) = (String::new(), String::new());
    while let Some(chunk) = rx.recv().await {
        match chunk.stream {
            Stream::Stdout => stdout.push_str(&chunk.data),
            Stream::Stderr => stderr.push_str(&chunk.data),
        }
    }
    Ran {
        exit_code: result.exit_code,
        stdout,
        stderr,
    }
}

async fn run(driver: &QemuDriver, id: VmId, command: &str) -> Ran {
    run_with(driver, id, ExecRequest::new(command)).await
}

/// stdout of a command that must succeed.
async fn sh(driver: &QemuDriver, id: VmId, command: &str) -> String {
    let ran = run(driver, id, command).await;
    assert_eq!(ran.exit_code, 0, "{command}: {ran:?}");
    ran.stdout
}

/// Host processes whose arguments hold `needle`.
fn processes_naming(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then_some((pid, cmdline))
        })
        .collect()
}

/// A cgroup file of the VM's, from whichever of its folders has it.
fn cgroup_file(driver: &QemuDriver, id: VmId, names: &[&str]) -> Option<String> {
    driver.cgroup_dirs(id).iter().find_map(|dir| {
        names
            .iter()
            .find_map(|name| fs::read_to_string(dir.join(name)).ok())
            .map(|v| v.trim().to_owned())
    })
}

/// Asserts that nothing of the VM is left on the host: no process, no
/// folder, no cgroup.
fn assert_gone(driver: &QemuDriver, id: VmId, cgroups: &[PathBuf]) {
    let vm_dir = driver.vm_dir(id);
    assert_eq!(processes_naming(vm_dir.to_str().unwrap()), vec![]);
    assert!(!vm_dir.exists(), "{} remains", vm_dir.display());
    for dir in cgroups {
        assert!(!dir.exists(), "the cgroup {} remains", dir.display());
    }
}

#[tokio::test]
async fn root_in_a_vm_reaches_nothing_of_the_host_or_the_other_vm() {
    // The output limit is lowered so that TCG reaches it in seconds.
    let env = Env::new(|config| config.max_exec_output_bytes = OUTPUT_LIMIT);
    // A file only the host has: no VM may ever see its contents.
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    let canary = format!("host-canary-{}", uuid::Uuid::new_v4().simple());
    fs::write(env.base.join("canary"), &canary).unwrap();
    let (a, b) = tokio::join!(
        env.boot(env.spec(Some("disk-of-a"))),
        env.boot(env.spec(Some("disk-of-b")))
    );
    step("two VMs booted");
    let secret_a = fs::read_to_string(env.driver.vm_dir(a).join("secret")).unwrap();
    let secret_b = fs::read_to_string(env.driver.vm_dir(b).join("secret")).unwrap();

    // The secret is on no command line: no host process's, not the
    // guest kernel's; and the agent authenticates with it.
    for secret in [&secret_a, &secret_b] {
        assert_eq!(processes_naming(secret.trim()), vec![]);
    }
    let cmdline = sh(&env.driver, a, "cat /proc/cmdline").await;
    assert!(cmdline.contains(&format!("hearth.vm={a}")), "{cmdline}");
    assert!(
        !cmdline.contains(secret_a.trim()) && !cmdline.contains("secret"),
        "{cmdline}"
    );
    // It came as a firmware configuration item, which vm-init unloaded
    // from sysfs after reading it; a non-root process cannot read the
    // agent's copy.
    let ran = run(
        &env.driver,
        a,
        "ls /sys/firmware/qemu_fw_cfg 2>&1; stat -c '%a %u' /run/hearth /run/hearth/secret; \
         grep -q ^nobody: /etc/passwd 2>/dev/null || echo 'nobody:x:65534:65534::/:/bin/sh' >> /etc/passwd; \
         su -s /bin/sh nobody -c 'id -u; cat /run/hearth/secret' 2>&1 || echo denied",
    )
    .await;
    assert!(ran.stdout.contains("No such file"), "{ran:?}");
    assert!(ran.stdout.contains("700 0\n600 0\n65534\n"), "{ran:?}");
    assert!(
        ran.stdout.ends_with("denied\n") && !ran.stdout.contains(secret_a.trim()),
        "{ran:?}"
    );

    // Root reloads the module and reads every firmware configuration item:
    // qemu's own (`etc/…`) and this VM's secret, no host file.
    let items = sh(
        &env.driver,
        a,
        "insmod $(grep qemu_fw_cfg /etc/hearth/modules) && \
         cd /sys/firmware/qemu_fw_cfg/by_key && for k in *; do echo \"item $(cat $k/name)\"; done | sort && \
         cat ../by_name/opt/hearth/secret/raw && echo && cat */raw | grep -c host-canary; true",
    )
    .await;
    let names: Vec<&str> = items
        .lines()
        .filter_map(|l| l.strip_prefix("item "))
        .collect();
    eprintln!("firmware configuration items: {names:?}");
    // qemu's own items (`etc/…`, boot ROMs) and, as the only item of the
    // user's `opt/` space, the secret.
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("opt/"))
            .collect::<Vec<_>>(),
        vec![&"opt/hearth/secret"],
        "{items}"
    );
    assert!(items.contains(secret_a.trim()) && !items.contains(secret_b.trim()));
    assert!(!items.contains(&canary));

    // Devices: virtio net, block and balloon only (no 9p, no virtiofs, no
    // vsock, no console port), one disk (its overlay).
    let devices = sh(
        &env.driver,
        a,
        "cat /sys/bus/virtio/devices/*/device | sort -u | tr '\\n' ' '; echo; ls /sys/block | tr '\\n' ' '",
    )
    .await;
    assert_eq!(devices, "0x0001 0x0002 0x0005 \nvda ", "{devices}");
    // Every block device, every file, read whole: the host's canary and the
    // other VM's disk are nowhere; its own disk is there.
    let scan = run_with(&env.driver, a, {
        let mut request = ExecRequest::new(format!(
            "for d in /dev/vd* /dev/ram* /dev/loop*; do [ -b $d ] && cat $d; done | tr -d '\\0' | grep -ac -e {canary} -e disk-of-b; \
             find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f -exec grep -las -e {canary} -e disk-of-b {{}} +; \
             head -c 9 /dev/vda; echo"
        ));
        request.timeout = Duration::from_secs(300);
        request
    })
    .await;
    assert_eq!(scan.stdout, "0\ndisk-of-a\n", "{scan:?}");
    step("scanned every device and file");
    // No file system reaches outside: shared folders are not there, and no
    // device but its own disk mounts.
    let mounts = sh(
        &env.driver,
        a,
        "for t in 9p virtiofs nfs cifs; do mount -t $t hostshare /mnt 2>/dev/null && echo mounted $t; done; \
         grep -c -e 9p -e virtiofs /proc/filesystems; \
         mount -t ext4 /dev/vda /mnt 2>/dev/null && echo mounted vda; echo end",
    )
    .await;
    assert_eq!(mounts, "0\nend\n", "{mounts}");

    // Filling the disk: ENOSPC at the disk limit inside; on the host the
    // overlay stays within its bound; the guest still writes and reads
    // its own disk.
    let fill = run_with(&env.driver, a, {
        let mut request = ExecRequest::new(
            "dd if=/dev/zero of=/dev/vda bs=1M 2>&1 | grep -o 'No space left on device'; \
             blockdev --getsize64 /dev/vda; printf mine | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; \
             head -c 4 /dev/vda; echo",
        );
        request.timeout = Duration::from_secs(300);
        request
    })
    .await;
    assert_eq!(
        fill.stdout,
        format!("No space left on device\n{}\nmine\n", DISK_MIB << 20),
        "{fill:?}"
    );
    let overlay = fs::metadata(env.driver.vm_dir(a).join("overlay.qcow2"))
        .unwrap()
        .len();
    let bound = limits::file_limit(Some(DISK_MIB << 20), limits::LOG_FILE_LIMIT_BYTES);
    assert!(
        overlay >= DISK_MIB << 20 && overlay <= bound,
        "overlay {overlay} bytes, bound {bound}"
    );
    step("filled the disk");
    // The other VM's disk is untouched by all this.
    assert_eq!(
        sh(&env.driver, b, "head -c 9 /dev/vda; echo").await,
        "disk-of-b\n"
    );

    // qemu runs in cgroups of its own, with the limits of its spec.
    let pid_a = env.driver.qemu_pid(a).unwrap();
    let cgroups_a = env.driver.cgroup_dirs(a);
    assert!(!cgroups_a.is_empty(), "no cgroups on this host");
    for dir in &cgroups_a {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid_a.to_string()),
            "{}: {procs}",
            dir.display()
        );
    }
    let expected =
        limits::Limits::for_vm(256, 1, Some(DISK_MIB << 20), limits::LOG_FILE_LIMIT_BYTES);
    let memory_limit: u64 = cgroup_file(&env.driver, a, &["memory.max", "memory.limit_in_bytes"])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(memory_limit, expected.memory_bytes);
    assert_eq!(
        cgroup_file(&env.driver, a, &["pids.max"]).unwrap(),
        expected.pids.to_string()
    );
    let limits_file = fs::read_to_string(format!("/proc/{pid_a}/limits")).unwrap();
    let fsize = limits_file
        .lines()
        .find(|l| l.starts_with("Max file size"))
        .unwrap();
    assert!(
        fsize.contains(&(limits::ulimit_blocks(expected.file_bytes) * 512).to_string()),
        "{fsize}"
    );

    // Memory hog: the guest's OOM killer ends it; qemu stays inside its
    // cgroup's limit; the VM and the other one answer on.
    let hog = run_with(&env.driver, a, {
        let mut request = ExecRequest::new(
            "dd if=/dev/zero bs=1M count=2000 2>/dev/null | tail -c 1900000000 >/dev/null",
        );
        request.timeout = Duration::from_secs(300);
        request
    })
    .await;
    assert_ne!(hog.exit_code, 0, "{}", hog.stderr);
    assert_eq!(sh(&env.driver, a, "echo alive").await, "alive\n");
    assert_eq!(sh(&env.driver, b, "echo alive").await, "alive\n");
    let peak: u64 = cgroup_file(
        &env.driver,
        a,
        &["memory.peak", "memory.max_usage_in_bytes"],
    )
    .unwrap()
    .parse()
    .unwrap();
    assert!(
        peak <= expected.memory_bytes,
        "peak {peak} > {}",
        expected.memory_bytes
    );
    eprintln!(
        "qemu of a 256 MiB VM after a memory hog: peak {} MiB",
        peak >> 20
    );

    step("memory hog");
    // Endless output from the real agent: the host stops at its limit and
    // drops the connection (the agent kills the command); the VM answers on.
    let started = Instant::now();
    let mut request = ExecRequest::new("yes hearth-flood-hearth-flood-hearth-flood");
    request.timeout = Duration::from_secs(600);
    let (tx, mut rx) = mpsc::unbounded_channel::<OutputChunk>();
    let drain = tokio::spawn(async move {
        let mut got = 0u64;
        while let Some(chunk) = rx.recv().await {
            got += chunk.data.len() as u64;
        }
        got
    });
    let err = env.driver.exec(a, &request, Some(tx)).await.unwrap_err();
    let got = drain.await.unwrap();
    assert!(
        err.to_string().contains("passed its limit of 8 MiB"),
        "{err}"
    );
    assert!(got <= OUTPUT_LIMIT && got > OUTPUT_LIMIT / 2, "{got}");
    eprintln!(
        "endless output cut after {} MiB in {:?}",
        got >> 20,
        started.elapsed()
    );
    let after = sh(
        &env.driver,
        a,
        "for i in $(seq 100); do pidof yes >/dev/null || break; sleep 0.1; done; pidof yes || echo none",
    )
    .await;
    assert_eq!(after, "none\n");

    step("endless output");
    // Fork bomb (last: the guest's problem). The host's side stays within
    // the cgroup; the other VM answers; the VM is destroyed cleanly.
    let mut bomb = ExecRequest::new("b() { b | b & }; b; sleep 10");
    bomb.timeout = Duration::from_secs(15);
    let _ = env.driver.exec(a, &bomb, None).await;
    let threads = fs::read_dir(format!("/proc/{pid_a}/task")).unwrap().count() as u64;
    assert!(threads <= expected.pids, "{threads} threads");
    assert_eq!(sh(&env.driver, b, "echo unaffected").await, "unaffected\n");
    if let Some(stat) = cgroup_file(&env.driver, a, &["cpu.stat"]) {
        eprintln!("qemu of the fork-bombed VM: {}", stat.replace('\n', ", "));
    }

    step("fork bomb");
    // A returned qemu VM is never reused: it cannot be reset.
    assert!(matches!(
        env.driver.reset(a).await,
        Err(DriverError::Unsupported(_))
    ));
    env.driver.destroy(a).await.unwrap();
    assert_gone(&env.driver, a, &cgroups_a);
    let cgroups_b = env.driver.cgroup_dirs(b);
    env.driver.destroy(b).await.unwrap();
    assert_gone(&env.driver, b, &cgroups_b);
}

#[tokio::test]
async fn a_console_flood_and_a_hostile_agent_stay_bounded() {
    const LOG_LIMIT: u64 = 1 << 20;
    let env = Env::new(|config| config.log_file_limit_bytes = LOG_LIMIT);
    let id = env.boot(env.spec(None)).await;
    let console = env.driver.vm_dir(id).join("console.log");

    // Root writes its serial console for ever: console.log stops at the
    // limit, qemu lives on, the agent answers.
    sh(
        &env.driver,
        id,
        "setsid sh -c 'cat /dev/zero > /dev/ttyS0' </dev/null >/dev/null 2>&1 &",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(300);
    while fs::metadata(&console).unwrap().len() < LOG_LIMIT {
        assert!(
            Instant::now() < deadline,
            "console.log only reached {} bytes",
            fs::metadata(&console).unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the limit, writes fail: the guest goes on writing, the file
    // does not grow (checked after the guest wrote more for sure: a
    // command's round trip).
    assert_eq!(
        sh(&env.driver, id, "pidof cat >/dev/null && echo writing").await,
        "writing\n"
    );
    assert_eq!(fs::metadata(&console).unwrap().len(), LOG_LIMIT);
    assert!(env.driver.qemu_pid(id).is_some());

    // Root replaces the agent with a server of its own that answers with
    // an endless line: the host's calls end with an error, bounded.
    sh(
        &env.driver,
        id,
        "s=$PPID; setsid sh -c \"sleep 1; kill -9 $s; while true; do nc -l -p 7070 </dev/zero; done\" \
         </dev/null >/dev/null 2>&1 &",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let err = loop {
        // Until the hostile server holds the port (the real one may answer
        // meanwhile, or nobody).
        let answer = env.driver.exec(id, &ExecRequest::new("true"), None).await;
        match answer {
            Err(e) if e.to_string().contains("longer than 1024 KiB") => break e.to_string(),
            other => assert!(Instant::now() < deadline, "still {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(err.contains("connection dropped"), "{err}");
    // The VM is broken for good (its own doing): destroy still works.
    let cgroups = env.driver.cgroup_dirs(id);
    env.driver.destroy(id).await.unwrap();
    assert_gone(&env.driver, id, &cgroups);
}

#[tokio::test]
async fn an_image_disk_larger_than_the_disk_limit_is_refused() {
    let env = Env::new(|_| {});
    let mut spec = env.spec(Some("big"));
    // The image's disk is 1 MiB; the environment allows none of it.
    spec.disk_mib = 0;
    let id = spec.id;
    let mut small = spec.clone();
    small.disk_mib = 1;
    small.id = VmId::new();
    let image_disk = spec.image.disk.clone().unwrap();
    fs::write(&image_disk, vec![0u8; 3 << 20]).unwrap();
    let err = env.driver.create(&small).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("the image's disk is 3 MiB, more than the environment's disk limit of 1 MiB"),
        "{err}"
    );
    assert_gone(&env.driver, small.id, &[]);
    // Without a limit the overlay has the image disk's own size.
    env.driver.create(&spec).await.unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(env.driver.vm_dir(id).join("overlay.qcow2"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 3 << 20);
    env.driver.destroy(id).await.unwrap();
}
