//! guest-init's network proven by booting it: Debian's cloud kernel under QEMU with a
//! virtio-net NIC on user networking (`restrict=on`, the documentation subnet 192.0.2.0/24),
//! traffic only over loopback: `hostfwd` from 127.0.0.1 into the guest, `guestfwd` from the
//! guest to a server the test runs on 127.0.0.1. Asserts on the console and on what crossed
//! the forwards.

mod guest_vm;

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_protocol::{Config, ExitReason, Network};
use guest_vm::{DNS, GATEWAY, GUEST_IP, Guest, nic, start};
use serde_json::{Value, json};
use system::hash::sha256_reader;
use testkit::http::Server;
use testkit::noise::Noise;
use testkit::vm::{BOOT_TIMEOUT, Boot, VmSpec};

/// A free TCP port on 127.0.0.1 for a `hostfwd` (QEMU binds it right after).
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

fn boot(spec: &VmSpec) -> Boot {
    start(spec).finish(BOOT_TIMEOUT).unwrap()
}

/// `GET path` over HTTP/1.0 from 127.0.0.1:`port`: the status line and the body. Retried
/// while the forward is not answering yet, up to `timeout`.
fn http_get(port: u16, path: &str, timeout: Duration) -> (String, Vec<u8>) {
    let deadline = Instant::now() + timeout;
    loop {
        match try_get(port, path) {
            Ok(reply) => return reply,
            Err(err) if Instant::now() < deadline => {
                eprintln!("GET 127.0.0.1:{port}{path}: {err}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(err) => panic!("GET 127.0.0.1:{port}{path}: {err}"),
        }
    }
}

fn try_get(port: u16, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes())?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header in {} bytes", reply.len())))?;
    let head = String::from_utf8_lossy(&reply[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, reply[split + 4..].to_vec()))
}

/// The app: busybox `httpd` serving `/www` on port 80 (it forks into the background once it
/// listens), a marker, then wait for the power button.
const SERVE_WWW: &str = "httpd -p 80 -h /www && echo HTTPD-\"\"READY; \
    trap 'echo APP-GOT-\"\"SIGTERM; exit 0' TERM; while :; do sleep 1; done";

/// A rootfs with `/www/blob`: 256 KiB of noise.
fn with_blob(tree: &std::path::Path) -> Vec<u8> {
    let blob = Noise::new(10).bytes(256 * 1024);
    fs::create_dir_all(tree.join("www")).unwrap();
    fs::write(tree.join("www/blob"), &blob).unwrap();
    blob
}

fn sha256(bytes: &[u8]) -> String {
    sha256_reader(bytes).unwrap().0.hex()
}

/// Boots `config` with `/www/blob`, fetches it through a `hostfwd` to the guest's port 80,
/// checks its digest, then shuts the app down with the power button.
fn serves_the_blob(config: Value) -> Boot {
    let mut blob = Vec::new();
    let guest = Guest::busybox(config, |tree| blob = with_blob(tree));
    let port = free_port();
    let forward = format!("hostfwd=tcp:127.0.0.1:{port}-{GUEST_IP}:80");
    let vm = start(&guest.spec(Some(nic(&[forward]))));
    vm.wait_for("HTTPD-READY", BOOT_TIMEOUT).unwrap();
    let (status, body) = http_get(port, "/blob", Duration::from_secs(60));
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body.len(), blob.len());
    assert_eq!(sha256(&body), sha256(&blob), "the served file differs");
    vm.power_button().unwrap();
    let boot = vm.finish(BOOT_TIMEOUT).unwrap();
    boot.expect_exit(0).expect_output("APP-GOT-SIGTERM");
    boot
}

#[test]
fn httpd_in_the_guest_serves_a_file_through_hostfwd() {
    let config = Config::exec(["/bin/sh", "-c"])
        .with_cmd([SERVE_WWW])
        .with_network(Network::new(GUEST_IP, 24).with_gateway(GATEWAY))
        .to_json()
        .unwrap();
    let boot = serves_the_blob(Value::String(config));
    boot.expect_log(&format!(
        "network: eth0 52:54:00:12:34:56 (virtio_net): {GUEST_IP}/24"
    ));
    assert!(
        boot.timing_ms("network").is_some(),
        "no network= in the timings line:\n{}",
        boot.console
    );
}

#[test]
fn a_config_in_the_original_host_s_shape_boots_and_serves() {
    // Exactly the keys (and value types) the original host writes; nothing else.
    let config = json!({
        "entrypoint": ["/bin/sh", "-c"],
        "cmd": [format!("echo GREETING=$GREETING; echo PWD=$(pwd); {SERVE_WWW}")],
        "workdir": "/www",
        "env": { "GREETING": "hello from the host" },
        "network_enabled": true,
        "guest_ip": GUEST_IP.to_string(),
        "guest_cidr": 24,
        "guest_gw": GATEWAY.to_string(),
        "guest_dns": DNS.to_string(),
        "volume_mounts": [],
        "init_mode": "exec",
    });
    let boot = serves_the_blob(config);
    boot.expect_output("GREETING=hello from the host")
        .expect_output("PWD=/www");
}

