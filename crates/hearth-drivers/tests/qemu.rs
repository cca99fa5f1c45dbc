//! The qemu driver against real VMs: real `qemu-system-x86_64 -M microvm`,
//! Debian's cloud kernel, an initramfs baked by `hearth-image` with the real
//! guest agent as `/init`. No mocks.
//!
//! **Requirements:** Linux with `qemu-system-x86` and `qemu-utils`, and for
//! the first bake `apt-get`/`dpkg` with a fresh `apt-get update` (the kernel
//! and `busybox-static` packages are fetched into a cache under Cargo's
//! target tmp folder, shared with `hearth-image`'s tests, and reused by
//! every later run). A missing qemu fails the tests with a message saying
//! so, rather than passing without testing anything.
//!
//! **The image.** Each test process builds the agent binary (as the sandbox
//! tests do: `cargo build -p hearth-guest-agent`, a no-op when up to date),
//! then reuses the newest image under `target/tmp/hearth-qemu-images` whose
//! manifest records this very agent binary (sha256) and every module the
//! baker now puts in, or bakes a new version (and removes the older ones).
//!
//! **The accelerator** is resolved once per test process by a driver in
//! `auto` mode (the KVM probe boot; TCG where KVM does not work), and every
//! test's driver gets that verdict as a fixed setting. `HEARTH_TEST_ACCEL`
//! (`kvm`, `tcg`) skips the probe.
//!
//! **Isolation of the tests.** Each test has its own state folder under
//! Cargo's target tmp folder; an [`Env`] guard destroys every VM of its
//! driver and removes its folder when dropped, panics included.

mod support;

use hearth_core::ids::{TenantId, VmId};
use hearth_drivers::qemu::{Accel, QemuConfig, QemuDriver};
use hearth_drivers::{
    Driver, DriverError, ExecRequest, ExecResult, ImageSpec, OutputChunk, Stream, VmSpec,
};
use hearth_image::{BakeOptions, BakedImage, FileDigest, Manifest};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::mpsc;

/// How long a VM may take from `create` to a healthy agent (TCG on a
/// loaded two-core machine is slow).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(90);

/// The image every test boots: the newest one baked with this agent, or a
/// fresh bake.
fn image() -> &'static BakedImage {
    static IMAGE: OnceLock<BakedImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        assert!(
            Command::new("qemu-system-x86_64")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "the qemu tests need qemu-system-x86_64 (apt-get install qemu-system-x86 qemu-utils)"
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
        let baked =
            hearth_image::bake(&opts, |m| eprintln!("bake: {m}")).expect("bake the test image");
        // Older versions are of older agents: not needed any more.
        for version in hearth_image::versions(&images.join("test-minimal")).unwrap_or_default() {
            if version != baked.version {
                let _ = fs::remove_dir_all(images.join("test-minimal").join(version.to_string()));
            }
        }
        baked
    })
}

fn image_spec() -> ImageSpec {
    let image = image();
    ImageSpec {
        root_dir: None,
        kernel: Some(image.kernel.clone()),
        initrd: Some(image.initrd.clone()),
        disk: image.disk.clone(),
        ..Default::default()
    }
}

/// The accelerator of this host, probed once (see the module docs).
fn accel() -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| match std::env::var("HEARTH_TEST_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("tcg") => Accel::Tcg,
        _ => {
            let dir = tempfile::tempdir_in(target_tmp()).unwrap();
            let driver = QemuDriver::new(QemuConfig::new(dir.path().join("state")));
            let started = Instant::now();
            let accel = driver.resolve_accel(&image_spec()).unwrap();
            eprintln!(
                "accelerator: auto picked {accel:?} in {:?}",
                started.elapsed()
            );
            accel
        }
    })
}

/// A driver on a state folder of its own, cleaned up on drop.
struct Env {
    driver: QemuDriver,
    base: PathBuf,
}

impl Env {
    fn new() -> Self {
        let accel = accel();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let base = target_tmp().join(format!("hq-{}", &tag[..10]));
        fs::create_dir_all(&base).unwrap();
        let mut config = QemuConfig::new(base.join("state"));
        config.accel = accel;
        Env {
            driver: QemuDriver::new(config),
            base,
        }
    }

