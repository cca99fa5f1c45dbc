//! Attacks on the sandbox boundary, run for real: each test is root inside
//! a real sandbox (the real driver, the real guest agent, the real base
//! image) trying to reach the host, another sandbox or more than its
//! limits, and shows the attack failing — and, beside it, the legitimate
//! thing a setup command or an agent does still working. Then the reset
//! path: nothing an agent wrote or started survives `reset`; what
//! provisioning sealed does.
//!
//! **Requirements:** root on Linux with user namespaces, idmapped mounts
//! (kernel 5.19+), overlayfs and cgroup v2 (memory, pids); a Debian host
//! (the base image is built from its packages, perl among them: git needs
//! it, and the tests use it to make raw system calls).

mod support;

use hearth_core::ids::{TenantId, VmId};
use hearth_drivers::sandbox::{DEFAULT_UID_BASE, SandboxConfig, SandboxDriver};
use hearth_drivers::{Driver, ExecRequest, ExecResult, ImageSpec, NetworkSpec, Stream, VmSpec};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::mpsc;

/// A driver on a state folder of its own (under /var/tmp, outside every
/// sandbox's /tmp), cleaned up on drop: sandboxes, cgroups, folders.
struct Env {
    driver: SandboxDriver,
    base: PathBuf,
}

impl Env {
    fn with(adjust: impl FnOnce(&mut SandboxConfig)) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the attack tests need root"
        );
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let base = Path::new("/var/tmp/hearth-tests").join(format!("ha-{}", &tag[..10]));
        fs::create_dir_all(&base).unwrap();
        let mut config = SandboxConfig::new(base.join("state"), agent_binary());
        config.cgroup_root_name = format!("hearth-test-{tag}");
        config.default_root = Some(base_image());
        config.hide = vec![base.join("data")];
        adjust(&mut config);
        Env {
            driver: SandboxDriver::new(config),
            base,
        }
    }

    fn new() -> Self {
        Self::with(|_| {})
    }

    fn spec(&self, memory_mib: u64, disk_mib: u64) -> VmSpec {
        VmSpec {
            id: VmId::new(),
            tenant: TenantId::new(),
            workspace: "web".into(),
            cpus: 1,
            memory_mib,
            image: ImageSpec::default(),
            network: NetworkSpec::none(),
            disk_mib,
        }
    }

    async fn boot_with(&self, memory_mib: u64, disk_mib: u64) -> VmId {
        let spec = self.spec(memory_mib, disk_mib);
        self.driver.create(&spec).await.expect("create");
        wait_healthy(&self.driver, spec.id).await;
        spec.id
    }

    async fn boot(&self) -> VmId {
        self.boot_with(256, 256).await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        clean_up_sandboxes(&self.driver, &self.base);
    }
}

#[derive(Debug)]
struct Ran {
    result: ExecResult,
    stdout: String,
    stderr: String,
}