/// A MAC other than QEMU's default, named by `guest_mac`.
const NIC_MAC: &str = "52:54:00:0a:0b:0c";

#[test]
fn the_guest_reaches_a_host_server_by_its_default_route_and_sees_its_config() {
    // Also the `guest_mac` path: the NIC is chosen by its MAC.
    let server = Server::serving(&Arc::new(b"hello over guestfwd\n".to_vec()), false);
    let server_addr = server.url("").trim_start_matches("http://").to_owned();
    // Outside the guest's /25, inside QEMU's /24: only the default route leads there.
    let forwarded = Ipv4Addr::new(192, 0, 2, 200);
    let forward = format!("guestfwd=tcp:{forwarded}:8080-tcp:{server_addr}");
    let script = format!(
        "echo HOSTNAME=$(hostname); sed 's/^/ETC-HOSTNAME /' /etc/hostname; \
         grep -v '^#' /etc/resolv.conf | sed 's/^/RESOLV /'; \
         grep -v '^#' /etc/hosts | sed 's/^/HOSTS /'; \
         ip -4 addr show dev eth0 | sed 's/^ */ADDR /'; ip route | sed 's/^/ROUTE /'; \
         echo MTU $(cat /sys/class/net/eth0/mtu); \
         wget -q -O - http://{forwarded}:8080/via-default-route | sed 's/^/FETCHED /'"
    );
    let config = Config::exec(["/bin/sh", "-c"])
        .with_cmd([script])
        .with_hostname("net-test.example")
        .with_network(
            Network::new(GUEST_IP, 25)
                .with_gateway(GATEWAY)
                .with_dns(DNS)
                .with_dns(Ipv4Addr::new(192, 0, 2, 53))
                .with_mtu(1400)
                .with_mac(NIC_MAC.parse().unwrap()),
        )
        .to_json()
        .unwrap();
    let guest = Guest::busybox(Value::String(config), |_| {});
    let mut nic = nic(&[forward]);
    nic.mac = Some(NIC_MAC.into());
    let boot = boot(&guest.spec(Some(nic)));
    boot.expect_exit(0)
        .expect_log(&format!(
            "network: eth0 {NIC_MAC} (virtio_net): {GUEST_IP}/25, MTU 1400"
        ))
        .expect_output("HOSTNAME=net-test.example")
        .expect_output("ETC-HOSTNAME net-test.example")
        .expect_output(&format!("RESOLV nameserver {DNS}"))
        .expect_output("RESOLV nameserver 192.0.2.53")
        .expect_output("HOSTS 127.0.0.1\tlocalhost")
        .expect_output(&format!("HOSTS {GUEST_IP}\tnet-test.example net-test"))
        .expect_output(&format!("ADDR inet {GUEST_IP}/25"))
        .expect_output(&format!("ROUTE default via {GATEWAY} dev eth0"))
        .expect_output("MTU 1400")
        .expect_output("FETCHED hello over guestfwd");
    let paths: Vec<String> = server.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/via-default-route"], "{}", boot.console);
}

#[test]
fn a_gateway_outside_the_subnet_is_a_network_failure() {
    let config = json!({
        "entrypoint": ["/bin/true"],
        "network_enabled": true,
        "guest_ip": GUEST_IP.to_string(),
        "guest_cidr": 24,
        "guest_gw": "10.9.9.1",
    });
    let guest = Guest::busybox(config, |_| {});
    let boot = boot(&guest.spec(Some(nic(&[]))));
    boot.expect_failure(ExitReason::Network)
        // musl words strerror its own way: the errno name is what is fixed.
        .expect_log("network: FATAL (network): eth0: adding the default route via 10.9.9.1: ")
        .expect_log("(ENETUNREACH, os error 101")
        .expect_log("guest_gw 10.9.9.1 is outside 192.0.2.0/24")
        .expect_log("reboot: Power down");
}

#[test]
fn no_virtio_net_device_is_a_network_failure() {
    let config = json!({
        "entrypoint": ["/bin/true"],
        "network_enabled": true,
        "guest_ip": GUEST_IP.to_string(),
        "guest_gw": GATEWAY.to_string(),
    });
    let guest = Guest::busybox(config, |_| {});
    let mut spec = guest.spec(None);
    spec.append = "guest_init.device_timeout_ms=1500".into();
    boot(&spec)
        .expect_failure(ExitReason::Network)
        .expect_log(
            "network: FATAL (network): no virtio-net interface appeared within 1500 ms \
             (interfaces: lo",
        )
        .expect_log("reboot: Power down");
}