    /// A second driver instance on the same state (a restarted server).
    fn restarted(&self) -> QemuDriver {
        QemuDriver::new(self.driver.config().clone())
    }

    fn spec(&self) -> VmSpec {
        VmSpec {
            id: VmId::new(),
            tenant: TenantId::new(),
            workspace: "web".into(),
            cpus: 1,
            memory_mib: 256,
            image: image_spec(),
            // The agent's channel only (egress is tests/net_attacks.rs's).
            network: hearth_drivers::NetworkSpec::none(),
            disk_mib: 0,
        }
    }

    /// Creates a VM and waits until its agent answers; returns its id.
    async fn boot(&self) -> VmId {
        let spec = self.spec();
        self.driver.create(&spec).await.expect("create");
        wait_healthy(&self.driver, spec.id).await;
        spec.id
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime: clean up from a thread
        // with a runtime of its own.
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

async fn wait_healthy(driver: &QemuDriver, id: VmId) -> Duration {
    let started = Instant::now();
    loop {
        match driver.health(id).await {
            Ok(_) => return started.elapsed(),
            Err(e) if started.elapsed() > HEALTH_TIMEOUT => {
                let console =
                    fs::read_to_string(driver.vm_dir(id).join("console.log")).unwrap_or_default();
                panic!("VM {id} never became healthy: {e}\nconsole:\n{console}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A finished command.
#[derive(Debug)]
struct Ran {
    result: ExecResult,
    stdout: String,
    stderr: String,
}

async fn run(driver: &QemuDriver, id: VmId, command: &str) -> Ran {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let result = driver
        .exec(id, &ExecRequest::new(command), Some(tx))
        .await
        .unwrap_or_else(|e| panic!("exec {command:?}: {e}"));
    let (mut stdout, mut stderr) = (String::new(), String::new());
    while let Some(chunk) = rx.recv().await {
        match chunk.stream {
            Stream::Stdout => stdout.push_str(&chunk.data),
            Stream::Stderr => stderr.push_str(&chunk.data),
        }
    }
    Ran {
        result,
        stdout,
        stderr,
    }
}

/// stdout of a command that must succeed.
async fn sh(driver: &QemuDriver, id: VmId, command: &str) -> String {
    let ran = run(driver, id, command).await;
    assert_eq!(ran.result.exit_code, 0, "{command}: {ran:?}");
    ran.stdout
}

/// Live host processes whose command line mentions `needle` (zombies have
/// none).
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

/// Asserts that nothing of the VM is left on the host.
fn assert_gone(driver: &QemuDriver, id: VmId) {
    let vm_dir = driver.vm_dir(id);
    assert_eq!(
        processes_naming(vm_dir.to_str().unwrap()),
        vec![],
        "processes of {id} remain"
    );
    assert!(!vm_dir.exists(), "{} remains", vm_dir.display());
}

#[tokio::test]
async fn boot_answers_health_and_list_reports_it() {
    let env = Env::new();
    let spec = env.spec();
    let started = Instant::now();
    env.driver.create(&spec).await.unwrap();
    let launched = started.elapsed();
    wait_healthy(&env.driver, spec.id).await;
    eprintln!(
        "create returned after {launched:?}, healthy after {:?} ({:?})",
        started.elapsed(),
        accel()
    );
    assert_eq!(env.driver.resolved_accel(), Some(accel()));
    let health = env.driver.health(spec.id).await.unwrap();
    assert!(health.uptime_ms < 600_000);
    let listed = env.driver.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].id,
            listed[0].tenant,
            listed[0].workspace.as_str(),
            listed[0].running
        ),
        (spec.id, spec.tenant, "web", true)
    );

    // The secret is in no process's arguments, and its files are private.
    let vm_dir = env.driver.vm_dir(spec.id);
    let secret = fs::read_to_string(vm_dir.join("secret")).unwrap();
    assert_eq!(processes_naming(secret.trim()), vec![]);
    for file in ["secret", "qemu.cfg", "console.log"] {
        let mode = fs::metadata(vm_dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    // The guest is what the image says, with user networking.
    let out = sh(
        &env.driver,
        spec.id,
        "uname -r; hostname; cat /etc/resolv.conf; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; echo $HEARTH_VM_ID",
    )
    .await;
    let manifest = Manifest::read(&image().dir).unwrap();
    let short = spec.id.0.simple().to_string();
    assert_eq!(
        out,
        format!(
            "{}\n{}\nnameserver 10.0.2.3\ninet 10.0.2.15/24\n{}\n",
            manifest.kernel_version,
            &short[short.len() - 12..],
            spec.id
        )
    );
    // The secret never reaches the console.
    let console = fs::read_to_string(vm_dir.join("console.log")).unwrap();
    assert!(!console.contains(secret.trim()));
    assert!(console.contains("agent server started"), "{console}");
}

#[tokio::test]
async fn exec_streams_stdout_and_stderr_and_returns_the_exit_code() {
    let env = Env::new();
    let id = env.boot().await;
    let ran = run(
        &env.driver,
        id,
        "echo out; echo err >&2; printf 'é€'; exit 0",
    )
    .await;
    assert_eq!(
        ran.result,
        ExecResult {
            exit_code: 0,
            timed_out: false
        }
    );
    assert_eq!(
        (ran.stdout.as_str(), ran.stderr.as_str()),
        ("out\né€", "err\n")
    );
    let ran = run(&env.driver, id, "echo failing >&2; exit 7").await;
    assert_eq!(ran.result.exit_code, 7);
    assert_eq!(ran.stderr, "failing\n");

    // Output arrives while the command still runs.
    let driver = env.driver.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<OutputChunk>();
    let started = Instant::now();
    let exec = tokio::spawn(async move {
        driver
            .exec(
                id,
                &ExecRequest::new("echo first; sleep 2; echo second"),
                Some(tx),
            )
            .await
    });
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let first_at = started.elapsed();
    assert_eq!(first.data, "first\n");
    assert_eq!(exec.await.unwrap().unwrap().exit_code, 0);
    let total = started.elapsed();
    assert!(
        first_at + Duration::from_secs(1) < total,
        "the first line came after {first_at:?}, the end after {total:?}"
    );
    assert_eq!(rx.recv().await.unwrap().data, "second\n");

    // A timeout kills the command.
    let mut request = ExecRequest::new("echo started; sleep 60");
    request.timeout = Duration::from_millis(1500);
    let result = env.driver.exec(id, &request, None).await.unwrap();
    assert_eq!(
        result,
        ExecResult {
            exit_code: -1,
            timed_out: true
        }
    );
}

#[tokio::test]
async fn write_file_writes_private_files_and_bytes() {
    let env = Env::new();
    let id = env.boot().await;
    env.driver
        .write_file(id, "/home/.env", b"API_KEY=abc123\nREGION=eu\n", 0o600)
        .await
        .unwrap();
    assert_eq!(
        sh(
            &env.driver,
            id,
            "stat -c '%a %u' /home/.env; cat /home/.env"
        )
        .await,
        "600 0\nAPI_KEY=abc123\nREGION=eu\n"
    );
    env.driver
        .write_file(id, "/home/deep/dir/blob", &[0, 159, 146, 150, 255], 0o644)
        .await
        .unwrap();
    assert_eq!(
        sh(
            &env.driver,
            id,
            "od -An -tu1 /home/deep/dir/blob | tr -s ' '"
        )
        .await,
        " 0 159 146 150 255\n"
    );
    let err = env
        .driver
        .write_file(id, "relative/path", b"x", 0o644)
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Guest(_)), "{err}");
}

#[tokio::test]
async fn an_isolated_vm_reaches_nothing_but_its_agent_answers() {
    let env = Env::new();
    let mut spec = env.spec();
    spec.network = hearth_drivers::NetworkSpec::none();
    env.driver.create(&spec).await.unwrap();
    wait_healthy(&env.driver, spec.id).await;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let ran = run(
        &env.driver,
        spec.id,
        &format!("echo hi | timeout 5 nc 10.0.2.2 {port} && echo reached || echo unreachable"),
    )
    .await;
    assert_eq!(ran.stdout, "unreachable\n", "{ran:?}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "the guest reached the host");
}

#[tokio::test]
async fn two_vms_are_isolated() {
    let env = Env::new();
    let (a, b) = tokio::join!(env.boot(), env.boot());
    env.driver
        .write_file(a, "/home/only-in-a", b"a", 0o644)
        .await
        .unwrap();
    sh(&env.driver, a, "echo a > /tmp/mark").await;
    assert_eq!(
        sh(&env.driver, a, "cat /home/only-in-a /tmp/mark").await,
        "aa\n"
    );
    assert_eq!(
        sh(
            &env.driver,
            b,
            "ls /home/only-in-a /tmp/mark 2>/dev/null; echo done"
        )
        .await,
        "done\n"
    );
    assert_ne!(
        sh(&env.driver, a, "hostname").await,
        sh(&env.driver, b, "hostname").await
    );
    // Each VM answers with its own secret only.
    let secret_a = fs::read_to_string(env.driver.vm_dir(a).join("secret")).unwrap();
    let port_b: u16 = fs::read_to_string(env.driver.vm_dir(b).join("port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port_b)).unwrap();
    stream
        .write_all(format!("{{\"secret\":\"{}\",\"op\":\"health\"}}\n", secret_a.trim()).as_bytes())
        .unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    assert_eq!(
        answer.trim(),
        "{\"type\":\"error\",\"message\":\"unauthorized\"}"
    );
}

#[tokio::test]
async fn destroy_leaves_nothing_and_is_idempotent() {
    let env = Env::new();
    let id = env.boot().await;
    let pid = env.driver.qemu_pid(id).expect("qemu runs");
    env.driver.destroy(id).await.unwrap();
    assert_gone(&env.driver, id);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
            // A recycled pid is some other process.
            fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .is_empty()
        }
    );
    env.driver.destroy(id).await.unwrap();
    assert!(env.driver.list().await.unwrap().is_empty());
    assert!(matches!(
        env.driver.health(id).await,
        Err(DriverError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_restarted_driver_adopts_running_vms() {
    let env = Env::new();
    let id = env.boot().await;
    let restarted = env.restarted();
    let listed = restarted.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].id, listed[0].running), (id, true));
    assert_eq!(sh(&restarted, id, "echo adopted").await, "adopted\n");
    restarted.destroy(id).await.unwrap();
    assert_gone(&restarted, id);
    assert!(env.driver.list().await.unwrap().is_empty());
}

/// Set for [`helper_create_a_vm_then_wait`] run as a child process: the
/// state folder to create a VM in.
const HELPER_STATE: &str = "HEARTH_QEMU_TEST_HELPER_STATE";

#[tokio::test]
async fn a_vm_outlives_a_kill_9_of_the_process_that_created_it() {
    let env = Env::new();
    let accel = match accel() {
        Accel::Kvm => "kvm",
        _ => "tcg",
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_create_a_vm_then_wait",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_STATE, &env.driver.config().state_dir)
        .env("HEARTH_TEST_ACCEL", accel)
        .env("HEARTH_GUEST_AGENT", agent_binary())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed on every path, panics included.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let child = KillOnDrop(child);
    let id = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("CREATED ").map(str::to_owned))
        .expect("the helper created no VM");
    let id = VmId(id.parse().unwrap());
    drop(child); // SIGKILL, reaped

    let listed = env.driver.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].id, listed[0].running), (id, true));
    wait_healthy(&env.driver, id).await;
    assert_eq!(sh(&env.driver, id, "echo survived").await, "survived\n");
    env.driver.destroy(id).await.unwrap();
    assert_gone(&env.driver, id);
}

/// Not a test of its own: the child process of
/// [`a_vm_outlives_a_kill_9_of_the_process_that_created_it`].
#[tokio::test]
#[ignore]
async fn helper_create_a_vm_then_wait() {
    let Some(state) = std::env::var_os(HELPER_STATE) else {
        return;
    };
    let mut config = QemuConfig::new(state);
    config.accel = accel();
    let driver = QemuDriver::new(config);
    let spec = VmSpec {
        id: VmId::new(),
        tenant: TenantId::new(),
        workspace: "web".into(),
        cpus: 1,
        memory_mib: 256,
        image: image_spec(),
        network: hearth_drivers::NetworkSpec::none(),
        disk_mib: 0,
    };
    driver.create(&spec).await.unwrap();
    println!("CREATED {}", spec.id);
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test]
async fn a_killed_qemu_is_listed_not_running_and_destroy_cleans_it() {
    let env = Env::new();
    let id = env.boot().await;
    let pid = env.driver.qemu_pid(id).expect("qemu runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = env.driver.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        if !listed[0].running {
            break;
        }
        assert!(Instant::now() < deadline, "qemu {pid} still listed running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(env.driver.health(id).await.is_err());
    env.driver.destroy(id).await.unwrap();
    assert_gone(&env.driver, id);
    assert!(env.driver.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn vms_write_to_overlays_never_to_the_shared_disk() {
    let env = Env::new();
    let disk = env.base.join("disk.raw");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let boot = |disk: PathBuf| {
        let mut spec = env.spec();
        spec.image.disk = Some(disk);
        let driver = env.driver.clone();
        async move {
            driver.create(&spec).await.expect("create");
            wait_healthy(&driver, spec.id).await;
            spec.id
        }
    };
    let (a, b) = tokio::join!(boot(disk.clone()), boot(disk.clone()));
    sh(
        &env.driver,
        a,
        "printf hello | dd of=/dev/vda conv=notrunc 2>/dev/null; sync",
    )
    .await;
    assert_eq!(sh(&env.driver, a, "head -c 5 /dev/vda").await, "hello");
    assert_eq!(
        sh(
            &env.driver,
            b,
            "head -c 5 /dev/vda | od -An -tx1 | tr -d ' '"
        )
        .await,
        "0000000000\n"
    );
    assert!(env.driver.vm_dir(a).join("overlay.qcow2").is_file());
    assert!(fs::read(&disk).unwrap().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn a_broken_image_fails_create_and_leaves_nothing() {
    let env = Env::new();
    let mut spec = env.spec();
    let bogus = env.base.join("not-a-kernel");
    fs::write(&bogus, b"garbage").unwrap();
    spec.image.kernel = Some(bogus);
    let err = env.driver.create(&spec).await.unwrap_err();
    assert!(matches!(err, DriverError::Boot(_)), "{err}");
    assert!(err.to_string().contains("qemu"), "{err}");
    assert!(env.driver.list().await.unwrap().is_empty());
    assert_gone(&env.driver, spec.id);
}

/// The `debian` image kind end to end: bake (debootstrap the first time:
/// minutes, and network to the Debian mirror), boot two VMs from the same
/// disk through their overlays, use git and the compiler. Run with `cargo
/// test -p hearth-drivers --test qemu -- --ignored debian`.
#[tokio::test]
#[ignore]
async fn a_debian_image_boots_with_git_and_a_compiler() {
    let env = Env::new();
    let mut opts = BakeOptions::new(
        env.base.join("images"),
        "debian",
        agent_binary(),
        target_tmp().join("hearth-image-cache"),
    );
    opts.rootfs = hearth_image::RootfsKind::Debian;
    opts.disk_free_mib = 512;
    let image = tokio::task::spawn_blocking(move || {
        hearth_image::bake(&opts, |m| eprintln!("bake: {m}")).expect("bake the debian image")
    })
    .await
    .unwrap();
    let disk = image.disk.clone().expect("a debian image has a disk");
    let before = fs::metadata(&disk).unwrap().modified().unwrap();
    let boot = || {
        let mut spec = env.spec();
        spec.memory_mib = 512;
        spec.image = ImageSpec {
            root_dir: None,
            kernel: Some(image.kernel.clone()),
            initrd: Some(image.initrd.clone()),
            disk: Some(disk.clone()),
            ..Default::default()
        };
        let driver = env.driver.clone();
        async move {
            driver.create(&spec).await.expect("create");
            wait_healthy(&driver, spec.id).await;
            spec.id
        }
    };
    let (a, b) = tokio::join!(boot(), boot());
    let out = sh(
        &env.driver,
        a,
        "cat /etc/debian_version >/dev/null && findmnt -no FSTYPE / && \
         cd /home && printf 'int main(void){return 42;}' > t.c && cc t.c -o t && (./t; echo $?) && \
         git init -q repo && git -C repo config user.email a@b && git -C repo config user.name a && \
         git -C repo commit -q --allow-empty -m first && git -C repo log --format=%s",
    )
    .await;
    assert_eq!(out, "ext4\n42\nfirst\n");
    assert_eq!(
        sh(&env.driver, b, "ls /home/repo 2>/dev/null; echo done").await,
        "done\n"
    );
    assert_eq!(fs::metadata(&disk).unwrap().modified().unwrap(), before);
    assert_eq!(
        sh(&env.driver, a, "cat /proc/1/cmdline | tr '\\0' ' '").await,
        "/sbin/hearth-guest-agent "
    );
}

/// The figures of the report: cold boot through the driver vs. the bare
/// qemu command line (same flags, no bookkeeping), interleaved so that both
/// see the same host load, and the RSS of an idle VM. Run with `cargo test
/// -p hearth-drivers --test qemu -- --ignored --nocapture measure`.
#[tokio::test]
#[ignore]
async fn measure_boot_times_and_memory() {
    const RUNS: usize = 5;
    let env = Env::new();
    let (mut driver_times, mut bare_times) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let spec = env.spec();
        let started = Instant::now();
        env.driver.create(&spec).await.unwrap();
        wait_healthy(&env.driver, spec.id).await;
        driver_times.push(started.elapsed());
        if run == RUNS - 1 {
            // Idle: the guest has reported its free pages to the host.
            tokio::time::sleep(Duration::from_secs(10)).await;
            let pid = env.driver.qemu_pid(spec.id).unwrap();
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let rss = status.lines().find(|l| l.starts_with("VmRSS")).unwrap();
            eprintln!("idle VM (256 MiB guest): qemu {rss}");
        }
        env.driver.destroy(spec.id).await.unwrap();
        bare_times.push(tokio::task::spawn_blocking(bare_boot).await.unwrap());
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (d, b) = (median(&mut driver_times), median(&mut bare_times));
    let image = image();
    eprintln!("accelerator: {:?}", accel());
    eprintln!("driver create→health: {driver_times:?}, median {d:?}");
    eprintln!("bare qemu → health:   {bare_times:?}, median {b:?}");
    eprintln!("ratio: {:.2}", d.as_secs_f64() / b.as_secs_f64());
    eprintln!(
        "kernel {} bytes, initramfs {} bytes",
        fs::metadata(&image.kernel).unwrap().len(),
        fs::metadata(&image.initrd).unwrap().len()
    );
}

/// One boot of the test image by hand, until the agent answers.
fn bare_boot() -> Duration {
    let image = image();
    let accel = accel();
    let dir = tempfile::tempdir_in(target_tmp()).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut append = "console=ttyS0 quiet panic=-1".to_owned();
    if accel == Accel::Tcg {
        let khz = hearth_drivers::qemu::host_tsc_khz().unwrap();
        append.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    append.push_str(" hearth.vm=0190b2c4-1d2e-7f00-8a9b-0123456789ab hearth.port=7070");
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-accel"])
        .arg(if accel == Accel::Kvm { "kvm" } else { "tcg" })
        .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
        .args(["-smp", "1", "-m", "256", "-kernel"])
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(&append)
        .args(["-fw_cfg", "name=opt/hearth/secret,string=bare"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", dir.path().join("console.log").display()))
        .arg("-netdev")
        .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7070"))
        .args(["-device", "virtio-net-device,netdev=n0"])
        .args(["-device", "virtio-balloon-device,free-page-reporting=on"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        let answered = (|| {
            // Short attempts, as the driver's health check makes them.
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            stream
                .set_read_timeout(Some(Duration::from_millis(250)))
                .ok()?;
            stream
                .write_all(b"{\"secret\":\"bare\",\"op\":\"health\"}\n")
                .ok()?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).ok()?;
            line.contains("health").then_some(())
        })();
        if answered.is_some() {
            break;
        }
        assert!(
            started.elapsed() < HEALTH_TIMEOUT,
            "the bare boot never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    child.kill().unwrap();
    child.wait().unwrap();
    elapsed
}