async fn run(driver: &SandboxDriver, id: VmId, command: &str) -> Ran {
    let request = ExecRequest {
        timeout: Duration::from_secs(120),
        ..ExecRequest::new(command)
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let result = driver
        .exec(id, &request, Some(tx))
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
async fn ok(driver: &SandboxDriver, id: VmId, command: &str) -> String {
    let ran = run(driver, id, command).await;
    assert_eq!(ran.result.exit_code, 0, "{command}: {ran:?}");
    ran.stdout
}

/// A command that must fail; returns its stderr.
async fn denied(driver: &SandboxDriver, id: VmId, command: &str) -> String {
    let ran = run(driver, id, command).await;
    assert_ne!(
        ran.result.exit_code, 0,
        "the attack {command:?} succeeded: {ran:?}"
    );
    ran.stderr
}

/// The uid the host sees a process run as (`Uid:` real uid).
fn host_uid(pid: i32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn mounts_and_unmounts_fail_and_tmp_stays_writable() {
    let env = Env::new();
    let id = env.boot().await;
    for attack in [
        "umount /tmp",
        "umount -l /proc",
        "umount /run/hearth/hearth-guest-agent",
        "mount -t tmpfs none /mnt",
        "mount --bind / /mnt",
        "mount -o remount,rw /proc/sys",
        "mount -t proc proc /mnt",
    ] {
        denied(&env.driver, id, attack).await;
    }
    // The mounts are all still there.
    let mounts = ok(&env.driver, id, "cat /proc/self/mountinfo").await;
    assert!(
        mounts.contains(" /run/hearth/hearth-guest-agent "),
        "{mounts}"
    );
    // Legit: root writes /tmp and anywhere in its writable layer.
    assert_eq!(
        ok(&env.driver, id, "echo hi > /tmp/x && cat /tmp/x").await,
        "hi\n"
    );
}

#[tokio::test]
async fn host_files_and_the_data_dir_are_unreachable() {
    let env = Env::new();
    let data = env.base.join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("admin-token"), "hth_operator_secret").unwrap();
    let marker = env.base.join("host-marker");
    fs::write(&marker, "host only").unwrap();
    let id = env.boot().await;
    for path in [
        marker.display().to_string(),
        data.join("admin-token").display().to_string(),
        "/etc/shadow".into(),
        "/proc/1/root/etc/hostname".into(),
        "/proc/1/environ".into(),
        format!("/proc/1/root{}", marker.display()),
    ] {
        denied(&env.driver, id, &format!("cat {path}")).await;
    }
    // Not even the host's folders exist inside: the lower layer is the image.
    denied(&env.driver, id, &format!("ls {}", env.base.display())).await;
    denied(&env.driver, id, "ls /work /root/.cargo").await;
    // Legit: the image's own files read fine.
    assert!(
        ok(&env.driver, id, "cat /etc/os-release")
            .await
            .contains("Debian")
    );
    assert_eq!(ok(&env.driver, id, "id -u; id -g").await, "0\n0\n");
}

#[tokio::test]
async fn another_sandboxs_files_secret_and_processes_are_unreachable() {
    let env = Env::new();
    let (a, b) = (env.boot().await, env.boot().await);
    env.driver
        .write_file(b, "/home/.env", b"API_KEY=b-secret\n", 0o600)
        .await
        .unwrap();
    ok(
        &env.driver,
        b,
        "setsid sleep 300 >/dev/null 2>&1 </dev/null & echo started",
    )
    .await;
    let b_dir = env.driver.vm_dir(b);
    for path in [
        b_dir.join("secret"),
        b_dir.join("run/secret"),
        b_dir.join("disk/upper/home/.env"),
    ] {
        denied(&env.driver, a, &format!("cat {}", path.display())).await;
    }
    // B's sleep is a host process A cannot see or signal.
    let b_sleep = Command::new("pgrep")
        .args(["-n", "-x", "sleep"])
        .output()
        .unwrap();
    let b_sleep = String::from_utf8_lossy(&b_sleep.stdout).trim().to_owned();
    assert!(!b_sleep.is_empty());
    denied(&env.driver, a, &format!("kill -0 {b_sleep}")).await;
    assert_eq!(
        ok(&env.driver, a, "pgrep -x sleep || echo none").await,
        "none\n"
    );
    // Legit: each reads its own.
    assert_eq!(
        ok(&env.driver, b, "cat /home/.env").await,
        "API_KEY=b-secret\n"
    );
    assert_eq!(
        ok(&env.driver, a, "wc -c < /run/hearth/secret")
            .await
            .trim(),
        "64"
    );
}

#[tokio::test]
async fn host_processes_cannot_be_signalled_or_traced() {
    let env = Env::new();
    let id = env.boot().await;
    // PID 1 (init) runs as the host's root: no signal, no ptrace.
    denied(&env.driver, id, "kill -9 1").await;
    let stderr = denied(
        &env.driver,
        id,
        "perl -e '$r = syscall(101, 16, 1, 0, 0); die \"ptrace: $!\\n\" if $r < 0'",
    )
    .await;
    assert!(
        stderr.contains("ptrace: Operation not permitted"),
        "{stderr}"
    );
    assert!(env.driver.health(id).await.is_ok());
    // The host's own processes are not even visible.
    let host_pids = ok(&env.driver, id, "ls /proc | grep -c '^[0-9]'").await;
    assert!(host_pids.trim().parse::<u32>().unwrap() < 10, "{host_pids}");
    // Legit: its own processes are its to kill.
    ok(
        &env.driver,
        id,
        "sleep 100 & p=$!; kill -9 $p; wait $p; test $? -eq 137",
    )
    .await;
}

#[tokio::test]
async fn devices_modules_and_kernel_knobs_are_out_of_reach() {
    let env = Env::new();
    let id = env.boot().await;
    let devices = ok(&env.driver, id, "ls /dev").await;
    for absent in ["vda", "sda", "mem", "kmsg", "console", "loop0", "fuse"] {
        assert!(
            !devices.lines().any(|d| d == absent),
            "/dev/{absent}: {devices}"
        );
    }
    denied(&env.driver, id, "mknod /dev/hostdisk b 254 0").await;
    denied(&env.driver, id, "mknod /tmp/mem c 1 1").await;
    denied(&env.driver, id, "mount /dev/vda /mnt").await;
    // finit_module (313) and init_module (175) on x86_64.
    let stderr = denied(
        &env.driver,
        id,
        "perl -e 'for (313, 175) { die \"module: $!\\n\" if syscall($_, 0, 0, 0) < 0 }'",
    )
    .await;
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    let drop_caches = fs::read_to_string("/proc/sys/vm/swappiness").unwrap();
    for knob in [
        "/proc/sys/vm/swappiness",
        "/proc/sys/kernel/sysrq",
        "/proc/sysrq-trigger",
        "/sys/kernel/mm/transparent_hugepage/enabled",
        "/sys/class/net/lo/mtu",
    ] {
        denied(&env.driver, id, &format!("echo 1 > {knob}")).await;
    }
    assert_eq!(
        fs::read_to_string("/proc/sys/vm/swappiness").unwrap(),
        drop_caches
    );
    // Masked paths read empty.
    assert_eq!(
        ok(&env.driver, id, "cat /proc/kcore /proc/keys | wc -c").await,
        "0\n"
    );
    assert_eq!(
        ok(&env.driver, id, "ls -A /sys/firmware | wc -l").await,
        "0\n"
    );
    // Legit: the harmless devices work.
    assert_eq!(
        ok(
            &env.driver,
            id,
            "echo x > /dev/null && head -c 16 /dev/urandom | wc -c && head -c 3 /dev/zero | wc -c"
        )
        .await,
        "16\n3\n"
    );
}

#[tokio::test]
async fn no_new_user_namespace_regains_capabilities() {
    let env = Env::new();
    let id = env.boot().await;
    denied(&env.driver, id, "unshare -Ur id").await;
    denied(&env.driver, id, "unshare -m true").await;
    // clone(CLONE_NEWUSER) directly (56 = clone on x86_64).
    let stderr = denied(
        &env.driver,
        id,
        "perl -e 'die \"clone: $!\\n\" if syscall(56, 0x10000000 | 17, 0, 0, 0, 0) < 0'",
    )
    .await;
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    let status = ok(
        &env.driver,
        id,
        "grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/self/status",
    )
    .await;
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    // CAP_SYS_ADMIN (bit 21) is in neither set.
    for line in status.lines().filter(|l| l.starts_with("Cap")) {
        let mask = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
        assert_eq!(mask & (1 << 21), 0, "{line}");
    }
    // Legit: root inside still chowns and runs as uid 0.
    ok(
        &env.driver,
        id,
        "touch /home/f && chown 1000:1000 /home/f && test $(stat -c %u /home/f) = 1000",
    )
    .await;
}

#[tokio::test]
async fn a_fork_bomb_hits_the_pids_limit_inside_its_vm_only() {
    let env = Env::with(|c| c.pids_max = 64);
    let (bomb, neighbour) = (env.boot().await, env.boot().await);
    // Whatever the shell makes of its failed forks, the kernel refused them.
    run(
        &env.driver,
        bomb,
        "i=0; while [ $i -lt 200 ]; do sleep 300 & i=$((i+1)); done; true",
    )
    .await;
    let cgroups = env.driver.cgroup_dirs(bomb);
    let cgroup = cgroups
        .iter()
        .find(|d| d.join("pids.max").exists())
        .expect("the VM has a pids cgroup");
    let events = fs::read_to_string(cgroup.join("pids.events")).unwrap();
    let refused: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("max "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused > 0, "{events}");
    let current: u64 = fs::read_to_string(cgroup.join("pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 64, "{current}");
    // The neighbour (same limit) and the host are fine.
    assert_eq!(
        ok(&env.driver, neighbour, "sh -c 'echo fine'").await,
        "fine\n"
    );
    assert!(Command::new("true").status().unwrap().success());
    // Legit: below the limit, background work runs.
    ok(
        &env.driver,
        neighbour,
        "for i in 1 2 3; do sleep 1 & done; wait",
    )
    .await;
}

#[tokio::test]
async fn a_memory_hog_is_oom_killed_inside_and_reported() {
    let env = Env::new();
    let id = env.boot_with(64, 32).await;
    let ran = run(
        &env.driver,
        id,
        "perl -e '$x = \"a\" x (300 * 1024 * 1024); print length $x'",
    )
    .await;
    assert_eq!(ran.result.exit_code, 137, "{ran:?}");
    assert!(
        ran.stderr.contains("the VM hit its memory limit"),
        "{ran:?}"
    );
    // The VM itself survives its hog.
    assert!(env.driver.health(id).await.is_ok());
    // Legit: a modest allocation works.
    assert_eq!(
        ok(
            &env.driver,
            id,
            "perl -e '$x = \"a\" x (8 * 1024 * 1024); print length $x'"
        )
        .await,
        "8388608"
    );
}

#[tokio::test]
async fn a_disk_filler_gets_enospc_at_its_limit() {
    let env = Env::new();
    let id = env.boot_with(256, 32).await;
    let stderr = denied(
        &env.driver,
        id,
        "dd if=/dev/zero of=/home/big bs=1M count=64",
    )
    .await;
    assert!(stderr.contains("No space left on device"), "{stderr}");
    // Nor through the console the host keeps (the server's stderr): the
    // server is out of reach, and the log is on the VM's disk anyway.
    let stderr = denied(
        &env.driver,
        id,
        "p=$(pgrep -f 'hearth-guest-agent serve' | head -n 1); dd if=/dev/zero of=/proc/$p/fd/2 bs=1M count=64",
    )
    .await;
    assert!(
        stderr.contains("Permission denied") || stderr.contains("No space left on device"),
        "{stderr}"
    );
    let console = env.driver.vm_dir(id).join("disk/console.log");
    assert!(fs::metadata(&console).unwrap().len() < 1 << 20);
    // Legit: after freeing it, writing within the limit works.
    ok(
        &env.driver,
        id,
        "rm /home/big && dd if=/dev/zero of=/home/ok bs=1M count=8 2>/dev/null && ls -l /home/ok",
    )
    .await;
}

#[tokio::test]
async fn a_vm_process_is_the_unprivileged_base_uid_on_the_host() {
    let env = Env::new();
    let id = env.boot().await;
    let pid: i32 = ok(&env.driver, id, "sleep 300 >/dev/null 2>&1 & echo $!")
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(pid > 0);
    let cgroup = &env.driver.cgroup_dirs(id)[0];
    let procs: Vec<i32> = fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let sleepers: Vec<i32> = procs
        .iter()
        .copied()
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
        .collect();
    assert!(!sleepers.is_empty(), "{procs:?}");
    for p in sleepers {
        assert_eq!(host_uid(p), DEFAULT_UID_BASE);
    }
    // And root inside is 0 (legit).
    assert_eq!(ok(&env.driver, id, "id -u").await, "0\n");
}

#[tokio::test]
async fn setup_as_root_installs_chowns_and_clones() {
    let env = Env::new();
    let id = env.boot().await;
    let out = ok(
        &env.driver,
        id,
        "set -e; printf '#!/bin/sh\\necho tool\\n' > /usr/local/bin/tool; chmod +x /usr/local/bin/tool; tool; \
         mkdir -p /opt/app && chown -R 1000:1000 /opt/app && stat -c %u /opt/app; \
         echo 'x' >> /etc/hosts; \
         git init -q /srv/origin && cd /srv/origin && git -c user.email=a@b -c user.name=a commit -q --allow-empty -m first; \
         git clone -q /srv/origin /home/repo && git -C /home/repo log --format=%s",
    )
    .await;
    assert_eq!(out, "tool\n1000\nfirst\n");
}

#[tokio::test]
async fn reset_brings_back_the_sealed_state_and_nothing_else() {
    let env = Env::new();
    let id = env.boot().await;
    // Provisioning: a repo and a file, then seal.
    ok(
        &env.driver,
        id,
        "git init -q /home/repo && echo v1 > /home/repo/file && echo provisioned > /etc/provisioned",
    )
    .await;
    env.driver.seal(id).await.expect("seal");
    assert_eq!(ok(&env.driver, id, "cat /home/repo/file").await, "v1\n");

    // An agent's work: edits, new files everywhere, a process.
    ok(
        &env.driver,
        id,
        "echo v2 > /home/repo/file; rm /etc/provisioned; echo agent > /etc/agent; echo t > /tmp/t; \
         echo u > /usr/local/bin/u; setsid sleep 300 >/dev/null 2>&1 </dev/null &",
    )
    .await;
    let started = Instant::now();
    env.driver.reset(id).await.expect("reset");
    let took = started.elapsed();
    println!("reset (kill, fresh layer, relaunch, agent answering): {took:?}");
    assert_eq!(
        ok(&env.driver, id, "cat /home/repo/file /etc/provisioned").await,
        "v1\nprovisioned\n"
    );
    for gone in ["/etc/agent", "/tmp/t", "/usr/local/bin/u"] {
        denied(&env.driver, id, &format!("test -e {gone}")).await;
    }
    assert_eq!(
        ok(&env.driver, id, "pgrep -x sleep || echo none").await,
        "none\n"
    );
    // The same VM: id and secret, and it resets again.
    assert!(
        env.driver
            .list()
            .await
            .unwrap()
            .iter()
            .any(|vm| vm.id == id && vm.running)
    );
    env.driver.reset(id).await.expect("second reset");
    assert_eq!(ok(&env.driver, id, "cat /home/repo/file").await, "v1\n");
    // A restarted driver resets (and destroys) what it adopted.
    let restarted = SandboxDriver::new(env.driver.config().clone());
    restarted.reset(id).await.expect("reset after a restart");
    assert_eq!(
        ok(&restarted, id, "cat /etc/provisioned").await,
        "provisioned\n"
    );
}

#[tokio::test]
async fn a_crash_mid_reset_leaves_a_vm_that_destroy_removes_whole() {
    let env = Env::new();
    let id = env.boot().await;
    env.driver.seal(id).await.unwrap();
    // A reset cut short after the kill: no process, a half-made layer.
    let vm_dir = env.driver.vm_dir(id);
    let cgroups = env.driver.cgroup_dirs(id);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = fs::read_to_string(cgroups[0].join("cgroup.procs")).unwrap();
        if procs.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the VM's processes did not die");
        for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    fs::remove_dir_all(vm_dir.join("disk/upper")).unwrap();
    let listed = env.driver.list().await.unwrap();
    assert!(
        listed.iter().any(|vm| vm.id == id && !vm.running),
        "{listed:?}"
    );
    env.driver.destroy(id).await.unwrap();
    assert!(!vm_dir.exists());
    assert!(cgroups.iter().all(|c| !c.exists()));
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&vm_dir.display().to_string()), "{mounts}");
}

#[tokio::test]
async fn a_replaced_socket_is_never_followed_by_the_host() {
    let env = Env::new();
    let (a, b) = (env.boot().await, env.boot().await);
    let b_socket = env.driver.vm_dir(b).join("run/agent.sock");
    // A's root points its socket at B's (or any host socket).
    ok(
        &env.driver,
        a,
        &format!(
            "rm /run/hearth/agent.sock && ln -s {} /run/hearth/agent.sock",
            b_socket.display()
        ),
    )
    .await;
    let err = env.driver.health(a).await.unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    // Legit: B is untouched, and a reset gives A a working socket again.
    assert!(env.driver.health(b).await.is_ok());
    env.driver.reset(a).await.expect("reset");
    assert_eq!(ok(&env.driver, a, "echo back").await, "back\n");
}
